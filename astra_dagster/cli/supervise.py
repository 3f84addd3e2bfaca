"""Run a command as the root of a process tree that ends with it: ``astra ui``'s ``dagster dev``.

``dagster dev`` starts the webserver, the daemon and a code server, and the code server starts a
run worker per run. Stopping only ``dagster dev`` left all of them running (issue #13 point 9), so
the command runs in a session of its own (its pid is the group and session id), a SIGINT, SIGTERM
or SIGHUP to this process is forwarded to that group, and after a grace period every process that
is left is killed: the group, the session, and every descendant ever seen, which also catches
processes that moved to a group of their own or were re-parented after their parent died.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

import psutil

#: Seconds the tree has for a clean shutdown before what is left gets SIGKILL.
GRACE_SECONDS = 10.0
#: Seconds between looks at the tree (descendants are remembered, so orphans are still known).
POLL_SECONDS = 1.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Stopped:
    """How a supervised tree ended: the command's exit code (or the signal's 128 + n), the
    signal that stopped it (None: the command exited by itself), how many processes there were
    and how many had to be killed, and how long the stop took."""

    returncode: int
    signal: signal.Signals | None
    processes: int
    killed: int
    seconds: float
    grace: float = GRACE_SECONDS

    def message(self, what: str) -> str:
        if self.signal is None:
            return f"{what} exited with code {self.returncode}" + (
                f"; killed {self.killed} process(es) it left behind" if self.killed else "")
        how = (f", {self.killed} killed after the {self.grace:g} s grace period" if self.killed
               else "")
        return (f"stopped {what} on {self.signal.name}: {self.processes} process(es) gone in "
                f"{self.seconds:.1f} s{how}")


def _descendants(root: psutil.Process) -> list[psutil.Process]:
    try:
        return root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _session_members(sid: int) -> list[psutil.Process]:
    """Processes still in session ``sid`` (a descendant that changed its group keeps its session
    unless it called setsid, and keeps it even when re-parented to init)."""
    members = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError, psutil.Error):
            if pid != os.getpid() and os.getsid(pid) == sid:
                members.append(psutil.Process(pid))
    return members


def _alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The running ones, once each (the same process may be a descendant and a session member)."""
    alive: dict[int, psutil.Process] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            # is_running() also checks the creation time, so a reused pid is not "alive"
            if proc.pid not in alive and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive[proc.pid] = proc
    return list(alive.values())


def _signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)  # psutil refuses if the pid now names another process


def run_tree(cmd: Sequence[str], env: Mapping[str, str] | None = None, *, grace: float = GRACE_SECONDS) -> Stopped:
    """Run ``cmd`` in its own session until it exits or this process gets SIGINT/SIGTERM/SIGHUP
    (forwarded to its group); then give the tree ``grace`` seconds and SIGKILL what is left.
    A second signal skips the rest of the grace period."""
    received: list[signal.Signals] = []
    received_at: list[float] = []
    child: list[subprocess.Popen] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))
        received_at.append(time.monotonic())
        if child:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child[0].pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, start_new_session=True)
        child.append(proc)
        root = psutil.Process(proc.pid)
        seen: dict[int, psutil.Process] = {}
        while not received:
            # Keep the ones still running (so the count below is the tree as it was) plus the new.
            seen = {p.pid: p for p in _alive([*seen.values(), *_descendants(root)])}
            try:
                returncode = proc.wait(timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            returncode = None
        # The grace period and the reported time count from the signal (the loop notices it late).
        started = received_at[0] if received_at else time.monotonic()
        # The count: the tree as last seen (some of it may have ended on the forwarded signal).
        count = len({*seen, *(p.pid for p in _descendants(root))}) + (1 if returncode is None else 0)
        tree = _alive([*seen.values(), *_descendants(root), *_session_members(proc.pid)])
        if returncode is not None and not received:
            # dagster dev ended by itself: nothing should outlive it either, but no grace to wait
            leftover = _alive(tree)
            _signal_all(leftover, signal.SIGKILL)
            return Stopped(returncode, None, count, len(leftover), 0.0)
        # A descendant outside the group (its own group or session) got nothing yet: tell it too.
        _signal_all([p for p in tree if _pgid(p) != proc.pid], signal.SIGTERM)
        deadline = started + grace
        while time.monotonic() < deadline and len(received) < 2:
            if proc.poll() is not None and not _alive(tree):
                break
            time.sleep(0.2)
        leftover = _alive(tree)
        root_left = proc.poll() is None
        if root_left or leftover:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            _signal_all([*leftover, *_session_members(proc.pid)], signal.SIGKILL)
        killed = len(leftover) + root_left
        code = proc.wait()
        psutil.wait_procs(leftover, timeout=5)
        return Stopped(code if code >= 0 else 128 - code, received[0], count, killed,
                       time.monotonic() - started, grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None
