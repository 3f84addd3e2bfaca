"""The release sensor: new data releases under ASTRA_DATA_ROOT become partitions and range runs."""

from datetime import datetime

import dagster as dg

from astra_dagster.defs.labels import LABEL_ASSETS
from astra_dagster.defs.radial_velocity import doppler, doppler_templates
from astra_dagster.defs.spectra import spectra
from astra_dagster.orchestration.instance import TRAINING_TAG
from astra_dagster.releases.plan import WaitingRun, plan_new_releases, read_cursor, sensor_result
from astra_dagster.settings import get_settings

#: Per-source assets a new release runs (one range run per chunk of blocks), in order, with the
#: unpartitioned models each reads: a range run takes the assets whose models exist; the others
#: wait (in the cursor) for their model, which trains in a run of its own meanwhile.
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


#: Statuses of a run that may still materialise its assets (queued for the daemon, or running).
IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED]


def trainings_in_progress(instance: dg.DagsterInstance, models: list[dg.AssetKey]
                          ) -> dict[dg.AssetKey, dg.RunRecord]:
    """Model → the queued or running run that will materialise it: one the sensor requested
    (``TRAINING_TAG`` names its model) or any other run selecting it (the UI's Materialize,
    ``dagster asset materialize``, ``astra release register --run``), so a model never trains
    twice at once. The oldest such run, the one that will finish first."""
    if not models:
        return {}
    wanted = set(models)
    busy: dict[dg.AssetKey, dg.RunRecord] = {}
    # Newest first: the last record seen for a model is its oldest run in progress.
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=IN_PROGRESS)):
        run = record.dagster_run
        targets = set(run.asset_selection or ())
        if run.tags.get(TRAINING_TAG):
            targets.add(dg.AssetKey.from_user_string(run.tags[TRAINING_TAG]))
        for key in targets & wanted:
            busy[key] = record
    return busy


def waiting_for(busy: dict[dg.AssetKey, dg.RunRecord]) -> str:
    """One line: "waiting for ferre_grid: run 1f5a6cc2 started 04:07" (local time)."""
    parts = []
    for key, record in busy.items():
        started = record.start_time is not None
        when = datetime.fromtimestamp(record.start_time) if started else record.create_timestamp.astimezone()
        parts.append(f"{key.to_user_string()}: run {record.dagster_run.run_id[:8]} "
                     f"{'started' if started else 'queued'} {when:%H:%M}")
    return "waiting for " + "; ".join(parts)


def training_requests(missing: list[dg.AssetKey]) -> list[dg.RunRequest]:
    """One run per missing model, so models train concurrently (up to the queue's limit for
    TRAINING_TAG) and each label asset starts as soon as its own model exists. Lower priority:
    the queue starts range runs first. The run key makes later ticks' requests no-ops; a failed
    training is not retried (materialise the model by hand, the waiting runs then start).
    The caller leaves out models whose training is in progress (:func:`trainings_in_progress`):
    the run key alone does not stop a second run beside one started by hand or in process."""
    return [dg.RunRequest(run_key=f"model:{key.to_user_string()}", asset_selection=[key],
                          tags={TRAINING_TAG: key.to_user_string(), "dagster/priority": "-1"})
            for key in missing]


def due_runs(instance: dg.DagsterInstance, waiting: list[WaitingRun]
             ) -> tuple[list[dg.RunRequest], list[WaitingRun]]:
    """(requests for the waiting runs whose models now exist and whose ``after`` run has finished,
    the runs still waiting)."""
    materialised: dict[str, bool] = {}

    def has_model(name: str) -> bool:
        if name not in materialised:
            key = dg.AssetKey.from_user_string(name)
            materialised[name] = instance.get_latest_materialization_event(key) is not None
        return materialised[name]

    def finished(run_key: str | None) -> bool:
        if run_key is None:
            return True
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": run_key}), limit=1)
        return bool(runs) and runs[0].is_finished

    due, still = [], []
    for run in waiting:
        if all(has_model(m) for m in run.models) and finished(run.after):
            due.append(dg.RunRequest(run_key=run.run_key, tags=run.tags,
                                     asset_selection=[dg.AssetKey.from_user_string(a) for a in run.assets]))
        else:
            still.append(run)
    return due, still


@dg.sensor(
    name="release_sensor",
    asset_selection=list(RELEASE_ASSETS) + [m for models in RELEASE_ASSETS.values() for m in models],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers complete data releases found under ASTRA_DATA_ROOT and requests runs "
    "for the blocks of their new or changed sources; missing models train in runs of their own "
    "meanwhile, and the assets that read them run once they exist.",
)
def release_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    settings = get_settings()
    if settings.data_root is None:
        return dg.SkipReason("ASTRA_DATA_ROOT is not set")
    assets = release_assets(settings.release_assets)
    missing = missing_models(context.instance, assets)
    # Everything else goes on while a model trains: releases are registered, spectra and the
    # methods whose models exist run, and each waiting label run starts once its own model exists.
    busy = trainings_in_progress(context.instance, missing)
    if busy:
        context.log.info(waiting_for(busy))
    releases, waiting = read_cursor(context.cursor)
    due, waiting = due_runs(context.instance, waiting)
    plan = plan_new_releases(context.instance, settings.data_root, releases,
                             block_size=settings.sources_per_partition)
    for error in plan.errors:
        context.log.error(error)
    for reg in plan.registrations:
        context.log.info(f"release {reg.release}: {len(reg.source_pks)} sources, "
                         f"{len(reg.new_pks)} new, {len(reg.changed_pks)} new or changed")
    result = sensor_result(plan, assets, models_of=RELEASE_ASSETS, missing=missing, waiting=waiting,
                           extra_requests=due + training_requests([m for m in missing if m not in busy]))
    if busy and result.skip_reason is not None:  # nothing to do but wait: say for what
        return dg.SensorResult(cursor=result.cursor, skip_reason=waiting_for(busy))
    return result
