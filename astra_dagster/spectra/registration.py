"""Registering one source's spectra: check its files against the manifest, read them, describe
every spectrum they hold (pure: no database; the spectra asset turns this into task results)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from astra_dagster.spectra.errors import SpectrumFormatError
from astra_dagster.spectra.io import read_spectra
from astra_dagster.spectra.manifest import sha256_file


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
    for relative, fmt, sha256, size in files:
        path = Path(release_path) / relative
        if not path.is_file():
            raise RegistrationError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != size or (verify_sha256 and sha256_file(path) != sha256):
            raise RegistrationError(f"{path}: content differs from the manifest (changed after release)")
        try:
            spectra = read_spectra(path)
        except SpectrumFormatError as exc:
            raise RegistrationError(str(exc)) from exc
        for spectrum in spectra:
            meta = spectrum.meta
            owner = meta.get("source_id")
            if owner and owner != source_id:
                raise RegistrationError(f"{path}: holds source {owner}, not {source_id} (unknown source)")
            rows.append({
                "path": str(path.resolve()),
                "file_format": fmt,
                "kind": meta.get("kind", "visit"),
                "frame": meta.get("frame", "observed"),
                "row_index": int(meta.get("index", 0)),
                "snr": _float(meta.get("snr")),
                "mjd": _int(meta.get("mjd")),
                "jd": _float(meta.get("jd")),
                "telescope": meta.get("telescope"),
                "fiber": _int(meta.get("fiber")),
                "sha256": sha256,
            })
    return rows


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(float(value))
    except (TypeError, ValueError):
        return None
