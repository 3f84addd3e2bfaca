"""A watchdog for the process that runs a step's tasks: it stops the work, promptly and with one
clear line, when the run can no longer be recorded truthfully.

Two faults are watched while :func:`astra_dagster.lineage.batch.run_tasks` is on the main
thread's stack (and only then: an idle process is not probed):

* **The parent process is gone.** A step of Dagster's multiprocess executor is a child of the
  process that orchestrates the run (``dagster asset materialize``, an ``astra`` command, a run
  worker). When that one is killed the child used to go on and commit every result under a run
  that Dagster shows as killed or, forever, as started. Now the child marks the run failed,
  stops its step and writes no more results.
* **The database is gone.** The Astra server is probed every :data:`PROBE_SECONDS`; after two
  failed probes the step stops with ``database unreachable at <url>: <reason>``, instead of
  computing on for hours with nowhere to write.

The stop is :class:`StepAborted`, raised in the main thread from a signal handler. It derives
from ``BaseException`` so that the per-source ``except Exception`` of ``run_tasks`` (one bad
source must not fail the batch) cannot mistake it for one source's failure.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

#: Seconds between checks of the parent process and between database probes.
PROBE_SECONDS = 1.0
#: Consecutive failed database probes before the step is stopped.
FAILED_PROBES = 2
#: After the stop is delivered, seconds the process may take to record it before it is ended.
EXIT_GRACE_SECONDS = 30.0

_SIGNAL = signal.SIGUSR1
#: The code that lives inside ``run_tasks``; an abort waits while the main thread is inside
#: these modules (a transaction half-written is rolled back, but better not to interrupt one).
_GUARDED = "run_tasks"
_DEFER_MODULES = ("astra_dagster.lineage.store", "astra_dagster.db.connection", "psycopg")


class StepAborted(BaseException):
    """The step's process stopped its work: its parent died or its database went away."""


class _Guard:
    def __init__(self) -> None:
        #: What to raise in the main thread (cleared once raised, unless orphaned).
        self.problem: StepAborted | None = None
        #: Set for good once the parent is gone: connect() refuses from then on.
        self.orphaned: StepAborted | None = None
        self.database_url: str | None = None
        self.context: Any = None
        self._parent = multiprocessing.parent_process()
        self._main = threading.main_thread()
        self._conn: Any = None
        self._failed_probes = 0
        threading.Thread(target=self._watch, name="astra-step-guard", daemon=True).start()

    # ------------------------------------------------------------------ the watching thread

    def _watch(self) -> None:
        while True:
            time.sleep(PROBE_SECONDS)
            try:
                if self.problem is None and self.orphaned is None and _in_run_tasks(self._main):
                    self._check()
                if self.problem is not None:
                    self._deliver()
            except Exception as exc:  # the guard must never take the step down by itself
                sys.stderr.write(f"astra: step guard: {type(exc).__name__}: {exc}\n")

    def _check(self) -> None:
        if self._parent is not None and not self._parent.is_alive():
            self._abort(
                f"the process that ran this step (pid {self._parent.pid}) is gone: the run is "
                "marked failed and this step stopped before writing any more results",
                orphaned=True,
            )
            return
        if self.database_url is None:
            return
        reason = self._probe(self.database_url)
        self._failed_probes = 0 if reason is None else self._failed_probes + 1
        if self._failed_probes >= FAILED_PROBES:
            from astra_dagster.db.connection import mark_down, unreachable

            mark_down(self.database_url)
            self._abort(str(unreachable(self.database_url, reason or "no answer")))

    def _probe(self, url: str) -> str | None:
        import psycopg

        from astra_dagster.db.connection import _first_line

        reason = None
        for _ in range(2):  # a connection that broke says "connection is bad": reconnect for the reason
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = psycopg.connect(url, connect_timeout=2, autocommit=True)
                self._conn.execute("select 1")
                return None
            except psycopg.Error as exc:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
                reason = _first_line(exc)
        return reason

    def _abort(self, message: str, *, orphaned: bool = False) -> None:
        self.problem = StepAborted(message)
        if orphaned:
            # Nobody reads the dead parent's pipes: say it where a terminal may still see it.
            sys.stderr.write(f"astra: {message}\n")
            self.orphaned = self.problem
            self._fail_run(message)
            # Nobody is left to read this process's output or wait for it: end it even if the
            # step cannot be interrupted (e.g. inside a long C call).
            threading.Timer(EXIT_GRACE_SECONDS, os._exit, args=(1,)).start()

    def _fail_run(self, message: str) -> None:
        """Mark the Dagster run failed: its orchestrating process, which would have, is dead."""
        context = self.context
        if context is None:
            return
        instance = context.instance
        run = instance.get_run_by_id(context.run_id)
        if run is not None and not run.is_finished:
            instance.report_run_failed(run, message)

    def _deliver(self) -> None:
        if not self._main.is_alive():
            return
        frame = sys._current_frames().get(self._main.ident)
        if frame is None or not _on_stack(frame, _GUARDED):
            # run_tasks has returned. Orphaned: connect() refuses from here on (aborted()).
            # Database: the next connect() fails fast by itself, and a later run may find the
            # server back.
            self._reset()
            return
        if _in_modules(frame, _DEFER_MODULES):
            return  # mid-statement: try again at the next tick
        signal.pthread_kill(self._main.ident, _SIGNAL)

    # ------------------------------------------------------------------ the main thread

    def on_signal(self, _signum: int, frame: FrameType | None) -> None:
        if self.problem is None:
            return
        if frame is None or not _on_stack(frame, _GUARDED) or _in_modules(frame, _DEFER_MODULES):
            return
        problem = self.problem
        self._reset()
        raise problem

    def _reset(self) -> None:
        self.problem = None
        self._failed_probes = 0


def _on_stack(frame: FrameType | None, name: str) -> bool:
    while frame is not None:
        if frame.f_code.co_name == name and frame.f_globals.get("__name__") == "astra_dagster.lineage.batch":
            return True
        frame = frame.f_back
    return False


def _in_modules(frame: FrameType | None, prefixes: tuple[str, ...]) -> bool:
    # Only the innermost frames matter: the statement being executed right now.
    for _ in range(12):
        if frame is None:
            return False
        if str(frame.f_globals.get("__name__", "")).startswith(prefixes):
            return True
        frame = frame.f_back
    return False


def _in_run_tasks(main: threading.Thread) -> bool:
    frame = sys._current_frames().get(main.ident)
    return frame is not None and _on_stack(frame, _GUARDED)


_guard: _Guard | None = None
_guard_pid: int | None = None
_lock = threading.Lock()


def guard_step(context: Any, database_url: str | None = None) -> None:
    """Watch this process's parent and database while ``run_tasks`` runs (call it from there).

    A no-op off the main thread (signal handlers can only be installed there).
    """
    global _guard, _guard_pid
    if threading.current_thread() is not threading.main_thread():
        return
    from astra_dagster.db.connection import database_url as default_url

    with _lock:
        if _guard is None or _guard_pid != os.getpid():
            _guard, _guard_pid = _Guard(), os.getpid()
            signal.signal(_SIGNAL, _guard.on_signal)
        _guard.context = context
        _guard.database_url = database_url or default_url()


def aborted() -> StepAborted | None:
    """The reason this process stopped its step's work, or None. Checked by ``connect()`` so that
    nothing more reaches the Astra database once the parent is gone."""
    guard = _guard if _guard_pid == os.getpid() else None
    return guard.orphaned if guard is not None else None
