"""Registering one source's spectra: check its files against the manifest, read them, describe
every spectrum they hold (pure: no database; the spectra asset turns this into task results)."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from astra_dagster.spectra.errors import SpectrumFormatError
from astra_dagster.spectra.io import read_spectra_meta
from astra_dagster.spectra.manifest import sha256_file
from astra_dagster.spectra.text import MAX_ID, MAX_NAME, MAX_PATH, UnsafeTextError, checked_text

#: Files up to this size are read once into memory, hashed there and parsed from those bytes;
#: a larger one is hashed in chunks and parsed from disk (astropy then reads only what it needs).
READ_ONCE_BYTES = 256 << 20

#: Values the spectrum table accepts for the readers' kind and frame (its check constraints).
KINDS = ("visit", "stack")
FRAMES = ("observed", "rest")


#: What pathlib's ``exists()`` reads as "no such file" (any other error of os.stat is raised).
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


class RegistrationError(ValueError):
    """A file of a source cannot be registered; the message names the file and the problem."""


def spectrum_rows(
    source_id: str,
    release_path: Path,
    files: Sequence[tuple[str, str, str, int]],
    *,
    verify_sha256: bool = True,
) -> list[dict[str, Any]]:
    """One ``astra.spectrum`` row per spectrum in the source's files (path, format, sha256, size).

    Raises RegistrationError for a missing file, a file whose content differs from the manifest,
    an unreadable or invalid file, or a file that belongs to another source.
    """
    if not files:
        raise RegistrationError(f"{source_id}: the release lists no files for this source")
    rows: list[dict[str, Any]] = []
    # os.stat and os.path.realpath, not their pathlib forms: the same answers at half the cost,
    # which counts a million times over
    release_root = os.path.realpath(release_path)
    inside = release_root.rstrip(os.sep) + os.sep
    for relative, fmt, sha256, size in files:
        path = Path(release_path) / relative
        try:
            status = os.stat(path)
        except OSError as exc:
            if exc.errno not in _MISSING:
                raise
            raise RegistrationError(f"{path}: listed in the manifest but missing") from None
        if not stat.S_ISREG(status.st_mode):
            raise RegistrationError(f"{path}: listed in the manifest but not a regular file")
        # The manifest's paths are checked to stay inside the release; a symbolic link must too
        resolved = os.path.realpath(path)
        if resolved != release_root and not resolved.startswith(inside):
            raise RegistrationError(f"{path}: resolves outside the release folder ({resolved})")
        on_disk = status.st_size
        data = path.read_bytes() if on_disk == size and size <= READ_ONCE_BYTES else None
        if data is not None:
            digest = hashlib.sha256(data).hexdigest() if verify_sha256 else sha256
        else:
            digest = sha256_file(path) if verify_sha256 and on_disk == size else sha256
        if on_disk != size or (data is not None and len(data) != size) or digest != sha256:
            raise RegistrationError(f"{path}: content differs from the manifest (changed after release)")
        try:
            metas = read_spectra_meta(path, fmt or None, data=data)
        except SpectrumFormatError as exc:
            raise RegistrationError(str(exc)) from exc
        try:
            stored_path = checked_text(resolved, where=ascii(str(path))[1:-1], field="path",
                                       max_length=MAX_PATH)
        except UnsafeTextError as exc:
            raise RegistrationError(str(exc)) from None
        for meta in metas:
            try:
                row = _header_strings(path, meta, stored_path)
            except UnsafeTextError as exc:
                raise RegistrationError(str(exc)) from None
            owner = row.pop("owner")
            if owner and owner != source_id:
                raise RegistrationError(f"{path}: holds source {owner}, not {source_id} (unknown source)")
            numbers = {"snr": _float(meta.get("snr")), "mjd": _int(meta.get("mjd")),
                       "jd": _float(meta.get("jd")), "fiber": _int(meta.get("fiber"))}
            _check_numbers(path, int(meta.get("index", 0)), numbers)
            rows.append({
                **row,
                "file_format": fmt,
                "row_index": int(meta.get("index", 0)),
                **numbers,
                "sha256": sha256,
            })
    return rows


def _header_strings(path: Path, meta: dict[str, Any], stored_path: str) -> dict[str, Any]:
    """The strings of a spectrum's header that reach the database, checked (one line naming the
    file and the keyword on failure): NUL, control characters, encoding, length."""
    where = ascii(str(path))[1:-1]
    kind = meta.get("kind", "visit")
    frame = meta.get("frame", "observed")
    if kind not in KINDS or frame not in FRAMES:
        raise UnsafeTextError(f"{where}: spectrum kind/frame {ascii(kind)[:40]}/{ascii(frame)[:40]} "
                              f"is not one of {KINDS}/{FRAMES}")
    telescope = meta.get("telescope")
    owner = meta.get("source_id")
    return {
        "path": stored_path,
        "kind": kind,
        "frame": frame,
        "telescope": None if telescope is None else checked_text(
            str(telescope), where=where, field="header TELESCOP", max_length=MAX_NAME),
        "owner": None if owner in (None, "") else checked_text(
            str(owner), where=where, field="header source id (OBJID)", max_length=MAX_ID),
    }


#: What the spectrum table's columns hold (real, int, double precision), and plausible values:
#: an absurd header value fails its source here instead of the batch's insert.
_RANGES = {"snr": (-1e6, 1e6), "mjd": (0, 200_000), "jd": (0.0, 2_600_000.5), "fiber": (-2**31, 2**31 - 1)}


def _check_numbers(path: Path, row: int, numbers: dict[str, float | int | None]) -> None:
    for name, value in numbers.items():
        lo, hi = _RANGES[name]
        if value is not None and not (math.isfinite(value) and lo <= value <= hi):
            raise RegistrationError(f"{path}: row {row} header {name} {value!r} is outside [{lo}, {hi}]")


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None
