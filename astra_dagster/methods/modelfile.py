"""One-file model storage shared by the label methods: named numpy arrays in a ``.npz``,
written atomically at exactly the given path and read back with clear errors naming the file."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def write_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` to ``path`` (no suffix added) through a temporary file and a rename, so a
    reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:  # a handle: numpy must not append ".npz" to the name
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_arrays(path: str | os.PathLike[str], *, what: str, error: type[Exception], required: Sequence[str],
                file_format: str | None = None) -> dict[str, np.ndarray]:
    """All arrays of a file written by :func:`write_arrays`. Raises ``error`` naming the file when
    it is unreadable, lacks a ``required`` array or (with ``file_format``) holds another format;
    FileNotFoundError when it does not exist."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise error(f"{path}: not a readable {what} file ({exc})") from exc
    missing = [k for k in required if k not in contents]
    if missing:
        raise error(f"{path}: not a {what} file (lacks {missing})")
    if file_format is not None and str(contents.get("format")) != file_format:
        raise error(f"{path}: {what} format {str(contents.get('format'))!r}, this code reads {file_format!r}")
    return contents
