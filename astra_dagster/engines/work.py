"""Per-source work that can run in another process, and the function a worker runs for a job.

Free of Dagster on purpose: a worker process imports only this module and the work's own module.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChunkResult:
    """What a chunk computation returns per item: its row or its exception, and its seconds
    (its own work plus its share of any shared, vectorised work)."""

    row: Mapping[str, Any] | None
    error: BaseException | None
    seconds: float


@dataclass
class ItemResult:
    """One item's outcome as it travels back from a worker: errors as text (any exception can be
    reported, picklable or not)."""

    row: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
    error: str | None
    seconds: float
    traceback: str | None = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Work:
    """``function(state, item)`` → one result row (or a list of rows) per item.

    ``state`` is what the work needs besides the item (config, model, templates). In the step's
    own process it is ``state`` as given; a worker process builds it once with
    ``setup(*setup_args)`` (e.g. reading the model from its file) and keeps it for every job of
    the same work, so a model is loaded once per process, not once per source. Without ``setup``
    the state itself travels to the workers (it must then pickle).

    ``chunk_function(state, items)`` (optional) computes up to ``chunk_size`` items at once for
    methods much faster vectorised; if it raises, its items are computed one by one, so one bad
    input still fails only its own task.
    """

    function: Callable[[Any, Any], Any]
    state: Any = None
    setup: Callable[..., Any] | None = None
    setup_args: tuple = ()
    chunk_function: Callable[[Any, list[Any]], list[ChunkResult]] | None = None
    chunk_size: int = 64
    #: Modules a worker process needs besides the function's own (the method's science, which
    #: the function imports lazily): imported once before the workers start, not once in each.
    preload: tuple[str, ...] = ()
    #: A relative estimate of an item's cost (e.g. its number of visits): a pool starts the
    #: costliest first, so that the range does not end on one worker finishing a big source.
    cost: Callable[[Any], float] | None = None
    #: Names this work's state in a worker's cache (a new Work, a new state).
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.setup is not None:
            state["state"] = None  # rebuilt by setup() in the worker, never pickled
        return state

    @property
    def module(self) -> str:
        return self.function.__module__


_states: dict[str, Any] = {}
_states_lock = threading.Lock()


def _state_of(work: Work, local: bool) -> Any:
    if local and (work.state is not None or work.setup is None):
        return work.state
    with _states_lock:
        if work.key not in _states:
            _states.clear()  # one work at a time per worker: do not keep old models alive
            _states[work.key] = work.setup(*work.setup_args) if work.setup else work.state
        return _states[work.key]


def _one(function: Callable[[Any, Any], Any], state: Any, item: Any) -> ItemResult:
    t0 = time.perf_counter()
    try:
        return ItemResult(function(state, item), None, time.perf_counter() - t0)
    except Exception as exc:  # one bad source fails only its own task
        return ItemResult(None, _describe(exc), time.perf_counter() - t0,
                          "".join(traceback.format_exception(exc)))


def run_job(work: Work, items: list[Any], local: bool = False, log: Callable[[str], None] | None = None
            ) -> list[ItemResult]:
    """Compute ``items`` (in this process); one result per item, in order."""
    try:
        state = _state_of(work, local)
    except Exception as exc:  # e.g. the model file cannot be read here: every item says so
        error, tb = f"worker set-up failed: {_describe(exc)}", "".join(traceback.format_exception(exc))
        return [ItemResult(None, error, 0.0, tb) for _ in items]
    if work.chunk_function is not None:
        try:
            results = work.chunk_function(state, items)
            if len(results) != len(items):
                raise RuntimeError(f"chunk_function returned {len(results)} results for {len(items)} items")
            return [ItemResult(r.row, None if r.error is None else _describe(r.error), r.seconds,
                               None if r.error is None else "".join(traceback.format_exception(r.error)))
                    for r in results]
        except Exception as exc:  # one by one instead: the per-item calls say which input is at fault
            if log is not None:
                log(f"a chunk of {len(items)} tasks failed as a whole ({_describe(exc)}); computing them one by one")
    return [_one(work.function, state, item) for item in items]
