"""Running tasks inside one Dagster step: memoisation, batch parents, per-task timing and errors.

An asset body builds one :class:`TaskItem` per task (per source for partitioned assets) and calls
:func:`run_tasks`. Succeeded identical tasks are skipped (one query for the whole batch); the rest
get task rows (status 0, with their parameters) before any compute starts; each is timed on its
own and a failure is recorded against that task only. The returned :class:`TaskBatch` goes to the
lineage IO manager, which writes every result and status in one transaction.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from astra_dagster.db.connection import connect
from astra_dagster.db.schema import ensure_schema
from astra_dagster.lineage import store
from astra_dagster.lineage.config import AstraConfig
from astra_dagster.lineage.identity import TaskIdentity
from astra_dagster.orchestration.guard import guard_step


@dataclass
class TaskItem:
    """One unit of work: usually one source with its input spectra."""

    payload: Any = None
    source_pk: int | None = None
    source_id: str | None = None
    #: Extra identity parameters besides the config (e.g. an input fingerprint, a model task_id).
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class TaskBatch:
    """What an asset hands to the lineage IO manager."""

    table: str
    module: str
    family: str
    force: bool
    started: float
    n_items: int
    n_skipped: int
    outcomes: list[store.Outcome]
    parent_pk: int | None = None
    parent_task_id: str | None = None
    partition_first: str | None = None
    partition_last: str | None = None
    #: (task_pk, task_id) of the only task, for unpartitioned single-task assets.
    single_task: tuple[int, str] | None = None
    task_ids: list[str] = field(default_factory=list)


@dataclass
class ChunkResult:
    """What a chunk computation returns per item: its row or its exception, and its seconds
    (its own work plus its share of any shared, vectorised work)."""

    row: Mapping[str, Any] | None
    error: BaseException | None
    seconds: float


def _item_params(item: TaskItem) -> dict[str, Any]:
    extra = dict(item.params)
    if item.source_id is not None:
        extra["source_id"] = item.source_id
    return extra


def run_tasks(
    context: dg.AssetExecutionContext | dg.OpExecutionContext,
    config: AstraConfig,
    items: Sequence[TaskItem],
    compute: Callable[[TaskItem], Mapping[str, Any]],
    *,
    table: str,
    batch: bool,
    partition_range: tuple[str, str] | None = None,
    database_url: str | None = None,
    log_every_seconds: float = 30.0,
    compute_chunk: Callable[[list[TaskItem]], list[ChunkResult]] | None = None,
    chunk_size: int = 64,
) -> TaskBatch:
    """Run ``compute`` for every item whose identical task has not already succeeded.

    ``compute(item)`` returns the result row (column → value) for the method table ``table``; an
    exception fails that task only. With ``batch=True`` the step gets a parent task and every task
    it runs becomes a child in ``astra.batch_interface``.

    ``compute_chunk`` (optional) computes up to ``chunk_size`` items at once, for methods that are
    much faster vectorised; it reports each item's row or exception and seconds. If the chunk call
    itself raises, its items are computed one by one with ``compute``, so one bad input still
    fails only its own task.
    """
    started = time.perf_counter()
    guard_step(context, database_url)  # stops the work if the parent process or the database dies
    ensure_schema(database_url)
    log = context.log
    only = set(getattr(config, "only_sources", None) or [])
    if only:
        items = [it for it in items if it.source_id in only]
    identities = config.identities([_item_params(it) for it in items])
    module, family = config.task_module(), config.task_family
    asset_key = context.asset_key.to_user_string() if _has_asset(context) else None
    first, last = partition_range or (None, None)

    with connect(database_url) as conn:
        done = {} if config.force else store.find_succeeded(
            conn, module, [i.task_hash for i in identities]
        )
    to_run = [(it, ident) for it, ident in zip(items, identities, strict=True)
              if ident.task_hash not in done]
    result = TaskBatch(
        table=table, module=module, family=family, force=config.force, started=started,
        n_items=len(items), n_skipped=len(items) - len(to_run), outcomes=[],
        partition_first=first, partition_last=last,
        task_ids=[i.task_id for i in identities],
    )
    if not batch and len(items) == 1 and not to_run:
        row = done[identities[0].task_hash]
        result.single_task = (row.pk, identities[0].task_id)
    if not to_run:
        log.info(f"{family}: all {len(items)} task(s) already succeeded; nothing to compute")
        return result

    parent: TaskIdentity | None = None
    if batch:
        children_digest = hashlib.sha256(
            "\n".join(sorted(i.task_hash for i in identities)).encode()
        ).hexdigest()
        parent = config.identity(
            {"batch_first": first or "", "batch_last": last or "", "batch_children": children_digest}
        )
    with connect(database_url) as conn, conn.transaction():
        run_identities = [ident for _, ident in to_run]
        rows = store.create_tasks(
            conn,
            run_identities + ([parent] if parent else []),
            source_pks=[it.source_pk for it, _ in to_run] + ([None] if parent else []),
            asset_key=asset_key,
            run_id=context.run_id,
        )
        if parent is not None:
            parent_row = rows[parent.task_hash]
            result.parent_pk = parent_row.pk
            result.parent_task_id = parent.task_id
            store.link_batch(conn, parent_row, [rows[i.task_hash].pk for i in run_identities])
    if not batch and len(items) == 1:
        result.single_task = (rows[identities[0].task_hash].pk, identities[0].task_id)

    log.info(
        f"{family}: computing {len(to_run)} task(s), {result.n_skipped} already succeeded"
        + (f" (batch {parent.task_id})" if parent else "")
    )
    last_log = time.monotonic()
    failures = 0
    n = 0
    step = max(1, chunk_size) if compute_chunk is not None else 1
    for start in range(0, len(to_run), step):
        chunk = to_run[start:start + step]
        for (item, ident), (row, exc, seconds) in zip(chunk, _compute(chunk, compute, compute_chunk, log),
                                                        strict=True):
            n += 1
            status, error = store.STATUS_SUCCESS, None
            if exc is not None:  # one bad source must not fail the batch
                row, status = None, store.STATUS_FAILURE
                error = f"{type(exc).__name__}: {exc}"
                failures += 1
                log.warning(f"{ident.task_id} ({item.source_id or 'no source'}) failed: {error}")
                log.debug("".join(traceback.format_exception(exc)))
            result.outcomes.append(store.Outcome(
                task_pk=rows[ident.task_hash].pk, status_code=status, duration=seconds, error=error, result=row,
            ))
            if time.monotonic() - last_log > log_every_seconds or n == len(to_run):
                last_log = time.monotonic()
                log.info(f"{family}: {n}/{len(to_run)} computed, {failures} failed")
    return result


def _compute_one(item: TaskItem, compute: Callable[[TaskItem], Mapping[str, Any]]
                 ) -> tuple[Mapping[str, Any] | None, Exception | None, float]:
    t0 = time.perf_counter()
    try:
        return compute(item), None, time.perf_counter() - t0
    except Exception as exc:
        return None, exc, time.perf_counter() - t0


def _compute(
    chunk: list[tuple[TaskItem, TaskIdentity]],
    compute: Callable[[TaskItem], Mapping[str, Any]],
    compute_chunk: Callable[[list[TaskItem]], list[ChunkResult]] | None,
    log: Any,
) -> list[tuple[Mapping[str, Any] | None, Exception | None, float]]:
    items = [item for item, _ in chunk]
    if compute_chunk is not None:
        try:
            results = compute_chunk(items)
            if len(results) != len(items):
                raise RuntimeError(f"compute_chunk returned {len(results)} results for {len(items)} items")
            return [(r.row, r.error, r.seconds) for r in results]
        except Exception as exc:  # one by one instead: the per-item calls say which input is at fault
            log.warning(f"a chunk of {len(items)} tasks failed as a whole ({type(exc).__name__}: {exc}); "
                        "computing them one by one")
    return [_compute_one(item, compute) for item in items]


def _has_asset(context: Any) -> bool:
    try:
        context.asset_key  # noqa: B018 - raises for op contexts without an asset
    except Exception:
        return False
    return True
