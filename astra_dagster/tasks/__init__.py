"""What a worker process runs for one source of a method asset: reading its spectra, calling the
method's science, shaping its result row. Free of Dagster (the assets in ``defs/`` wrap these),
so a worker pool starts without importing it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ReadOnFirstUse:
    """A value that ``load()`` makes when first needed: in the step's own process, the model a
    task reads (a memoised run never reads it); worker processes get the value itself."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load

    def get(self) -> Any:
        return self._load()


def resolved(value: Any) -> Any:
    """``value``, or what it loads if it is a :class:`ReadOnFirstUse`."""
    return value.get() if isinstance(value, ReadOnFirstUse) else value
