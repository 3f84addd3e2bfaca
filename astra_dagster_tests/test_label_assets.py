"""The label assets on a small synthetic release: a model asset trains (small settings), the
per-source asset writes one row of arrays per source (an element per apStar stack) whose labels
are near the truth, the task parameters name the model and spectra tasks, a second run skips
everything, and retraining the model with other settings makes new tasks."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.definitions import defs
from astra_dagster.orchestration.build import materialize_assets
from astra_dagster.orchestration.planned_runs import run_planned
from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
from astra_dagster.spectra.apogee import write_apstar
from astra_dagster.spectra.release import generate_release, read_truth
from astra_dagster_tests import fixtures_bad_fits as fx
from astra_dagster_tests.test_spectra_asset import build_release

# Per method: model asset, small training config, a retraining config, label → (truth column,
# loose tolerance on the median |Δ| over this tiny release), family prefixes.
METHODS = {
    "thecannon": {
        "model": "thecannon_model",
        "config": {"n_train": 300, "seed": 5, "regions": "none"},
        "retrain": {"n_train": 300, "seed": 6, "regions": "none"},
        "labels": {"teff": ("teff", 250.0), "logg": ("logg", 0.5), "fe_h": ("fe_h", 0.2)},
        "family": "TheCannon.EstimateStellarLabelsGivenApStarFile_",
        "model_family": "TheCannon.TrainTheCannon_",
    },
    "thepayne": {
        "model": "thepayne_model",
        "config": {"n_train": 800, "hidden": 64, "epochs": 150, "n_components": 48, "seed": 1},
        "retrain": {"n_train": 800, "hidden": 64, "epochs": 150, "n_components": 48, "seed": 2},
        "labels": {"teff": ("teff", 300.0), "logg": ("logg", 0.6), "fe_h": ("fe_h", 0.3)},
        "family": "ThePayne.EstimateStellarLabelsGivenApStarFile_",
        "model_family": "ThePayne.TrainThePayne_",
    },
    "ferre": {
        "model": "ferre_grid",
        "config": {"teff_step": 500.0, "logg_step": 1.0, "metals_min": -1.5, "metals_step": 0.5,
                   "alpha_min": 0.0, "alpha_max": 0.25, "n_validation": 0},
        "retrain": {"teff_step": 500.0, "logg_step": 1.0, "metals_min": -1.5, "metals_step": 0.5,
                    "alpha_min": 0.0, "alpha_max": 0.25, "n_validation": 0, "seed": 1},
        "labels": {"teff": ("teff", 300.0), "logg": ("logg", 0.6), "metals": ("fe_h", 0.3)},
        "family": "FERRE.FerreGivenApStarFile_",
        "model_family": "FERRE.BuildGrid_",
    },
    "apogeenet": {
        "model": "apogeenet_model",
        "config": {"n_train": 600, "epochs": 6, "seed": 1},
        "retrain": {"n_train": 600, "epochs": 6, "seed": 2},
        "labels": {"teff": ("teff", 700.0), "logg": ("logg", 0.8), "fe_h": ("fe_h", 0.4)},
        "family": "APOGEENet.EstimateStellarParametersGivenApStarFile_",
        "model_family": "APOGEENet.TrainNetwork_",
    },
}

N_SOURCES = 8


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_release(tmp_path_factory.mktemp("labels") / "data", "labels-test", N_SOURCES, seed=23,
                            progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_label_asset_on_a_synthetic_release(method: str, release: Path, clean_db: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spec = METHODS[method]
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "5")
    model_key = dg.AssetKey(spec["model"])
    with dg.instance_for_test() as instance:
        trained = materialize_assets(defs, [model_key], instance=instance, log_level="WARNING",
                                     run_config={"ops": {spec["model"]: {"config": spec["config"]}}})
        assert trained.success
        plan = plan_new_releases(instance, release.parent, None, block_size=5)
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
        keys = [dg.AssetKey("spectra"), dg.AssetKey(method)]
        outcomes = run_planned(defs, plan.runs, keys, instance=instance)
        assert all(o.success for o in outcomes)
        counts = {(c.asset, c.computed, c.failed) for o in outcomes for c in o.counts}
        assert counts == {("spectra", N_SOURCES, 0), (method, N_SOURCES, 0)}

        columns = list(spec["labels"])
        with connect() as conn:
            rows = conn.execute(
                f"select s.source_id, r.snr, r.bitmask_flag, {', '.join('r.' + c for c in columns)} "
                f"from astra.{method} r join astra.task t on t.output_pk = r.output_pk "
                "join astra.source s on s.pk = t.source_pk where t.status_code = 1").fetchall()
            params = dict(conn.execute(
                "select p.parameter_name, p.parameter_value from astra.task t "
                "join astra.task_parameter tp on tp.task_pk = t.pk join astra.parameter p on p.pk = tp.parameter_pk "
                "where t.asset_key = %s and t.source_pk = 1", (method,)).fetchall())
            n_stacks = dict(conn.execute(
                "select s.source_id, count(*) from astra.spectrum sp join astra.source s on s.pk = sp.source_pk "
                "where sp.file_format = 'apStar' and sp.kind = 'stack' and sp.row_index = 0 "
                "group by s.source_id").fetchall())
        stars = {s["source_id"]: s for s in read_truth(release)[0]}
        assert len(rows) == N_SOURCES
        deltas: dict[str, list[float]] = {c: [] for c in columns}
        for source_id, snr, flags, *values in rows:
            assert len(snr) == len(flags) == n_stacks[source_id]
            for column, value in zip(columns, values, strict=True):
                assert len(value) == n_stacks[source_id]
                truth = stars[source_id][spec["labels"][column][0]]
                deltas[column] += [v - truth for v in value if v is not None]
        for column, (_, tolerance) in spec["labels"].items():
            # Hot stars are outside some models' ranges (None); most stars must have a value.
            assert len(deltas[column]) >= N_SOURCES // 2, (column, deltas[column])
            assert np.median(np.abs(deltas[column])) < tolerance, (column, deltas[column])
        assert params["input_task_id"].startswith("Spectra.RegisterSpectra_")
        assert params["model_task_id"].startswith(spec["model_family"])

        again = run_planned(defs, plan.runs, keys, instance=instance)
        assert [(c.asset, c.computed, c.skipped) for o in again for c in o.counts] == [
            ("spectra", 0, N_SOURCES), (method, 0, N_SOURCES)]

        # A retrained model is a new model task: every source gets a new label task.
        assert materialize_assets(defs, [model_key], instance=instance, log_level="WARNING",
                                  run_config={"ops": {spec["model"]: {"config": spec["retrain"]}}}).success
        third = run_planned(defs, plan.runs, [dg.AssetKey(method)], instance=instance)
        assert [(c.asset, c.computed, c.skipped) for o in third for c in o.counts] == [(method, N_SOURCES, 0)]
        with connect() as conn:
            n_tasks = conn.execute("select count(*) from astra.task where asset_key = %s and source_pk is not null",
                                   (method,)).fetchone()[0]
        assert n_tasks == 2 * N_SOURCES


def test_model_asset_refuses_a_too_small_training_set(clean_db: str) -> None:
    with dg.instance_for_test() as instance:
        result = materialize_assets(defs, [dg.AssetKey("thecannon_model")], instance=instance, log_level="CRITICAL",
                                    run_config={"ops": {"thecannon_model": {"config": {"n_train": 8,
                                                                                        "regions": "none"}}}})
    assert not result.success
    with connect() as conn:
        status, error = conn.execute("select status_code, error from astra.task where asset_key = 'thecannon_model'"
                                     ).fetchone()
    assert status == 30
    assert "8" in error and "coefficients" in error, error   # 10 coefficients for 3 labels, quadratic


def test_model_configs_match_the_methods_training_entry_points() -> None:
    """Every model Config field is a keyword of the method's train_model, with the same default
    (the asset passes the Config's fields straight through)."""
    import inspect

    from astra_dagster.defs import labels
    from astra_dagster.methods import apogeenet, ferre, thecannon, thepayne

    pairs = [(labels.TrainTheCannon, thecannon, thecannon.DEFAULT_TRAINING),
             (labels.TrainThePayne, thepayne, thepayne.DEFAULT_TRAINING),
             (labels.BuildFerreGrid, ferre, ferre.DEFAULT_GRID),
             (labels.TrainApogeeNet, apogeenet, {"n_train": apogeenet.DEFAULT_TRAINING["n_spectra"],
                                                 "epochs": apogeenet.DEFAULT_TRAINING["epochs"]})]
    for config_class, module, defaults in pairs:
        fields = labels.training_options(config_class())
        signature = inspect.signature(module.train_model)
        takes_options = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        for name, value in fields.items():
            if name in signature.parameters:
                default = signature.parameters[name].default
                assert default is inspect.Parameter.empty or default == value, (config_class.__name__, name)
            else:
                assert takes_options, (config_class.__name__, name)
            if name in defaults:
                assert defaults[name] == value, (config_class.__name__, name, defaults[name], value)


MASKED = "2M09100001+0000000"


def _mostly_masked(path: Path) -> Path:
    flux, sigma, mask, header = fx.apstar_arrays(1, seed=5)
    header["OBJID"] = MASKED
    mask[:, :8300] |= 1  # BADPIX over 97 % of the pixels
    write_apstar(path, flux, sigma, mask, header)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_bad_spectra_are_flagged_and_the_batch_goes_on(method: str, tmp_path: Path, clean_db: str) -> None:
    """A mostly-masked apStar and six line-poor toy spectra (no star the models know): every
    source ends with a task row, the masked one with no labels and a flag, never a crashed batch."""
    spec = METHODS[method]
    release = build_release(tmp_path / "data", "bad-labels", bad={MASKED: _mostly_masked})
    with dg.instance_for_test() as instance:
        assert materialize_assets(defs, [dg.AssetKey(spec["model"])], instance=instance, log_level="WARNING",
                                  run_config={"ops": {spec["model"]: {"config": spec["config"]}}}).success
        plan = plan_new_releases(instance, release.parent, None, block_size=100)
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
        outcomes = run_planned(defs, plan.runs, [dg.AssetKey("spectra"), dg.AssetKey(method)], instance=instance)
        assert all(o.success for o in outcomes)
        (counts,) = [c for o in outcomes for c in o.counts if c.asset == method]
        assert counts.computed + counts.failed == 7
    label = next(iter(spec["labels"]))
    with connect() as conn:
        tasks = conn.execute(
            f"select s.source_id, t.status_code, t.error, r.{label}, r.bitmask_flag from astra.task t "
            "join astra.source s on s.pk = t.source_pk "
            f"left join astra.{method} r on r.output_pk = t.output_pk where t.asset_key = %s",
            (method,)).fetchall()
    assert len(tasks) == 7
    for source_id, status, error, values, _flags in tasks:
        assert status in (1, 30), (source_id, status)
        assert (status == 30) == (values is None) == (error is not None), (source_id, status, error)
    masked = next(t for t in tasks if t[0] == MASKED)
    if masked[1] == 1:  # a result row: no invented labels, a flag saying why
        assert masked[3] == [None] and masked[4][0] != 0, masked
    else:
        assert MASKED in masked[2] or "pixel" in masked[2].lower(), masked
