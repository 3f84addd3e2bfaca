"""Summary files on a small synthetic release: the summary assets and ``astra export`` write
astraAllStar<Method> / astraAllVisitDoppler files that astropy and pyarrow read, one row per
source and stack (or visit), every unflagged label equal to the database's, with a summary task
in the lineage tables; an unchanged release is skipped, a deleted file is rewritten, a partly
computed release says how many sources are missing, bad input is one line with exit 2."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table
from click.testing import CliRunner

from astra_dagster.cli.main import main as astra_cli
from astra_dagster.db.connection import connect
from astra_dagster.definitions import defs
from astra_dagster.orchestration.build import materialize_assets
from astra_dagster.orchestration.planned_runs import run_planned
from astra_dagster.products import summary as sm
from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
from astra_dagster.spectra.release import generate_release
from astra_dagster_tests.test_checks import assert_png

N_SOURCES = 6
RELEASE = "summary-test"
CANNON = {"ops": {"thecannon_model": {"config": {"n_train": 300, "seed": 5, "regions": "none"}}}}
TEMPLATES = {"ops": {"doppler_templates": {"config": {"n_train": 600, "n_hot": 120, "seed": 7}}}}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_release(tmp_path_factory.mktemp("summary") / "data", RELEASE, N_SOURCES, seed=23,
                            progress=False)


def _run(instance: dg.DagsterInstance, release: Path, model_key: str, run_config: dict, method: str,
         blocks: int | None = None) -> None:
    assert materialize_assets(defs, [dg.AssetKey(model_key)], instance=instance, log_level="WARNING",
                              run_config=run_config).success
    plan = plan_new_releases(instance, release.parent, None, block_size=3)
    instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
    runs = plan.runs
    if blocks is not None:  # only the first block(s): a partly computed release
        from dataclasses import replace

        first = runs[0]
        runs = [replace(first, last=plan.new_partition_keys[blocks - 1])]
    outcomes = run_planned(defs, runs, [dg.AssetKey("spectra"), dg.AssetKey(method)], instance=instance)
    assert all(o.success for o in outcomes)


def _db_elements(method: str, columns: list[str]) -> dict[tuple[str, int], dict]:
    """(source_id, element index) → the table's values, from the newest task per source."""
    with connect() as conn:
        rows = conn.execute(
            f"select distinct on (s.source_id) s.source_id, r.bitmask_flag, {', '.join('r.' + c for c in columns)} "
            f"from astra.{method} r join astra.task t on t.output_pk = r.output_pk "
            "join astra.source s on s.pk = t.source_pk where t.status_code = 1 "
            "order by s.source_id, t.modified desc").fetchall()
    out = {}
    for source_id, flags, *values in rows:
        for i, flag in enumerate(flags):
            out[(source_id, i)] = {"bitmask_flag": flag, **{c: v[i] for c, v in zip(columns, values, strict=True)}}
    return out


def _check_against_db(table: Table, method: str, labels: list[str]) -> int:
    """Every row's unflagged labels equal the database's (float32 of the same real); returns how
    many label values were compared."""
    db = _db_elements(method, labels + [f"u_{c}" for c in labels])
    assert len(table) == len(db)
    seen: dict[str, int] = {}
    compared = 0
    for row in table:
        i = seen.get(row["source_id"], 0)
        seen[row["source_id"]] = i + 1
        expected = db[(row["source_id"], i)]
        assert row["bitmask_flag"] == expected["bitmask_flag"]
        if expected["bitmask_flag"]:
            continue
        for c in labels:
            for name in (c, f"u_{c}"):
                value = expected[name]
                if value is None:
                    assert np.isnan(row[name]), (row["source_id"], name)
                else:
                    assert row[name] == np.float32(value), (row["source_id"], name, row[name], value)
                    compared += 1
    return compared


@pytest.mark.slow
def test_thecannon_summary_asset_and_export(release: Path, clean_db: str, tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        _run(instance, release, "thecannon_model", CANNON, "thecannon", blocks=1)
        with connect() as conn:
            n_done = conn.execute("select count(*) from astra.task where asset_key = 'thecannon' and source_pk is not null "
                                  "and status_code = 1").fetchone()[0]
        assert 0 < n_done < N_SOURCES

        result = materialize_assets(defs, [dg.AssetKey("thecannon_summary")], instance=instance,
                                    log_level="WARNING")
        assert result.success
        (event,) = result.get_asset_materialization_events()
        meta = event.materialization.metadata
        path = Path(meta[f"{RELEASE}/astraAllStarTheCannon-0.1.0.fits"].value)
        assert path == sm.summary_directory(Path(os.environ["ASTRA_HOME"]),
                                            RELEASE) / "astraAllStarTheCannon-0.1.0.fits"
        sha = meta[f"{RELEASE}/astraAllStarTheCannon-0.1.0.fits/sha256"].value
        assert sha == hashlib.sha256(path.read_bytes()).hexdigest()

        table = Table.read(path)
        assert_png(meta[f"{RELEASE}/kiel_diagram"].value)
        assert_png(meta[f"{RELEASE}/delta_vs_truth"].value)
        assert meta[f"{RELEASE}/accuracy_by_snr"].value.records
        labels = [c for c in ("teff", "logg", "fe_h") if c in table.colnames]
        assert labels == ["teff", "logg", "fe_h"]
        assert meta[f"{RELEASE}/astraAllStarTheCannon-0.1.0.fits/rows"].value == len(table)
        assert meta["dagster/row_count"].value == len(table)  # the UI's row count: the file's, not 1 task
        with connect() as conn:
            n_elements = conn.execute(
                "select sum(cardinality(r.bitmask_flag)) from astra.thecannon r "
                "join astra.task t on t.output_pk = r.output_pk where t.status_code = 1").fetchone()[0]
            files = conn.execute(
                "select t.task_id, t.status_code, f.path, f.sha256, f.n_rows, f.n_missing from astra.task t "
                "join astra.summary_file f on f.output_pk = t.output_pk "
                "where t.asset_key = 'thecannon_summary' order by f.pk").fetchall()
            params = dict(conn.execute(
                "select p.parameter_name, p.parameter_value from astra.task t "
                "join astra.task_parameter tp on tp.task_pk = t.pk join astra.parameter p on p.pk = tp.parameter_pk "
                "where t.asset_key = 'thecannon_summary'").fetchall())
        assert len(table) == n_elements
        assert _check_against_db(table, "thecannon", labels) > 0
        assert table["teff"].unit == "K" and table["u_teff"].unit == "K"
        assert "Effective temperature" in table["teff"].description
        assert set(table["release"]) == {RELEASE}
        assert all(t.startswith("TheCannon.EstimateStellarLabelsGivenApStarFile_") for t in table["task_id"])
        header = fits.getheader(path, 1)
        assert header["TTYPE5"] and header["TCOMM1"].startswith("Primary key")
        assert fits.getheader(path, 0)["NMISSING"] == N_SOURCES - n_done

        parquet = pq.read_table(path.with_suffix(".parquet"))
        assert parquet.num_rows == len(table)
        assert parquet.schema.field("teff").metadata[b"unit"] == b"K"
        assert np.array_equal(parquet.column("teff").to_numpy(), np.asarray(table["teff"]), equal_nan=True)

        # the lineage: one summary task (release, fingerprint) with a row per file
        assert [(f[1], Path(f[2]).suffix, f[3], f[4], f[5]) for f in files] == [
            (1, ".fits", sha, len(table), N_SOURCES - n_done), (1, ".parquet", files[1][3], len(table),
                                                                 N_SOURCES - n_done)]
        assert files[0][0].startswith("Summary.AstraAllStarTheCannon_")
        assert params["release"] == RELEASE and len(params["input_fingerprint"]) == 64

        # unchanged results: the summary task is skipped, its files reported again
        again = materialize_assets(defs, [dg.AssetKey("thecannon_summary")], instance=instance, log_level="WARNING")
        (event,) = again.get_asset_materialization_events()
        assert event.materialization.metadata["astra/skipped"].value == 1
        assert event.materialization.metadata[f"{RELEASE}/astraAllStarTheCannon-0.1.0.fits/sha256"].value == sha
        # a deleted file is written again
        path.unlink()
        assert materialize_assets(defs, [dg.AssetKey("thecannon_summary")], instance=instance,
                                  log_level="WARNING").success
        assert path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha

    # the same from the shell, as CSV; partly computed, so it says how many are missing
    runner = CliRunner()
    out = runner.invoke(astra_cli, ["export", "--method", "thecannon", "--release", RELEASE, "--format", "csv"])
    assert out.exit_code == 0, out.output
    assert f"{N_SOURCES - n_done} of {N_SOURCES} sources of {RELEASE} have no thecannon result" in out.output
    csv_path = path.with_suffix(".csv")
    assert str(csv_path) in out.output
    assert len(Table.read(csv_path, format="ascii.csv")) == len(table)

    for args, word in ((["--method", "nosuch", "--release", RELEASE], "nosuch"),
                       (["--method", "thecannon", "--release", "dr-nosuch"], "dr-nosuch")):
        bad = runner.invoke(astra_cli, ["export", *args])
        assert bad.exit_code == 2, bad.output
        lines = bad.output.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], bad.output


@pytest.mark.slow
def test_doppler_summaries_per_star_and_per_visit(release: Path, clean_db: str) -> None:
    with dg.instance_for_test() as instance:
        _run(instance, release, "doppler_templates", TEMPLATES, "doppler")
        # a range run of two blocks: the plots ride on one event, the latest (the one the UI shows)
        records = instance.fetch_materializations(dg.AssetKey("doppler"), limit=10).records
        assert len(records) == 2
        with_plots = [r for r in records if "kiel_diagram" in r.asset_materialization.metadata]
        assert len(with_plots) == 1
        latest = instance.get_latest_materialization_event(dg.AssetKey("doppler")).asset_materialization
        assert_png(latest.metadata["rv_error_vs_snr"].value) and assert_png(latest.metadata["rv_scatter"].value)
        result = materialize_assets(defs, [dg.AssetKey("doppler_summary")], instance=instance, log_level="WARNING")
        assert result.success
        (event,) = result.get_asset_materialization_events()
        for name in ("kiel_diagram", "rv_scatter", "rv_error_vs_snr", "delta_vs_truth"):
            assert_png(event.materialization.metadata[f"{RELEASE}/{name}"].value)
        labels = {r.data["label"] for r in event.materialization.metadata[f"{RELEASE}/accuracy_by_snr"].value.records}
        assert "vrel" in labels
    directory = sm.summary_directory(Path(os.environ["ASTRA_HOME"]), RELEASE)
    stars = Table.read(directory / "astraAllStarDoppler-0.1.0.fits")
    visits = Table.read(directory / "astraAllVisitDoppler-0.1.0.fits")
    assert len(stars) == N_SOURCES
    with connect() as conn:
        n_visits = conn.execute("select sum(cardinality(vrel)) from astra.doppler").fetchone()[0]
        star_db = dict(conn.execute("select s.source_id, d.vhelio_star from astra.doppler d join astra.task t "
                                    "on t.output_pk = d.output_pk join astra.source s on s.pk = t.source_pk"
                                    ).fetchall())
    assert len(visits) == n_visits and int(np.sum(stars["n_visits"])) == n_visits
    assert visits["vrel"].unit == "km / s" and "mjd" in visits.colnames and "file" in visits.colnames
    assert _check_against_db(visits, "doppler", ["vrel", "teff", "logg", "fe_h"]) > 0
    for row in stars:
        expected = star_db[row["source_id"]]
        assert (np.isnan(row["vhelio_star"]) if expected is None else row["vhelio_star"] == np.float32(expected))
