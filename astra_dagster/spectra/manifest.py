"""The manifest of a data release: which sources it has and which files belong to each.

A release is a folder with a ``manifest.json`` written last (atomically), so a half-written
release is never read. Paths are relative to the release folder. Layout::

    {"format": "astra-release/1", "release": "synth-1", "generator": "...", "seed": 1,
     "sources": [{"source_id": "2M00012345+1234567", "ra": 1.2, "dec": 3.4,
                  "files": [{"path": "apStar/apStar-synth-1-2M....fits", "format": "apStar",
                             "sha256": "...", "size": 123}, ...]}],
     "files": [{"path": "truth.csv", "sha256": "...", "size": 45}]}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from astra_dagster.spectra.text import (
    MAX_ID,
    MAX_NAME,
    MAX_PATH,
    UnsafeTextError,
    checked_number,
    checked_text,
)

MANIFEST_NAME = "manifest.json"
FORMAT = "astra-release/1"
#: File formats a release may list per source.
FILE_FORMATS = ("apStar", "apVisit", "mwmStar", "mwmVisit", "specLite")


class ManifestError(ValueError):
    """The manifest is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class ReleaseFile:
    path: str
    format: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ReleaseSource:
    source_id: str
    files: tuple[ReleaseFile, ...]
    ra: float | None = None
    dec: float | None = None

    @property
    def fingerprint(self) -> str:
        """Changes whenever any of the source's files changes (or one is added or removed)."""
        digest = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path.rsplit("/", 1)[-1]):
            digest.update(f"{f.path.rsplit('/', 1)[-1]}:{f.sha256}\n".encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    release: str
    sources: tuple[ReleaseSource, ...]
    files: tuple[ReleaseFile, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_files(self) -> int:
        return len(self.files) + sum(len(s.files) for s in self.sources)

    @property
    def synthetic(self) -> bool:
        """True for a release made by the synthetic generator (its manifest names the generator,
        as :mod:`astra_dagster.spectra.release` writes); a release without one is real data."""
        return bool(self.meta.get("generator"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, path: Path, fmt: str) -> ReleaseFile:
    """A manifest entry for a file already written under ``root``."""
    return ReleaseFile(str(path.relative_to(root)), fmt, sha256_file(path), path.stat().st_size)


_HEX = frozenset("0123456789abcdef")


def _file(raw: Any, where: str) -> ReleaseFile:
    if not isinstance(raw, dict) or not all(k in raw for k in ("path", "sha256", "size")):
        raise ManifestError(f"{where}: file entry {ascii(raw)[:80]} lacks path, sha256 or size")
    path = checked_text(raw["path"], where=where, field="file path", max_length=MAX_PATH,
                        identifier=True)
    if path.startswith("/") or ".." in Path(path).parts:
        raise ManifestError(f"{where}: file path {ascii(path)[1:-1]} must be relative to the release folder")
    where = f"{where} {ascii(path)[1:-1]}"
    fmt = checked_text(raw.get("format", ""), where=where, field="format", max_length=MAX_NAME)
    sha = checked_text(raw["sha256"], where=where, field="sha256", max_length=64)
    if len(sha) != 64 or not set(sha) <= _HEX:
        raise ManifestError(f"{where}: sha256 must be 64 lower-case hex digits, got {ascii(sha)[:80]}")
    size = raw["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ManifestError(f"{where}: size must be a non-negative integer, got {ascii(size)[:40]}")
    return ReleaseFile(path, fmt, sha, size)


def read_manifest(release_dir: Path) -> Manifest:
    """Parse and validate ``release_dir/manifest.json``: every string that will reach the
    database is checked first (:mod:`astra_dagster.spectra.text`), so a bad entry refuses the
    whole release with one line and nothing of it is written."""
    try:
        return _read_manifest(Path(release_dir))
    except UnsafeTextError as exc:
        raise ManifestError(str(exc)) from None


def _read_manifest(release_dir: Path) -> Manifest:
    path = release_dir / MANIFEST_NAME
    checked_text(str(release_dir.resolve()), where=ascii(str(release_dir))[1:-1],
                 field="release folder path", max_length=MAX_PATH)
    if not path.exists():
        raise ManifestError(f"{release_dir}: no {MANIFEST_NAME} (release incomplete or not a release)")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at "
                            f"offset {exc.start})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise ManifestError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ManifestError(f"{path}: format must be {FORMAT!r}, got {ascii(found)[:80]}")
    if not raw.get("release"):
        raise ManifestError(f"{path}: no release name")
    release = checked_text(raw["release"], where=str(path), field="release name", identifier=True)
    raw_sources = raw.get("sources") or []
    raw_files = raw.get("files") or []
    if not isinstance(raw_sources, list) or not isinstance(raw_files, list):
        raise ManifestError(f"{path}: sources and files must be lists")
    sources = []
    seen: set[str] = set()
    seen_files: dict[str, str] = {}  # path -> source: a file listed twice would give its spectra twice
    for i, src in enumerate(raw_sources):
        where = f"{path} sources[{i}]"
        if not isinstance(src, dict) or src.get("source_id") in (None, ""):
            raise ManifestError(f"{where}: no source_id")
        source_id = checked_text(src["source_id"], where=where, field="source_id", max_length=MAX_ID,
                                 identifier=True)
        where = f"{where} ({source_id})"
        if source_id in seen:
            raise ManifestError(f"{where}: source {source_id} listed twice")
        seen.add(source_id)
        entries = src.get("files") or []
        if not isinstance(entries, list):
            raise ManifestError(f"{where}: files must be a list")
        files = tuple(_file(f, where) for f in entries)
        for f in files:
            if f.path in seen_files:
                raise ManifestError(f"{where}: file {ascii(f.path)[1:-1]} listed twice (also for source "
                                    f"{seen_files[f.path]})")
            seen_files[f.path] = source_id
            if f.format not in FILE_FORMATS:
                raise ManifestError(f"{where}: {f.path} has unknown format {ascii(f.format)[:40]}")
        ra = checked_number(src.get("ra"), where=where, field="ra", lo=0.0, hi=360.0)
        dec = checked_number(src.get("dec"), where=where, field="dec", lo=-90.0, hi=90.0)
        sources.append(ReleaseSource(source_id, files, ra, dec))
    extra = tuple(_file(f, str(path)) for f in raw_files)
    meta = {k: v for k, v in raw.items() if k not in ("sources", "files")}
    return Manifest(release=release, sources=tuple(sources), files=extra, meta=meta)


def write_manifest(
    release_dir: Path,
    release: str,
    sources: Sequence[ReleaseSource],
    files: Sequence[ReleaseFile] = (),
    **meta: Any,
) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename): the last step of a release."""
    payload = {"format": FORMAT, "release": release, **meta,
               "sources": [{**{k: v for k, v in asdict(s).items() if k != "files"},
                            "files": [asdict(f) for f in s.files]} for s in sources],
               "files": [asdict(f) for f in files]}
    path = Path(release_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def manifest_sha256(release_dir: Path) -> str:
    return sha256_file(Path(release_dir) / MANIFEST_NAME)


def write_manifest_for_files(
    release_dir: Path,
    release: str,
    sources: Mapping[str, Sequence[tuple[Path, str]]],
    coordinates: Mapping[str, tuple[float, float]] | None = None,
    **meta: Any,
) -> Path:
    """A manifest over files already under ``release_dir`` (e.g. real DR17 files copied there):
    ``sources`` maps each source_id to its (path, format) pairs. Without a ``generator`` in
    ``meta`` the release is real data (:attr:`Manifest.synthetic`)."""
    root = Path(release_dir)
    coordinates = coordinates or {}
    entries = [
        ReleaseSource(source_id, tuple(file_entry(root, Path(p), fmt) for p, fmt in files),
                      *coordinates.get(source_id, (None, None)))
        for source_id, files in sources.items()
    ]
    return write_manifest(root, release, entries, **meta)
