"""The doppler asset on a small synthetic release: one row per source with an element per visit,
velocities close to the truth, lineage that names the spectra and template tasks."""

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
from astra_dagster.spectra.release import generate_release, read_truth

# A smaller template training than the default keeps the test quick; accuracy is the bench's job.
TEMPLATES = {"ops": {"doppler_templates": {"config": {"n_train": 600, "n_hot": 120, "seed": 7}}}}


@pytest.mark.slow
def test_doppler_on_a_synthetic_release(clean_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "5")
    release = generate_release(tmp_path / "data", "rv-test", 8, seed=11, progress=False)
    with dg.instance_for_test() as instance:
        trained = materialize_assets(defs, [dg.AssetKey("doppler_templates")], instance=instance,
                                     run_config=TEMPLATES, log_level="WARNING")
        assert trained.success
        plan = plan_new_releases(instance, tmp_path / "data", None, block_size=5)
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
        keys = [dg.AssetKey("spectra"), dg.AssetKey("doppler")]
        outcomes = run_planned(defs, plan.runs, keys, instance=instance)
        assert all(o.success for o in outcomes)
        assert {(c.asset, c.computed, c.failed) for o in outcomes for c in o.counts} == {
            ("spectra", 8, 0), ("doppler", 8, 0)}

        with connect() as conn:
            rows = conn.execute(
                "select s.source_id, d.vhelio, d.mjd, d.u_vrel, d.bitmask_flag, d.vhelio_star "
                "from astra.doppler d join astra.task t on t.output_pk = d.output_pk "
                "join astra.source s on s.pk = t.source_pk").fetchall()
            params = dict(conn.execute(
                "select p.parameter_name, p.parameter_value from astra.task t "
                "join astra.task_parameter tp on tp.task_pk = t.pk join astra.parameter p on p.pk = tp.parameter_pk "
                "where t.asset_key = 'doppler' and t.source_pk = 1").fetchall())
        _, visits = read_truth(release)
        truth = {(v["source_id"], v["mjd"]): v["v_bary"] for v in visits}
        assert len(rows) == 8
        deltas = []
        for source_id, vhelio, mjds, u_vrel, flags, _ in rows:
            n_visits = sum(1 for v in visits if v["source_id"] == source_id)
            assert len(vhelio) == len(mjds) == len(u_vrel) == len(flags) == n_visits
            deltas += [vh - truth[(source_id, m)] for vh, m in zip(vhelio, mjds, strict=True)]
        assert np.nanmedian(np.abs(deltas)) < 0.3, deltas  # km/s, with a small template set
        assert params["input_task_id"].startswith("Spectra.RegisterSpectra_")
        assert params["templates_task_id"].startswith("Doppler.TrainTemplates_")

        # Nothing changed: a second run skips every source.
        again = run_planned(defs, plan.runs, keys, instance=instance)
        assert [(c.asset, c.computed, c.skipped) for c in counts_of_all(again)] == [("spectra", 0, 8), ("doppler", 0, 8)]


def counts_of_all(outcomes: list) -> list:
    return [c for o in outcomes for c in o.counts]
