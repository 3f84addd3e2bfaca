"""Errors raised by the spectrum readers."""

from __future__ import annotations

from pathlib import Path


class SpectrumFormatError(ValueError):
    """A file cannot be read as the spectrum format it claims; the message names file and problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
