"""``astra task rerun``: rebuild a task's Config from the database and run it again through Dagster."""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from astra_dagster.db.connection import connect
from astra_dagster.lineage.recreate import find_task, rebuild_config
from astra_dagster.lineage.sources import block_of
from astra_dagster.settings import get_settings


@dataclass(frozen=True)
class RerunReport:
    task_id: str
    task_pk: int
    run_id: str
    success: bool
    status_before: int
    status_after: int
    output_before: int | None
    output_after: int | None
    scope: str

    @property
    def recomputed(self) -> bool:
        return self.output_before != self.output_after or self.status_before != self.status_after

    def summary(self) -> str:
        what = "recomputed" if self.recomputed else "already succeeded: nothing recomputed"
        return (
            f"{self.task_id} (pk {self.task_pk}) re-created from its parameters; task_id round-trips.\n"
            f"Dagster run {self.run_id} over {self.scope}: "
            f"{'success' if self.success else 'FAILED'}; status_code {self.status_before} -> "
            f"{self.status_after}, output_pk {self.output_before} -> {self.output_after} ({what})."
        )


def rerun_task(ref: str, *, force: bool = False, instance: dg.DagsterInstance | None = None,
               log_level: str | None = None) -> RerunReport:
    """Re-create the task ``ref`` and run it (``log_level``, e.g. "WARNING", quiets Dagster's console)."""
    from astra_dagster.orchestration.build import asset_for_family, load_definitions, materialize_task
    from astra_dagster.orchestration.instance import get_instance

    with connect() as conn:
        record = find_task(conn, ref)
    config, extra = rebuild_config(record)  # raises unless the task_id round-trips
    defs = load_definitions()
    target = asset_for_family(defs, record.family)
    instance = instance or get_instance()

    updates: dict = {"force": force}
    tags: dict[str, str] = {}
    partition_key = None
    scope = "the task"
    if record.batch is not None:
        first, last = record.batch["partition_first"], record.batch["partition_last"]
        tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
        scope = f"partitions {first}...{last}"
        _ensure_partitions(instance, target, [first, last])
    elif record.source_pk is not None:
        partition_key = block_of(record.source_pk, get_settings().sources_per_partition)
        updates["only_sources"] = [extra["source_id"]]
        scope = f"source {extra['source_id']} in partition {partition_key}"
        _ensure_partitions(instance, target, [partition_key])
    config = type(config)(**{**config.model_dump(), **updates})
    result = materialize_task(config, instance=instance, partition_key=partition_key, tags=tags, defs=defs,
                              log_level=log_level)
    with connect() as conn:
        after = find_task(conn, str(record.pk))
    return RerunReport(
        task_id=record.task_id, task_pk=record.pk, run_id=result.run_id, success=result.success,
        status_before=record.status_code, status_after=after.status_code,
        output_before=record.output_pk, output_after=after.output_pk, scope=scope,
    )


def _ensure_partitions(instance: dg.DagsterInstance, target: dg.AssetsDefinition, keys: list[str]) -> None:
    partitions_def = target.partitions_def
    if isinstance(partitions_def, dg.DynamicPartitionsDefinition) and partitions_def.name:
        missing = [k for k in keys if not instance.has_dynamic_partition(partitions_def.name, k)]
        if missing:
            instance.add_dynamic_partitions(partitions_def.name, missing)
