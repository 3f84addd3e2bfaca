"""From new data releases to Dagster work: register them, add partitions, plan range runs.

The release sensor calls :func:`plan_new_releases` every tick; ``astra demo`` and
``astra release register`` call the same function and run the plan in-process.

Range runs never wait for unrelated training: a run takes the per-source assets whose models
exist (``spectra`` needs none); the assets of a model not trained yet wait in the sensor's cursor
(:class:`WaitingRun`) and get their own run over the same range once that model exists and the
range's first run has finished.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dagster as dg

from astra_dagster.db.connection import connect
from astra_dagster.db.schema import ensure_schema
from astra_dagster.lineage.sources import block_bounds, blocks_for
from astra_dagster.releases.register import Registration, complete_releases, register_release
from astra_dagster.spectra.manifest import manifest_sha256

SOURCE_BLOCKS_NAME = "source_blocks"
#: At most this many blocks per run: a range run is one batch per asset.
DEFAULT_BLOCKS_PER_RUN = 20


@dataclass(frozen=True)
class PlannedRun:
    release: str
    first: str
    last: str
    run_key: str

    @property
    def tags(self) -> dict[str, str]:
        return {"dagster/asset_partition_range_start": self.first,
                "dagster/asset_partition_range_end": self.last,
                "astra/release": self.release}


@dataclass(frozen=True)
class WaitingRun:
    """A range run of per-source assets whose models were missing when the release was planned;
    requested once every model of ``models`` is materialised and the run ``after`` (the range's
    run of the other assets, which writes the spectra these read) has finished."""

    run_key: str
    release: str
    first: str
    last: str
    assets: tuple[str, ...]
    models: tuple[str, ...]
    after: str | None

    @property
    def tags(self) -> dict[str, str]:
        return PlannedRun(self.release, self.first, self.last, self.run_key).tags

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> WaitingRun:
        return cls(data["run_key"], data["release"], data["first"], data["last"], tuple(data["assets"]),
                   tuple(data["models"]), data.get("after"))


def read_cursor(cursor: str | None) -> tuple[dict[str, str], list[WaitingRun]]:
    """(release name → manifest sha256, waiting runs) from the sensor's cursor. A cursor written
    before waiting runs existed is the plain release map."""
    data = json.loads(cursor) if cursor else {}
    if isinstance(data.get("releases"), dict):
        return dict(data["releases"]), [WaitingRun.from_json(w) for w in data.get("waiting", [])]
    return data, []


def write_cursor(releases: Mapping[str, str], waiting: Sequence[WaitingRun]) -> str:
    return json.dumps({"releases": dict(releases), "waiting": [w.to_json() for w in waiting]}, sort_keys=True)


def split_by_models(
    asset_keys: Sequence[dg.AssetKey],
    models_of: Mapping[dg.AssetKey, Sequence[dg.AssetKey]],
    missing: Sequence[dg.AssetKey],
) -> tuple[list[dg.AssetKey], dict[tuple[dg.AssetKey, ...], list[dg.AssetKey]]]:
    """The assets a range run can take now (all their models exist), and the others grouped by
    the missing models they wait for (in ``asset_keys`` order, so doppler's group comes first)."""
    missing_set = set(missing)
    now: list[dg.AssetKey] = []
    waiting: dict[tuple[dg.AssetKey, ...], list[dg.AssetKey]] = {}
    for key in asset_keys:
        lacking = tuple(m for m in models_of.get(key, ()) if m in missing_set)
        if lacking:
            waiting.setdefault(lacking, []).append(key)
        else:
            now.append(key)
    return now, waiting


@dataclass
class ReleasePlan:
    registrations: list[Registration] = field(default_factory=list)
    new_partition_keys: list[str] = field(default_factory=list)
    runs: list[PlannedRun] = field(default_factory=list)
    cursor: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def contiguous_ranges(wanted: Sequence[str], all_keys: Sequence[str], max_len: int) -> list[tuple[str, str]]:
    """Group ``wanted`` keys into runs of consecutive keys of ``all_keys`` (Dagster's key order)."""
    position = {k: i for i, k in enumerate(all_keys)}
    ordered = sorted(set(wanted), key=position.__getitem__)
    ranges: list[tuple[str, str]] = []
    start = prev = None
    length = 0
    for key in ordered:
        if start is not None and position[key] == position[prev] + 1 and length < max_len:
            prev, length = key, length + 1
            continue
        if start is not None:
            ranges.append((start, prev))
        start = prev = key
        length = 1
    if start is not None:
        ranges.append((start, prev))
    return ranges


def plan_new_releases(
    instance: dg.DagsterInstance,
    data_root: Path,
    cursor: str | Mapping[str, str] | None,
    *,
    block_size: int,
    blocks_per_run: int = DEFAULT_BLOCKS_PER_RUN,
    database_url: str | None = None,
    only: str | None = None,
) -> ReleasePlan:
    """Register every complete release not yet in the cursor and plan runs for its changed sources
    (``only``: just the release of that name).

    The cursor maps release name → manifest sha256 (a mapping, or the sensor's cursor string), so
    a tick with nothing new reads only the manifests' hashes. Partition keys are appended in
    source order, so ranges stay contiguous.
    """
    ensure_schema(database_url)
    seen: dict[str, str] = dict(cursor) if isinstance(cursor, Mapping) else read_cursor(cursor)[0]
    plan = ReleasePlan(cursor=dict(seen))
    existing = list(instance.get_dynamic_partitions(SOURCE_BLOCKS_NAME))
    known = set(existing)
    for release_dir in complete_releases(data_root):
        if only is not None and release_dir.name != only:
            continue
        digest = manifest_sha256(release_dir)
        if seen.get(release_dir.name) == digest:
            continue
        try:
            with connect(database_url) as conn:
                registration = register_release(conn, release_dir)
        except ValueError as exc:  # ManifestError: report it, keep going with other releases
            plan.errors.append(str(exc))
            plan.cursor[release_dir.name] = digest
            continue
        plan.registrations.append(registration)
        plan.cursor[release_dir.name] = digest
        blocks = blocks_for(registration.changed_pks, block_size)
        for key in sorted(blocks_for(registration.source_pks, block_size), key=lambda k: block_bounds(k)[0]):
            if key not in known:
                known.add(key)
                existing.append(key)
                plan.new_partition_keys.append(key)
        for first, last in contiguous_ranges(blocks, existing, blocks_per_run):
            plan.runs.append(PlannedRun(
                registration.release, first, last,
                run_key=f"{registration.release}:{registration.manifest_sha256[:12]}:{first}...{last}",
            ))
    return plan


def sensor_result(
    plan: ReleasePlan,
    asset_keys: Sequence[dg.AssetKey],
    *,
    models_of: Mapping[dg.AssetKey, Sequence[dg.AssetKey]] | None = None,
    missing: Sequence[dg.AssetKey] = (),
    waiting: Sequence[WaitingRun] = (),
    extra_requests: Sequence[dg.RunRequest] = (),
) -> dg.SensorResult:
    """The sensor's answer: one run per planned range of the assets whose models exist, a
    :class:`WaitingRun` in the cursor per range and group of assets whose models are ``missing``
    (added to ``waiting``), then ``extra_requests`` (waiting runs now due, model training)."""
    now, later = split_by_models(asset_keys, models_of or {}, missing)
    requests = []
    still_waiting = list(waiting)
    for run in plan.runs:
        if now:
            requests.append(dg.RunRequest(run_key=run.run_key, asset_selection=now, tags=run.tags))
        for models, keys in later.items():
            names = tuple(k.to_user_string() for k in keys)
            still_waiting.append(WaitingRun(
                f"{run.run_key}:{'+'.join(names)}", run.release, run.first, run.last, names,
                tuple(m.to_user_string() for m in models), run.run_key if now else None))
    requests += extra_requests
    partitions = ([dg.AddDynamicPartitionsRequest(SOURCE_BLOCKS_NAME, plan.new_partition_keys)]
                  if plan.new_partition_keys else [])
    skip = None if requests or partitions else dg.SkipReason("no new or changed data release")
    return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=partitions,
                           cursor=write_cursor(plan.cursor, still_waiting), skip_reason=skip)
