"""The release sensor: new data releases under ASTRA_DATA_ROOT become partitions and range runs."""

import dagster as dg

from astra_dagster.defs.spectra import spectra
from astra_dagster.release_plan import plan_new_releases, sensor_result
from astra_dagster.settings import get_settings

#: Assets every new release runs, in one range run per chunk of blocks.
RELEASE_ASSETS = [spectra.key]


@dg.sensor(
    name="release_sensor",
    asset_selection=RELEASE_ASSETS,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers complete data releases found under ASTRA_DATA_ROOT and requests runs "
    "for the blocks of their new or changed sources.",
)
def release_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    settings = get_settings()
    if settings.data_root is None:
        return dg.SkipReason("ASTRA_DATA_ROOT is not set")
    plan = plan_new_releases(context.instance, settings.data_root, context.cursor,
                             block_size=settings.sources_per_partition)
    for error in plan.errors:
        context.log.error(error)
    for reg in plan.registrations:
        context.log.info(f"release {reg.release}: {len(reg.source_pks)} sources, "
                         f"{len(reg.new_pks)} new, {len(reg.changed_pks)} new or changed")
    return sensor_result(plan, RELEASE_ASSETS)
