"""Running tasks inside one Dagster step: memoisation, batch parents, per-task timing and errors,
and results streamed to the database as they finish.

An asset body builds one :class:`TaskItem` per task (per source for partitioned assets) and calls
:func:`run_tasks`. Succeeded identical tasks are skipped (one query for the whole batch); the rest
get task rows (status 0, with their parameters) before any compute starts; each is timed on its
own and a failure is recorded against that task only.

For a batch (a per-source asset) the work runs on the configured engine (a pool of worker
processes by default, ``ASTRA_WORKERS``) and results, statuses and durations are written in
chunks as they finish (every ``ASTRA_LINEAGE_CHUNK`` sources or ``ASTRA_LINEAGE_SECONDS``), each
chunk one transaction: memory is bounded by the chunk, and a crash loses at most the chunks in
flight. While it works the step holds a lease on its run (``store.acquire_run_lease``); task rows
left at status 0 by a run that holds none are abandoned and are retried by the next run. The
returned :class:`TaskBatch` goes to the lineage IO manager, which closes the batch parent and
writes the materialisation metadata (and, for single tasks such as models, the result itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import psycopg

from astra_dagster.db.connection import connect
from astra_dagster.db.connection import database_url as default_database_url
from astra_dagster.db.schema import ensure_schema
from astra_dagster.engines.work import ChunkResult, ItemResult, Work, run_job
from astra_dagster.lineage import store
from astra_dagster.lineage.config import AstraConfig
from astra_dagster.lineage.identity import TaskIdentity
from astra_dagster.lineage.items import TaskItem
from astra_dagster.orchestration.guard import guard_step
from astra_dagster.settings import Execution, get_execution

__all__ = ["ChunkResult", "TaskBatch", "TaskItem", "Work", "run_tasks"]


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
    #: Outcomes the IO manager still has to write (single tasks; streamed batches leave none).
    outcomes: list[store.Outcome]
    parent_pk: int | None = None
    parent_task_id: str | None = None
    partition_first: str | None = None
    partition_last: str | None = None
    #: (task_pk, task_id) of the only task, for unpartitioned single tasks.
    single_task: tuple[int, str] | None = None
    task_ids: list[str] = field(default_factory=list)
    #: What the streamed chunks already wrote (results, failures, finished elsewhere meanwhile).
    streamed: store.FinishReport = field(default_factory=lambda: store.FinishReport(0, 0, 0))
    run_id: str | None = None
    #: The run lease the IO manager releases once the parent is closed.
    lease: bool = False


def _item_params(item: TaskItem) -> dict[str, Any]:
    extra = dict(item.params)
    if item.source_id is not None:
        extra["source_id"] = item.source_id
    return extra


def _as_work(compute: Callable[[TaskItem], Any] | Work,
             compute_chunk: Callable[[list[TaskItem]], list[ChunkResult]] | None, chunk_size: int) -> Work:
    if isinstance(compute, Work):
        return compute
    # A closure: it runs in this process only (it cannot be sent to a worker).
    return Work(function=lambda _state, item: compute(item),
                chunk_function=(lambda _state, items: compute_chunk(items)) if compute_chunk else None,
                chunk_size=chunk_size)


def run_tasks(
    context: dg.AssetExecutionContext | dg.OpExecutionContext,
    config: AstraConfig,
    items: Sequence[TaskItem],
    compute: Callable[[TaskItem], Mapping[str, Any]] | Work,
    *,
    table: str,
    batch: bool,
    partition_range: tuple[str, str] | None = None,
    database_url: str | None = None,
    log_every_seconds: float = 30.0,
    compute_chunk: Callable[[list[TaskItem]], list[ChunkResult]] | None = None,
    chunk_size: int = 64,
    execution: Execution | None = None,
) -> TaskBatch:
    """Run ``compute`` for every item whose identical task has not already succeeded.

    ``compute`` is a :class:`Work` (it can run on worker processes: a batch uses the engine of
    ``ASTRA_WORKERS`` / ``ASTRA_ENGINE``) or a plain callable ``compute(item)`` (it runs in this
    process). Either returns the result row (column → value) for the method table ``table``; an
    exception fails that task only. With ``batch=True`` the step gets a parent task (its identity
    includes the run: two runs are two batches) linked in ``astra.batch_interface`` to every task
    of its items, and results are streamed in chunks; with ``batch=False`` (single tasks such as
    a model) the result goes to the IO manager.

    ``compute_chunk`` (with a callable ``compute``) computes up to ``chunk_size`` items at once,
    for methods much faster vectorised (a :class:`Work` carries its own ``chunk_function``).
    """
    started = time.perf_counter()
    url = database_url or default_database_url()
    guard_step(context, url)  # stops the work if the parent process or the database dies
    ensure_schema(url)
    execution = execution or get_execution()
    log = context.log
    work = _as_work(compute, compute_chunk, chunk_size)
    only = set(getattr(config, "only_sources", None) or [])
    if only:
        items = [it for it in items if it.source_id in only]
    identities = config.identities([_item_params(it) for it in items])
    module, family = config.task_module(), config.task_family
    asset_key = context.asset_key.to_user_string() if _has_asset(context) else None
    first, last = partition_range or (None, None)
    run_id = context.run_id

    with connect(url) as conn:
        existing = store.find_tasks(conn, module, [i.task_hash for i in identities])
        done = {} if config.force else {h: r for h, r in existing.items() if r.status_code == store.STATUS_SUCCESS}
        unfinished = [r for h, r in existing.items() if r.status_code == store.STATUS_CREATED and h not in done]
        live = store.live_runs(conn, [r.run_id for r in unfinished])
    to_run = [(it, ident) for it, ident in zip(items, identities, strict=True)
              if ident.task_hash not in done]
    result = TaskBatch(
        table=table, module=module, family=family, force=config.force, started=started,
        n_items=len(items), n_skipped=len(items) - len(to_run), outcomes=[],
        partition_first=first, partition_last=last,
        task_ids=[i.task_id for i in identities], run_id=run_id,
    )
    if not batch and len(items) == 1 and not to_run:
        row = done[identities[0].task_hash]
        result.single_task = (row.pk, identities[0].task_id)
    if not to_run:
        log.info(f"{family}: all {len(items)} task(s) already succeeded; nothing to compute")
        return result
    abandoned = [r for r in unfinished if r.run_id not in live]
    if abandoned:
        runs = sorted({(r.run_id or "unknown")[:8] for r in abandoned})
        log.info(f"{family}: retrying {len(abandoned)} task(s) abandoned at status_code 0 by dead run(s) "
                 f"{', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''}")
    if len(unfinished) > len(abandoned):
        log.info(f"{family}: {len(unfinished) - len(abandoned)} task(s) are being computed by another live run "
                 "too; whichever finishes first writes the result")

    parent: TaskIdentity | None = None
    if batch:
        children_digest = hashlib.sha256(
            "\n".join(sorted(i.task_hash for i in identities)).encode()
        ).hexdigest()
        parent = config.identity({"batch_first": first or "", "batch_last": last or "",
                                  "batch_children": children_digest, "batch_run_id": run_id})
    if batch and _local_pool(execution, work, len(to_run)):
        # the pool's forkserver imports the method's science while the tasks are claimed
        from astra_dagster.engines.local import start_forkserver

        start_forkserver(work)
    # Held before any row is claimed (a status-0 row of a live run is never taken for abandoned),
    # until the IO manager has closed the batch or written the single task.
    store.acquire_run_lease(url, run_id)
    result.lease = True
    try:
        rows = _retry_deadlocks(lambda: _claim(url, to_run, parent, asset_key, run_id, done, result, first, last,
                                               len(items)))
        if not batch and len(items) == 1:
            result.single_task = (rows[identities[0].task_hash].pk, identities[0].task_id)

        log.info(
            f"{family}: computing {len(to_run)} task(s), {result.n_skipped} already succeeded"
            + (f" (batch {parent.task_id})" if parent else "")
        )
        pks = [rows[ident.task_hash].pk for _, ident in to_run]
        if not batch:
            for (item, ident), pk, res in zip(to_run, pks, _serial(work, [it for it, _ in to_run], log),
                                              strict=True):
                result.outcomes.append(_outcome(pk, item, ident, res, log))
            return result
        _stream(context, work, to_run, pks, result, url, execution, log_every_seconds)
    except BaseException as exc:
        if result.parent_pk is not None:
            _fail_parent(url, result, exc)
        if result.lease:
            store.release_run_lease(run_id)
            result.lease = False
        raise
    return result


def _claim(url: str, to_run: list[tuple[TaskItem, TaskIdentity]], parent: TaskIdentity | None,
           asset_key: str | None, run_id: str, done: dict[str, store.TaskRow], result: TaskBatch,
           first: str | None, last: str | None, n_items: int) -> dict[str, store.TaskRow]:
    """Task rows (status 0) for what this run computes, and its batch parent with its links."""
    with connect(url) as conn, conn.transaction():
        run_identities = [ident for _, ident in to_run]
        rows = store.create_tasks(
            conn,
            run_identities + ([parent] if parent else []),
            source_pks=[it.source_pk for it, _ in to_run] + ([None] if parent else []),
            asset_key=asset_key,
            run_id=run_id,
        )
        if parent is not None:
            parent_row = rows[parent.task_hash]
            result.parent_pk = parent_row.pk
            result.parent_task_id = parent.task_id
            # every task the batch covered, computed or skipped: links = n_sources
            store.link_batch(conn, parent_row, [rows[i.task_hash].pk for i in run_identities]
                             + [r.pk for r in done.values()])
            store.start_batch(conn, parent_row.pk, partition_first=first, partition_last=last,
                              n_sources=n_items, n_skipped=result.n_skipped)
    return rows


def _retry_deadlocks(fn: Callable[[], Any], attempts: int = 5) -> Any:
    """Run one whole transaction again when PostgreSQL aborted it as a deadlock victim: concurrent
    runs over the same sources lock task rows in different orders (claiming vs finishing)."""
    for attempt in range(attempts):
        try:
            return fn()
        except psycopg.errors.DeadlockDetected:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _outcome(pk: int, item: TaskItem, ident: TaskIdentity, res: ItemResult, log: Any) -> store.Outcome:
    if res.error is not None:  # one bad source must not fail the batch
        log.warning(f"{ident.task_id} ({item.source_id or 'no source'}) failed: {res.error}")
        if res.traceback:
            log.debug(res.traceback)
        return store.Outcome(task_pk=pk, status_code=store.STATUS_FAILURE, duration=res.seconds,
                             error=res.error, result=None)
    return store.Outcome(task_pk=pk, status_code=store.STATUS_SUCCESS, duration=res.seconds, result=res.row)


def _serial(work: Work, items: list[TaskItem], log: Any) -> Iterator[ItemResult]:
    step = max(1, work.chunk_size) if work.chunk_function is not None else 1
    for start in range(0, len(items), step):
        yield from run_job(work, items[start:start + step], local=True, log=log.warning)


def _jobs(work: Work, n: int, workers: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Index lists of the jobs: chunks for vectorised work; otherwise a few sources each, so
    every worker gets several jobs (balance) and a dead worker costs few sources, and smaller
    jobs towards the end (guided), so that no worker idles long while another ends a big one.
    ``order``: the indices in the order to compute them (default: as given)."""
    order = list(range(n)) if order is None else list(order)
    if work.chunk_function is not None:
        size = max(1, work.chunk_size)
        return [order[s:s + size] for s in range(0, n, size)]
    cap = max(1, min(8, n // (workers * 4)))
    jobs, start = [], 0
    while start < n:
        size = max(1, min(cap, (n - start) // (workers * 4)))
        jobs.append(order[start:start + size])
        start += size
    return jobs


def _local_pool(execution: Execution, work: Work, n_items: int) -> bool:
    return (execution.engine != "dask" and execution.workers > 1 and n_items > 1
            and work.function.__name__ != "<lambda>")


def _engine(execution: Execution, work: Work, n_items: int) -> Any | None:
    """The engine for this batch, or None to compute in the step's process."""
    if execution.engine == "dask":
        from astra_dagster.engines.dask import DaskEngine

        return DaskEngine.shared(execution)
    if not _local_pool(execution, work, n_items):
        return None
    from astra_dagster.engines.local import LocalPool

    return LocalPool(execution.workers)


def _results(work: Work, items: list[TaskItem], engine: Any, workers: int, log: Any
             ) -> Iterator[tuple[int, ItemResult]]:
    if engine is None:
        yield from enumerate(_serial(work, items, log))
        return
    order = None
    if work.cost is not None:  # costliest first: the last jobs are the quickest
        order = sorted(range(len(items)), key=lambda i: -work.cost(items[i]))
    jobs = [(indices, [items[i] for i in indices]) for indices in _jobs(work, len(items), workers, order)]
    for indices, results in engine.run(work, jobs):
        yield from zip(indices, results, strict=True)


def _stream(context: Any, work: Work, to_run: list[tuple[TaskItem, TaskIdentity]], pks: list[int],
            result: TaskBatch, url: str, execution: Execution, log_every_seconds: float) -> None:
    log = context.log
    family = result.family
    engine = _engine(execution, work, len(to_run))
    workers = getattr(engine, "workers", 1) if engine is not None else 1
    where = "in the step's process" if engine is None else f"on {engine.describe()}" if hasattr(
        engine, "describe") else f"on {workers} worker processes"
    log.info(f"{family}: {len(to_run)} task(s) {where}; results written every {execution.chunk_sources} "
             f"sources or {execution.chunk_seconds:g} s")
    buffer: list[store.Outcome] = []
    written = failed = already = n = 0
    last_flush = last_log = time.monotonic()

    def flush() -> None:
        nonlocal written, failed, already, last_flush
        if not buffer:
            return
        def write() -> store.FinishReport:
            with connect(url) as conn:
                return store.write_chunk(conn, result.table, buffer, parent_pk=result.parent_pk,
                                         run_id=result.run_id, force=result.force)

        report = _retry_deadlocks(write)
        written, failed, already = written + report.written, failed + report.failed, already + report.already_done
        result.streamed = store.FinishReport(written, failed, already)
        buffer.clear()
        last_flush = time.monotonic()

    items = [it for it, _ in to_run]
    for index, res in _results(work, items, engine, workers, log):
        item, ident = to_run[index]
        buffer.append(_outcome(pks[index], item, ident, res, log))
        n += 1
        now = time.monotonic()
        if len(buffer) >= execution.chunk_sources or now - last_flush >= execution.chunk_seconds:
            flush()
            if now - last_log >= log_every_seconds:
                last_log = now
                log.info(f"{family}: {n}/{len(to_run)} done and written ({written} computed, {failed} failed"
                         + (f", {already} finished by another run" if already else "") + ")")
    flush()
    log.info(f"{family}: {n}/{len(to_run)} done and written ({written} computed, {failed} failed"
             + (f", {already} finished by another run" if already else "") + ")")


def _fail_parent(url: str, result: TaskBatch, exc: BaseException) -> None:
    # the database itself may be what failed; the run's own error says so
    with contextlib.suppress(Exception), connect(url) as conn:
        store.fail_task(conn, result.parent_pk, f"{type(exc).__name__}: {exc}",
                        time.perf_counter() - result.started)


def _has_asset(context: Any) -> bool:
    try:
        context.asset_key  # noqa: B018 - raises for op contexts without an asset
    except Exception:
        return False
    return True
