"""Deployment settings, read from the environment every time (so tests can change them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from astra_dagster import __version__


@dataclass(frozen=True)
class Settings:
    #: Root of everything local: the embedded database, Dagster's home, models, caches.
    astra_home: Path
    #: ``ASTRA_DATABASE_URL`` when set; None means "use the embedded server under astra_home".
    database_url: str | None
    #: ``DAGSTER_HOME`` when set, else ``astra_home/dagster``.
    dagster_home: Path
    #: How many consecutive sources one partition key covers (``ASTRA_SOURCES_PER_PARTITION``).
    sources_per_partition: int
    #: Folder of data releases watched by the release sensor (``ASTRA_DATA_ROOT``).
    data_root: Path | None
    #: Per-source assets the release sensor runs (``ASTRA_RELEASE_ASSETS``, comma-separated);
    #: None means all of them.
    release_assets: tuple[str, ...] | None = None


def _positive(name: str, default: str, kind: type = int) -> int | float:
    raw = os.environ.get(name) or default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a {'number' if kind is float else 'whole number'}, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {raw!r}")
    return value


def cpu_count() -> int:
    """Cores this process may use (its affinity mask, e.g. a Slurm allocation), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Execution:
    """How a step runs its per-source work: deployment settings, never task parameters (they
    change no task_id)."""

    #: Worker processes per step (``ASTRA_WORKERS``; default: the cores this process may use).
    workers: int
    #: Results are written every this many finished sources... (``ASTRA_LINEAGE_CHUNK``)
    chunk_sources: int
    #: ...or this many seconds, whichever comes first (``ASTRA_LINEAGE_SECONDS``).
    chunk_seconds: float
    #: ``local`` (a process pool on this node) or ``dask`` (``ASTRA_ENGINE``).
    engine: str
    #: A running Dask scheduler to use (``ASTRA_DASK_SCHEDULER``, e.g. tcp://host:8786); None:
    #: the engine starts a cluster of its own (``ASTRA_DASK_CLUSTER``: ``local`` or ``slurm``).
    dask_scheduler: str | None
    dask_cluster: str


def get_execution() -> Execution:
    engine = (os.environ.get("ASTRA_ENGINE") or "local").strip().lower()
    if engine not in ("local", "dask"):
        raise ValueError(f"ASTRA_ENGINE must be 'local' or 'dask', got {engine!r}")
    cluster = (os.environ.get("ASTRA_DASK_CLUSTER") or "local").strip().lower()
    if cluster not in ("local", "slurm"):
        raise ValueError(f"ASTRA_DASK_CLUSTER must be 'local' or 'slurm', got {cluster!r}")
    return Execution(
        workers=int(_positive("ASTRA_WORKERS", str(cpu_count()))),
        chunk_sources=int(_positive("ASTRA_LINEAGE_CHUNK", "100")),
        chunk_seconds=float(_positive("ASTRA_LINEAGE_SECONDS", "10", float)),
        engine=engine,
        dask_scheduler=os.environ.get("ASTRA_DASK_SCHEDULER") or None,
        dask_cluster=cluster,
    )


def get_settings() -> Settings:
    astra_home = Path(os.environ.get("ASTRA_HOME") or Path.home() / ".astra").expanduser()
    dagster_home = os.environ.get("DAGSTER_HOME")
    data_root = os.environ.get("ASTRA_DATA_ROOT")
    raw_block = os.environ.get("ASTRA_SOURCES_PER_PARTITION", "100")
    try:
        block = int(raw_block)
    except ValueError:
        raise ValueError(f"ASTRA_SOURCES_PER_PARTITION must be an integer, got {raw_block!r}") from None
    if block < 1:
        raise ValueError(f"ASTRA_SOURCES_PER_PARTITION must be >= 1, got {block}")
    return Settings(
        astra_home=astra_home,
        database_url=os.environ.get("ASTRA_DATABASE_URL") or None,
        dagster_home=Path(dagster_home).expanduser() if dagster_home else astra_home / "dagster",
        sources_per_partition=block,
        data_root=Path(data_root).expanduser() if data_root else None,
        release_assets=tuple(a.strip() for a in os.environ["ASTRA_RELEASE_ASSETS"].split(",") if a.strip())
        if os.environ.get("ASTRA_RELEASE_ASSETS") else None,
    )


def version_parts(version: str = __version__) -> tuple[int, int]:
    """(major, minor) of a version string such as ``0.1.0`` or ``1.2.3.dev4``."""
    parts = version.split(".")
    return int(parts[0]), int(parts[1])
