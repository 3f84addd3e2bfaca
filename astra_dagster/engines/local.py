"""A pool of worker processes on this node, one job (a few sources) per worker at a time.

Not concurrent.futures: when one of its workers dies the whole pool breaks and every pending
job fails with it. Here each worker has its own pipe, so a worker that dies (segfault, OOM,
``kill -9``) costs exactly the job it held: its sources are retried one by one in a fresh worker,
and a source that kills a worker on its own fails alone (status 30, the cause named).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import sys
import types
from collections import deque
from collections.abc import Iterator, Sequence
from multiprocessing import forkserver
from multiprocessing.connection import Connection, wait
from typing import Any

from astra_dagster.engines.work import ItemResult, Work, run_job


def _worker_main(conn: Connection) -> None:
    # Ctrl-C goes to the whole process group: the step process decides what happens to the run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the step's process is gone: nothing to report to
            return
        if message is None:
            return
        work, items = message
        results = run_job(work, items)
        try:
            conn.send(results)
        except (EOFError, OSError):
            return
        except Exception as exc:  # a result that does not pickle fails its job, not the worker
            conn.send([ItemResult(None, f"result cannot be sent back: {type(exc).__name__}: {exc}", r.seconds)
                       for r in results])


@contextlib.contextmanager
def _main_not_imported(needed: bool) -> Iterator[None]:
    """multiprocessing re-imports the parent's ``__main__`` in every process it starts, for
    functions defined there. A worker's functions live in modules, and the parent's ``__main__``
    is the ``dagster`` CLI or a script that imports Dagster: ~0.8 s of every worker's start for
    nothing. Hidden while a worker starts, unless the work itself is defined in ``__main__``."""
    main = sys.modules.get("__main__")
    if needed or main is None:
        yield
        return
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class _Worker:
    def __init__(self, ctx: Any, work: Work):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="astra-worker")
        with _main_not_imported(work.module == "__main__"):
            self.process.start()
        child.close()
        self.job: tuple[list[int], list[Any], bool] | None = None

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


def _death(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _forkserver(work: Work) -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["astra_dagster.engines.work", work.module, *work.preload])
    return ctx


def start_forkserver(work: Work) -> None:
    """Start the forkserver now (it returns at once; the server imports the work's modules in
    its own process), so that a :class:`LocalPool` started later forks its workers from a ready
    server. Once started, a process's forkserver serves every later pool."""
    _forkserver(work)
    forkserver.ensure_running()


class LocalPool:
    """``workers`` processes (forkserver: they start from a clean interpreter that has imported
    the work's module and its ``preload`` once, not a fork of a threaded Dagster process)."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)

    def run(self, work: Work, jobs: Sequence[tuple[list[int], list[Any]]]
            ) -> Iterator[tuple[list[int], list[ItemResult]]]:
        """Yield (indices, results) per job as jobs finish, in any order."""
        ctx = _forkserver(work)
        pending: deque[tuple[list[int], list[Any], bool]] = deque((i, it, False) for i, it in jobs)
        pool: list[_Worker] = []
        try:
            pool = [_Worker(ctx, work) for _ in range(min(self.workers, len(pending)))]
            while pending or any(w.job for w in pool):
                for i, worker in enumerate(pool):
                    if worker.job is None and pending:
                        job = pending.popleft()
                        try:
                            worker.conn.send((work, job[1]))
                        except (OSError, ValueError):  # it died while idle: no source was lost
                            pending.appendleft(job)
                            worker.stop()
                            pool[i] = _Worker(ctx, work)
                            continue
                        worker.job = job
                busy = [w for w in pool if w.job]
                ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
                for i, worker in enumerate(pool):
                    if worker.job is None or not (worker.conn in ready or worker.process.sentinel in ready):
                        continue
                    indices, items, retried = worker.job
                    try:
                        results = worker.conn.recv()
                    except (EOFError, OSError):
                        results = None
                    if results is not None:
                        worker.job = None
                        yield indices, results
                        continue
                    worker.process.join(timeout=5)
                    cause = _death(worker.process)
                    worker.conn.close()
                    pool[i] = _Worker(ctx, work)
                    if len(items) > 1 or not retried:
                        # which of its sources killed it is unknown: each gets one more try, alone
                        pending.extendleft((([j], [item], True) for j, item in zip(indices, items, strict=True)))
                    else:
                        source = getattr(items[0], "source_id", None) or "its task"
                        yield indices, [ItemResult(None, f"worker process died ({cause}) while computing "
                                                         f"{source}", 0.0)]
        finally:
            for worker in pool:
                worker.stop()
