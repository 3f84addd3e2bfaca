"""Training progress for a caller that wants it (the model assets pass ``context.log.info``).

Methods take ``progress: Progress | None = None`` and report through :func:`reporter`, so the
science stays free of Dagster and a missing callback costs nothing. Progress never feeds back into
training: it is not a parameter of any task and does not change the numbers trained.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: A callback receiving one human-readable line per training step (epoch, grid chunk, region...).
Progress = Callable[[str], None]


class Reporter:
    """Prefixes each line with the method and ends it with the seconds since training began."""

    def __init__(self, progress: Progress, what: str):
        self.progress = progress
        self.what = what
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        self.progress(f"{self.what}: {message} [{time.perf_counter() - self.started:.0f} s]")


def reporter(progress: Progress | None, what: str) -> Progress:
    """``progress`` wrapped in a :class:`Reporter` (``thepayne: epoch 10/800: ... [12 s]``); a
    Reporter is returned as it is, so the phases of one training share its prefix and clock;
    a no-op when ``progress`` is None."""
    if progress is None:
        return _ignore
    if isinstance(progress, Reporter):
        return progress
    return Reporter(progress, what)


def _ignore(message: str) -> None:
    return None
