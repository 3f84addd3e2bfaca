"""Running planned range runs in this process (the demo and ``astra release register --run``);
the sensor hands the same plans to the daemon instead."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import dagster as dg

from astra_dagster.orchestration.build import materialize_assets
from astra_dagster.releases.plan import PlannedRun, split_by_models


@dataclass(frozen=True)
class AssetCounts:
    asset: str
    computed: int
    skipped: int
    failed: int


@dataclass(frozen=True)
class RunOutcome:
    run: PlannedRun
    run_id: str
    success: bool
    counts: list[AssetCounts]


def materialize_range(
    defs: dg.Definitions,
    asset_keys: Sequence[dg.AssetKey],
    first: str,
    last: str,
    *,
    instance: dg.DagsterInstance,
    run_config: dict | None = None,
    tags: dict[str, str] | None = None,
    log_level: str | None = "WARNING",
) -> dg.ExecuteInProcessResult:
    """One in-process run of ``asset_keys`` over the partition range first...last."""
    return materialize_assets(
        defs, asset_keys, instance=instance, run_config=run_config, log_level=log_level,
        tags={"dagster/asset_partition_range_start": first,
              "dagster/asset_partition_range_end": last, **(tags or {})},
    )


def counts_of(result: dg.ExecuteInProcessResult) -> list[AssetCounts]:
    """Computed/skipped/failed per asset (one event per partition carries the batch's counts)."""
    seen: dict[str, AssetCounts] = {}
    for event in result.get_asset_materialization_events():
        key = event.asset_key.to_user_string()
        meta = event.materialization.metadata
        if key in seen or "astra/computed" not in meta:
            continue
        seen[key] = AssetCounts(key, *(int(meta[k].value) for k in
                                       ("astra/computed", "astra/skipped", "astra/failed")))
    return list(seen.values())


def run_planned(
    defs: dg.Definitions,
    runs: Sequence[PlannedRun],
    asset_keys: Sequence[dg.AssetKey],
    *,
    instance: dg.DagsterInstance,
    log_level: str | None = "WARNING",
) -> list[RunOutcome]:
    outcomes = []
    for run in runs:
        result = materialize_range(defs, asset_keys, run.first, run.last, instance=instance,
                                   tags={"astra/release": run.release}, log_level=log_level)
        outcomes.append(RunOutcome(run, result.run_id, result.success, counts_of(result)))
    return outcomes


def ensure_models(
    defs: dg.Definitions,
    asset_keys: Sequence[dg.AssetKey],
    *,
    instance: dg.DagsterInstance,
    run_config: dict | None = None,
    log_level: str | None = "WARNING",
) -> list[str]:
    """Materialise, in this process, the models the given per-source assets read but that have
    never been materialised (what the release sensor does before its range runs). ``run_config``
    may hold Config for some of them (``{"ops": {name: {"config": ...}}}``)."""
    from astra_dagster.defs.sensors import missing_models

    missing = missing_models(instance, list(asset_keys))
    if missing:
        ops = {k: v for k, v in ((run_config or {}).get("ops") or {}).items()
               if dg.AssetKey(k) in missing}
        result = materialize_assets(defs, missing, instance=instance, log_level=log_level,
                                    run_config={"ops": ops} if ops else None)
        if not result.success:
            raise RuntimeError(f"training {', '.join(k.to_user_string() for k in missing)} failed "
                               f"(Dagster run {result.run_id})")
    return [k.to_user_string() for k in missing]


def run_release(
    defs: dg.Definitions,
    runs: Sequence[PlannedRun],
    asset_keys: Sequence[dg.AssetKey],
    *,
    instance: dg.DagsterInstance,
    run_config: dict | None = None,
    log_level: str | None = "WARNING",
) -> Iterator[str | RunOutcome]:
    """The planned runs in this process, in the release sensor's order: first the assets whose
    models exist (``spectra`` needs none), then per missing model (doppler's templates first)
    its training and its assets over the same ranges. So the first results never wait for
    unrelated training. Yields a line before each training and each run's :class:`RunOutcome`;
    raises RuntimeError when a training fails (the earlier results are written)."""
    from astra_dagster.defs.sensors import RELEASE_ASSETS, missing_models

    now, waiting = split_by_models(list(asset_keys), RELEASE_ASSETS, missing_models(instance, list(asset_keys)))
    if now:
        yield from _each_run(defs, runs, now, instance, log_level)
    for models, keys in waiting.items():
        yield f"training {', '.join(m.to_user_string() for m in models)} (progress in the run's log)"
        ensure_models(defs, keys, instance=instance, run_config=run_config, log_level=log_level)
        yield from _each_run(defs, runs, keys, instance, log_level)


def _each_run(defs: dg.Definitions, runs: Sequence[PlannedRun], keys: Sequence[dg.AssetKey],
              instance: dg.DagsterInstance, log_level: str | None = "WARNING") -> Iterator[RunOutcome]:
    for run in runs:
        yield from run_planned(defs, [run], keys, instance=instance, log_level=log_level)
