"""The release sensor and the in-process release path never make spectra wait for model training:
range runs take only the assets whose models exist, each missing model trains in a run of its
own, and the assets of a model wait in the cursor until it exists and their range's spectra run
has finished; a label run never trains (or selects) a model."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from astra_dagster.definitions import defs
from astra_dagster.defs.sensors import RELEASE_ASSETS, release_sensor
from astra_dagster.orchestration.build import materialize_assets
from astra_dagster.orchestration.instance import TRAINING_TAG
from astra_dagster.orchestration.planned_runs import RunOutcome, materialize_range, run_release
from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases, read_cursor
from astra_dagster_tests.test_spectra_asset import GOOD, build_release

MODELS = {m for models in RELEASE_ASSETS.values() for m in models}
TINY_CANNON = {"ops": {"thecannon_model": {"config": {"n_train": 150, "seed": 5, "regions": "none", "order": 1}}}}


@pytest.fixture
def instance(clean_db: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "4")
    monkeypatch.delenv("ASTRA_RELEASE_ASSETS", raising=False)
    with dg.instance_for_test() as inst:
        yield inst


def tick(instance: dg.DagsterInstance, cursor: str | None = None) -> dg.SensorResult:
    result = release_sensor(dg.build_sensor_context(instance=instance, definitions=defs, cursor=cursor))
    assert isinstance(result, dg.SensorResult)
    return result


def split(result: dg.SensorResult) -> tuple[list[dg.RunRequest], list[dg.RunRequest]]:
    """(range runs, training runs) of a tick; no run mixes models with per-source assets."""
    ranges, training = [], []
    for request in result.run_requests:
        keys = set(request.asset_selection)
        if keys & MODELS:
            assert len(keys) == 1 and TRAINING_TAG in request.tags, request
            training.append(request)
        else:
            assert "dagster/asset_partition_range_start" in request.tags, request
            ranges.append(request)
    return ranges, training


def test_spectra_runs_do_not_wait_for_training(instance: dg.DagsterInstance, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data_root = tmp_path / "data"
    monkeypatch.setenv("ASTRA_DATA_ROOT", str(data_root))
    build_release(data_root, "r1")

    first = tick(instance)
    ranges, training = split(first)
    # spectra runs at once, alone; every model trains in a run of its own, concurrently
    assert [r.asset_selection for r in ranges] == [[dg.AssetKey("spectra")]]
    assert sorted(k for r in training for k in r.asset_selection) == sorted(MODELS)
    assert result_order_ok(first)
    spectra_key = ranges[0].run_key
    releases, waiting = read_cursor(first.cursor)
    assert list(releases) == ["r1"]
    assert {(w.assets, w.models, w.after) for w in waiting} == {
        ((a.to_user_string(),), tuple(m.to_user_string() for m in ms), spectra_key)
        for a, ms in RELEASE_ASSETS.items() if ms}

    # nothing has run: the next tick asks for the same trainings (the run keys make that a no-op)
    again = tick(instance, first.cursor)
    assert split(again)[0] == [] and read_cursor(again.cursor)[1] == waiting

    # the spectra run finishes and one model exists: only its label asset runs, over the same range
    instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, first.dynamic_partitions_requests[0].partition_keys)
    spectra_run = materialize_range(defs, [dg.AssetKey("spectra")], ranges[0].tags["dagster/asset_partition_range_start"],
                                    ranges[0].tags["dagster/asset_partition_range_end"], instance=instance)
    assert spectra_run.success
    instance.add_run_tags(spectra_run.run_id, {"dagster/run_key": spectra_key})
    assert materialize_assets(defs, [dg.AssetKey("thecannon_model")], instance=instance, log_level="WARNING",
                              run_config=TINY_CANNON).success
    third = tick(instance, again.cursor)
    ranges, training = split(third)
    assert [(r.asset_selection, r.run_key) for r in ranges] == [([dg.AssetKey("thecannon")],
                                                                 f"{spectra_key}:thecannon")]
    assert ranges[0].tags["dagster/asset_partition_range_end"] == "00000005-00000008"
    assert dg.AssetKey("thecannon_model") not in {k for r in training for k in r.asset_selection}
    assert {w.assets for w in read_cursor(third.cursor)[1]} == {("doppler",), ("thepayne",), ("ferre",),
                                                               ("apogeenet",)}
    label_run = materialize_range(defs, ranges[0].asset_selection, "00000001-00000004", "00000005-00000008",
                                  instance=instance)
    assert label_run.success

    # a later release: its range run takes the label asset whose model now exists
    build_release(data_root, "r2", extra_visit={GOOD[1]})
    fourth = tick(instance, third.cursor)
    ranges, _ = split(fourth)
    assert [set(r.asset_selection) for r in ranges] == [{dg.AssetKey("spectra"), dg.AssetKey("thecannon")}]
    assert len(read_cursor(fourth.cursor)[1]) == 8  # four methods still waiting, for each release


def result_order_ok(result: dg.SensorResult) -> bool:
    """Range runs are requested before trainings (the queue also starts them first: priority)."""
    kinds = [bool(set(r.asset_selection) & MODELS) for r in result.run_requests]
    return kinds == sorted(kinds) and all(r.tags.get("dagster/priority") == "-1"
                                          for r in result.run_requests if set(r.asset_selection) & MODELS)


def test_in_process_release_runs_spectra_before_training(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    build_release(data_root, "r1")
    plan = plan_new_releases(instance, data_root, None, block_size=4)
    instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
    steps = list(run_release(defs, plan.runs, [dg.AssetKey("spectra"), dg.AssetKey("thecannon")],
                             instance=instance, run_config=TINY_CANNON))
    assert [s if isinstance(s, str) else [c.asset for c in s.counts] for s in steps] == [
        ["spectra"], "training thecannon_model (progress in the run's log)", ["thecannon"]]
    assert all(s.success for s in steps if isinstance(s, RunOutcome))


def in_progress_run(instance: dg.DagsterInstance, model: dg.AssetKey, tags: dict[str, str], *,
                    started: bool) -> dg.DagsterRun:
    """A real run record of the implicit asset job selecting ``model``: queued, or started (its
    RUN_START event sets the status and start time, as a run worker's would)."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    job = defs.resolve_implicit_job_def_def_for_assets([model])
    # A queued run must say where the daemon would load it from (Dagster checks that).
    location = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="astra_dagster.definitions"),
                                           location_name="astra")
    origin = RemoteJobOrigin(repository_origin=RemoteRepositoryOrigin(code_location_origin=location,
                                                                      repository_name="__repository__"),
                             job_name=job.name)
    run = instance.create_run_for_job(job_def=job, asset_selection={model}, tags=tags, remote_job_origin=origin)
    event = dg.DagsterEventType.RUN_START if started else dg.DagsterEventType.RUN_ENQUEUED
    instance.report_dagster_event(dg.DagsterEvent(event_type_value=event.value, job_name=run.job_name),
                                  run_id=run.run_id)
    return instance.get_run_by_id(run.run_id)


def test_no_second_training_while_one_is_in_progress(instance: dg.DagsterInstance, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A model whose run is queued or running gets no second run (issue #13 point 8): neither
    beside the sensor's own training (its TRAINING_TAG) nor beside one started by hand (selects the
    model, no tag); spectra still run meanwhile, and once those runs finish the sensor asks again."""
    data_root = tmp_path / "data"
    monkeypatch.setenv("ASTRA_DATA_ROOT", str(data_root))
    monkeypatch.setenv("ASTRA_RELEASE_ASSETS", "spectra,ferre,thepayne")
    build_release(data_root, "r1")
    ferre_grid, payne = dg.AssetKey("ferre_grid"), dg.AssetKey("thepayne_model")
    sensor_run = in_progress_run(instance, ferre_grid, {TRAINING_TAG: "ferre_grid"}, started=True)
    by_hand = in_progress_run(instance, payne, {}, started=False)
    assert (sensor_run.status, by_hand.status) == (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED)

    first = tick(instance)
    ranges, training = split(first)
    assert [r.asset_selection for r in ranges] == [[dg.AssetKey("spectra")]]  # spectra do not wait
    assert training == []
    log = capsys.readouterr().err
    assert f"ferre_grid: run {sensor_run.run_id[:8]} started " in log, log
    assert f"thepayne_model: run {by_hand.run_id[:8]} queued " in log, log
    assert {w.assets for w in read_cursor(first.cursor)[1]} == {("ferre",), ("thepayne",)}

    # nothing else to do: the tick is skipped, and says what it waits for
    second = release_sensor(dg.build_sensor_context(instance=instance, definitions=defs, cursor=first.cursor))
    assert isinstance(second, dg.SensorResult) and not second.run_requests
    reason = second.skip_reason.skip_message
    assert reason.startswith("waiting for ") and f"run {sensor_run.run_id[:8]} started" in reason, reason
    assert f"run {by_hand.run_id[:8]} queued" in reason, reason

    # both runs end without a model (failed, cancelled): the next tick requests both trainings again
    instance.report_run_failed(sensor_run, "the training failed")
    instance.report_run_canceled(by_hand)
    third = tick(instance, second.cursor)
    _, training = split(third)
    assert sorted((r.run_key, r.tags[TRAINING_TAG]) for r in training) == [
        ("model:ferre_grid", "ferre_grid"), ("model:thepayne_model", "thepayne_model")]
