"""The release sensor: new data releases under ASTRA_DATA_ROOT become partitions and range runs."""

import dagster as dg

from astra_dagster.defs.labels import LABEL_ASSETS
from astra_dagster.defs.radial_velocity import doppler, doppler_templates
from astra_dagster.defs.spectra import spectra
from astra_dagster.releases.plan import plan_new_releases, sensor_result
from astra_dagster.settings import get_settings

#: Per-source assets a new release runs (one range run per chunk of blocks), in order, with the
#: unpartitioned models each reads: those are materialised (once) before any range run.
RELEASE_ASSETS: dict[dg.AssetKey, list[dg.AssetKey]] = {
    spectra.key: [],
    doppler.key: [doppler_templates.key],
    **{label.key: [model.key] for model, label in LABEL_ASSETS.items()},
}


def release_assets(names: tuple[str, ...] | None = None) -> list[dg.AssetKey]:
    """The per-source assets to run: all, or those named (``ASTRA_RELEASE_ASSETS``)."""
    if names is None:
        return list(RELEASE_ASSETS)
    known = {key.to_user_string(): key for key in RELEASE_ASSETS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"ASTRA_RELEASE_ASSETS names unknown assets {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]


def missing_models(instance: dg.DagsterInstance, assets: list[dg.AssetKey]) -> list[dg.AssetKey]:
    needed = dict.fromkeys(model for asset in assets for model in RELEASE_ASSETS[asset])
    return [key for key in needed if instance.get_latest_materialization_event(key) is None]


@dg.sensor(
    name="release_sensor",
    asset_selection=list(RELEASE_ASSETS) + [m for models in RELEASE_ASSETS.values() for m in models],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers complete data releases found under ASTRA_DATA_ROOT and requests runs "
    "for the blocks of their new or changed sources (training missing models first).",
)
def release_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    settings = get_settings()
    if settings.data_root is None:
        return dg.SkipReason("ASTRA_DATA_ROOT is not set")
    assets = release_assets(settings.release_assets)
    missing = missing_models(context.instance, assets)
    if missing:
        # Releases wait (the cursor does not move) until the models their assets read exist.
        names = ",".join(k.to_user_string() for k in missing)
        return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"models:{names}", asset_selection=missing)])
    plan = plan_new_releases(context.instance, settings.data_root, context.cursor,
                             block_size=settings.sources_per_partition)
    for error in plan.errors:
        context.log.error(error)
    for reg in plan.registrations:
        context.log.info(f"release {reg.release}: {len(reg.source_pks)} sources, "
                         f"{len(reg.new_pks)} new, {len(reg.changed_pks)} new or changed")
    return sensor_result(plan, assets)
