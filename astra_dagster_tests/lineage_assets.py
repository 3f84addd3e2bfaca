"""A small partitioned asset pair used to test the batch mechanism on real Dagster runs."""

# No "from __future__ import annotations": Dagster reads Config annotations at runtime.
import os
import signal
import time
from typing import ClassVar

import dagster as dg

from astra_dagster.db.connection import connect
from astra_dagster.defs.partitions import RANGE_POLICY, SOURCE_BLOCKS, partition_range
from astra_dagster.lineage.batch import ChunkResult, TaskBatch, TaskItem, Work, run_tasks
from astra_dagster.lineage.config import SourceTaskConfig
from astra_dagster.lineage.io_manager import RESULT_TABLE_KEY, AstraIOManager
from astra_dagster.lineage.sources import sources_in_blocks

SCHEMA = """
create schema if not exists astra_test;
create table if not exists astra_test.square (
    output_pk int primary key references astra.output_interface(pk) on delete restrict,
    value real
);
create table if not exists astra_test.square_plus (
    output_pk int primary key references astra.output_interface(pk) on delete restrict,
    value real
);
"""


def create_tables(url: str) -> None:
    with connect(url) as conn:
        conn.execute(SCHEMA)


class SquareTask(SourceTaskConfig):
    """value = scale * (source number)^2; sources whose id contains BAD raise."""

    task_family: ClassVar[str] = "Test.SquareTask"
    insignificant: ClassVar[frozenset[str]] = frozenset({"force", "only_sources", "chunk_size"})
    scale: float = 1.0
    sleep_seconds: float = 0.0
    chunk_size: int = 0  # > 0: compute in vectorised chunks (a chunk holding a BAD source fails whole)


def _square(config: SquareTask, item: TaskItem) -> dict:
    if "CRASH" in item.source_id:  # a source that kills its worker process (a segfault, say)
        os.kill(os.getpid(), signal.SIGKILL)
    if "BAD" in item.source_id:
        raise ValueError(f"{item.source_id}: corrupt input (test)")
    time.sleep(config.sleep_seconds)
    number = int(item.source_id.rsplit("-", 1)[-1])
    return {"value": config.scale * number**2}


def _square_chunk(config: SquareTask, items: list[TaskItem]) -> list[ChunkResult]:
    if any("BAD" in it.source_id for it in items):
        raise ValueError("a bad source in the chunk (test)")
    t0 = time.perf_counter()
    time.sleep(config.sleep_seconds * len(items))
    shared = (time.perf_counter() - t0) / len(items)
    return [ChunkResult({"value": config.scale * int(it.source_id.rsplit("-", 1)[-1]) ** 2}, None, shared)
            for it in items]


@dg.asset(
    partitions_def=SOURCE_BLOCKS,
    backfill_policy=RANGE_POLICY,
    io_manager_key="astra_io_manager",
    metadata={RESULT_TABLE_KEY: "astra_test.square", "astra/task_family": SquareTask.task_family},
)
def squares(context: dg.AssetExecutionContext, config: SquareTask) -> TaskBatch:
    keys, first_last = partition_range(context)
    with connect() as conn:
        sources = sources_in_blocks(conn, keys)
    items = [TaskItem(source_pk=s.pk, source_id=s.source_id) for s in sources]
    # Top-level functions, so the work can run on worker processes (ASTRA_WORKERS).
    work = Work(_square, state=config, chunk_function=_square_chunk if config.chunk_size > 0 else None,
                chunk_size=max(1, config.chunk_size))
    return run_tasks(context, config, items, work, table="astra_test.square", batch=True,
                     partition_range=first_last)


class SquarePlusTask(SourceTaskConfig):
    task_family: ClassVar[str] = "Test.SquarePlusTask"
    offset: float = 0.5


@dg.asset(
    partitions_def=SOURCE_BLOCKS,
    backfill_policy=RANGE_POLICY,
    io_manager_key="astra_io_manager",
    metadata={RESULT_TABLE_KEY: "astra_test.square_plus", "astra/task_family": SquarePlusTask.task_family},
)
def squares_plus(context: dg.AssetExecutionContext, config: SquarePlusTask, squares: dict) -> TaskBatch:
    _, first_last = partition_range(context)
    # The upstream task's hash is this task's input fingerprint: a new upstream result re-runs it.
    items = [
        TaskItem(payload=row, source_pk=pk, source_id=row["source_id"],
                 params={"input_task_id": row["task_id"]})
        for pk, row in sorted(squares.items())
    ]
    return run_tasks(context, config, items,
                     lambda it: {"value": it.payload["value"] + config.offset},
                     table="astra_test.square_plus", batch=True, partition_range=first_last)


squares_job = dg.define_asset_job("squares_job", selection=[squares], partitions_def=SOURCE_BLOCKS)

defs = dg.Definitions(assets=[squares, squares_plus], jobs=[squares_job],
                      resources={"astra_io_manager": AstraIOManager()})


def materialize_squares(instance: dg.DagsterInstance, keys: list[str], config: dict | None = None,
                        ) -> dg.ExecuteInProcessResult:
    """One range run of ``squares`` over the blocks ``keys`` (first to last), in this process."""
    return dg.materialize([squares], instance=instance, resources={"astra_io_manager": AstraIOManager()},
                          run_config={"ops": {"squares": {"config": config}}} if config is not None else None,
                          tags={"dagster/asset_partition_range_start": keys[0],
                                "dagster/asset_partition_range_end": keys[-1]})
