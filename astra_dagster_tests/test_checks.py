"""The method assets' checks: a real range run of a label asset on a small synthetic release
evaluates the four checks after it (finite labels, uncertainties, flagged fraction, accuracy vs
the release's truth with WARN severity), a run that only skips checks nothing new, and the check
functions catch what they are for on tables that break them."""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from astra_dagster.definitions import defs
from astra_dagster.orchestration.build import materialize_assets
from astra_dagster.orchestration.planned_runs import materialize_range
from astra_dagster.products import quality as qa
from astra_dagster.products import summary as sm
from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
from astra_dagster.spectra.release import generate_release

CANNON = {"ops": {"thecannon_model": {"config": {"n_train": 300, "seed": 5, "regions": "none"}}}}


def assert_png(markdown: str, max_bytes: int = 120_000) -> bytes:
    """The markdown is one image with a PNG data URI, of a sensible size; returns the PNG."""
    prefix = "data:image/png;base64,"
    assert markdown.startswith("![") and prefix in markdown and markdown.endswith(")"), markdown[:80]
    png = base64.b64decode(markdown.split(prefix, 1)[1][:-1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 2_000 < len(png) < max_bytes, len(png)
    return png


def _evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


@pytest.mark.slow
def test_checks_run_after_a_label_run(tmp_path: Path, clean_db: str) -> None:
    release = generate_release(tmp_path / "data", "checks-test", 5, seed=31, progress=False)
    with dg.instance_for_test() as instance:
        assert materialize_assets(defs, [dg.AssetKey("thecannon_model")], instance=instance, log_level="WARNING",
                                  run_config=CANNON).success
        plan = plan_new_releases(instance, release.parent, None, block_size=100)
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
        (run,) = plan.runs
        keys = [dg.AssetKey("spectra"), dg.AssetKey("thecannon")]
        result = materialize_range(defs, keys, run.first, run.last, instance=instance)
        assert result.success
        checks = _evaluations(result)
        assert set(checks) == {"finite_labels", "uncertainties", "flagged_fraction", "accuracy_vs_truth"}
        assert all(c.asset_key == dg.AssetKey("thecannon") for c in checks.values())
        assert checks["finite_labels"].passed and checks["uncertainties"].passed
        assert checks["finite_labels"].metadata["rows"].value >= 5
        assert checks["accuracy_vs_truth"].severity == dg.AssetCheckSeverity.WARN
        targets = checks["accuracy_vs_truth"].metadata["targets"].value
        assert {t["label"] for t in targets} == {"teff", "logg", "fe_h"}
        assert all(t["pass"] == (t["rms"] is None or t["rms"] <= t["limit"]) for t in targets)
        assert 0 <= checks["flagged_fraction"].metadata["fraction"].value <= 1

        # the materialisation carries the plots: Kiel diagram, Δ vs truth, accuracy per S/N bin
        (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("thecannon")]
        meta = event.materialization.metadata
        for name in ("kiel_diagram", "delta_vs_truth"):
            assert_png(meta[name].value)
        records = meta["accuracy_by_snr"].value.records
        assert {r.data["label"] for r in records} >= {"teff", "logg", "fe_h"}
        assert all(r.data["n"] > 0 and r.data["rms"] >= 0 for r in records)

        # the same range again: every task skipped, nothing new to check
        again = _evaluations(materialize_range(defs, keys, run.first, run.last, instance=instance))
        assert again["finite_labels"].passed and again["finite_labels"].metadata["rows"].value == 0
        # the checks are recorded on the instance, as the UI's Checks tab reads them
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("thecannon"), "finite_labels")])
        assert record


def _table(teff: list[float], u_teff: list[float], flags: list[int]) -> sm.SummaryTable:
    n = len(teff)
    return sm.SummaryTable("astraAllStarTheCannon", {
        "source_id": np.array([f"S{i}" for i in range(n)]),
        "release": np.array(["r"] * n), "snr": np.full(n, 80.0, dtype=np.float32),
        "teff": np.array(teff, dtype=np.float32), "u_teff": np.array(u_teff, dtype=np.float32),
        "bitmask_flag": np.array(flags), "flag_names": np.array(["HIGH_CHI2" if f else "" for f in flags]),
    }, {"labels": ["teff"]})


def test_check_functions_catch_what_they_are_for() -> None:
    spec = sm.method_spec("thecannon")
    good = _table([5000.0, 4800.0, 4700.0, 4600.0, np.nan], [50.0, 40.0, 40.0, 40.0, np.nan], [0, 0, 0, 0, 32])
    assert all(o.passed for o in qa.run_checks(spec, good, None))

    nan = qa.finite_labels(spec, _table([5000.0, np.nan, np.inf], [50.0, 1.0, 1.0], [0, 0, 0]))
    assert not nan.passed and nan.metadata["unflagged_nonfinite"] == 2 and nan.severity == "ERROR"
    assert nan.metadata["examples"] == ["S1 (teff)", "S2 (teff)"]
    bad_u = qa.uncertainties(spec, _table([5000.0, 4000.0, 4500.0], [0.0, -3.0, np.nan], [0, 0, 0]))
    assert not bad_u.passed and bad_u.metadata["bad_uncertainties"] == 3
    many = qa.flagged_fraction(spec, _table([1.0] * 4, [1.0] * 4, [32, 32, 0, 0]))
    assert not many.passed and many.severity == "WARN" and many.metadata["flags"] == {"HIGH_CHI2": 2}

    truth = qa.Truth({"S0": {"teff": 5000.0, "kind": "giant"}, "S1": {"teff": 4000.0, "kind": "giant"}}, {})
    off = qa.accuracy(spec, _table([5100.0, 4100.0], [50.0, 50.0], [0, 0]), truth)
    (teff,) = off.metadata["targets"]
    assert not off.passed and off.severity == "WARN" and teff["rms"] == 100.0 and teff["limit"] == 60.0
    close = qa.accuracy(spec, _table([5010.0, 3990.0], [50.0, 50.0], [0, 0]), truth)
    assert close.passed
