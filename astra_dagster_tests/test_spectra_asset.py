"""The spectra asset and the release plan on small releases built from fixture files: spectrum
rows, per-source errors for bad files, memoisation, and a new release that changes one source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.definitions import defs
from astra_dagster.defs.sensors import release_sensor
from astra_dagster.defs.spectra import spectra
from astra_dagster.orchestration.planned_runs import run_planned
from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases, read_cursor
from astra_dagster.spectra.manifest import ReleaseSource, file_entry, write_manifest
from astra_dagster_tests import fixtures_bad_fits as fx

GOOD = [f"2M0000000{i}+0000000" for i in range(1, 7)]


def build_release(root: Path, name: str, extra_visit: set[str] = frozenset(), bad: dict | None = None) -> Path:
    """Six good sources (an apStar with 2 visits and 2 apVisit files each) plus ``bad`` ones."""
    release = root / name
    sources = []
    for n, sid in enumerate(GOOD):
        visits = 3 if sid in extra_visit else 2
        files = [file_entry(release, fx.write_good_apstar(release / f"apStar/apStar-{sid}.fits", visits, sid, n),
                            "apStar")]
        for v in range(visits):
            path = fx.write_good_apvisit(release / f"apVisit/apVisit-{sid}-{59000 + v}.fits", sid, n, 59000 + v)
            files.append(file_entry(release, path, "apVisit"))
        sources.append(ReleaseSource(sid, tuple(files), ra=float(n), dec=0.0))
    for sid, writer in (bad or {}).items():
        path = release / f"apStar/apStar-{sid}.fits"
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
        sources.append(ReleaseSource(sid, (file_entry(release, path, "apStar"),)))
    write_manifest(release, name, sources, seed=0)
    return release


def bad_sources(root: Path) -> dict:
    def missing(path: Path) -> Path:  # listed in the manifest, then deleted
        fx.write_good_apstar(path, source_id="2M09000003+0000000")
        return path

    def other_source(path: Path) -> Path:
        return fx.write_good_apstar(path, source_id="2M55555555+5555555")

    return {"2M09000001+0000000": fx.write_truncated, "2M09000002+0000000": fx.write_negative_sigma,
            "2M09000003+0000000": missing, "2M09000004+0000000": other_source,
            "2M09000005+0000000": fx.write_all_nan_flux}


@pytest.fixture
def instance(clean_db: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "4")
    with dg.instance_for_test() as inst:
        yield inst


def test_release_to_spectrum_rows_with_per_source_errors(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    release = build_release(data_root, "r1", bad=bad_sources(tmp_path))
    (release / "apStar" / "apStar-2M09000003+0000000.fits").unlink()
    (data_root / "r2-half-written").mkdir()

    plan = plan_new_releases(instance, data_root, None, block_size=4)
    assert [r.release for r in plan.registrations] == ["r1"]
    assert plan.new_partition_keys == ["00000001-00000004", "00000005-00000008", "00000009-00000012"]
    assert [(r.first, r.last) for r in plan.runs] == [("00000001-00000004", "00000009-00000012")]
    instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
    outcome = run_planned(defs, plan.runs, [spectra.key], instance=instance)[0]
    assert outcome.success
    assert [(c.computed, c.skipped, c.failed) for c in outcome.counts] == [(6, 0, 5)]

    with connect() as conn:
        per_source = dict(conn.execute(
            "select s.source_id, count(*) from astra.spectrum sp join astra.source s on s.pk = sp.source_pk "
            "group by 1").fetchall())
        errors = dict(conn.execute(
            "select s.source_id, t.error from astra.task t join astra.source s on s.pk = t.source_pk "
            "where t.status_code = 30").fetchall())
        kinds = conn.execute("select kind, frame, file_format, count(*) from astra.spectrum "
                             "group by 1, 2, 3 order by 1, 2, 3").fetchall()
    assert per_source == {sid: 6 for sid in GOOD}  # 2 stacks + 2 apStar visits + 2 apVisit
    assert kinds == [("stack", "rest", "apStar", 12), ("visit", "observed", "apVisit", 12),
                     ("visit", "rest", "apStar", 12)]
    expected = {"2M09000001+0000000": "truncated", "2M09000002+0000000": "negative flux error",
                "2M09000003+0000000": "listed in the manifest but missing",
                "2M09000004+0000000": "holds source 2M55555555+5555555",
                "2M09000005+0000000": "all-NaN"}
    for sid, message in expected.items():
        assert message in errors[sid] and f"apStar-{sid}.fits" in errors[sid]

    # Identical again: nothing new to plan, and a forced run over the range skips everything.
    again = plan_new_releases(instance, data_root, json.dumps(plan.cursor), block_size=4)
    assert again.registrations == [] and again.runs == []
    rerun = run_planned(defs, plan.runs, [spectra.key], instance=instance)[0]
    assert [(c.computed, c.skipped, c.failed) for c in rerun.counts] == [(0, 6, 5)]


def test_new_release_reruns_only_changed_sources(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    build_release(data_root, "r1")
    plan = plan_new_releases(instance, data_root, None, block_size=4)
    instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
    assert counts_of_all(run_planned(defs, plan.runs, [spectra.key], instance=instance)) == (6, 0, 0)

    # r2: the same sources, one with a new visit. Files of the others are byte-identical.
    build_release(data_root, "r2", extra_visit={GOOD[4]})
    for sid in GOOD[:4] + GOOD[5:]:
        assert (data_root / "r2" / f"apStar/apStar-{sid}.fits").read_bytes() == \
            (data_root / "r1" / f"apStar/apStar-{sid}.fits").read_bytes()
    plan2 = plan_new_releases(instance, data_root, json.dumps(plan.cursor), block_size=4)
    assert [r.release for r in plan2.registrations] == ["r2"]
    assert plan2.registrations[0].changed_pks == [5]
    assert [(r.first, r.last) for r in plan2.runs] == [("00000005-00000008", "00000005-00000008")]
    assert counts_of_all(run_planned(defs, plan2.runs, [spectra.key], instance=instance)) == (1, 1, 0)
    with connect() as conn:
        rows = conn.execute(
            "select r.name, count(*) from astra.spectrum sp join astra.data_release r on r.pk = sp.release_pk "
            "join astra.task t on t.output_pk = sp.output_pk where sp.source_pk = 5 group by 1 order by 1"
        ).fetchall()
    assert rows == [("r1", 6), ("r2", 8)]  # history kept: the new task has 2 more spectra


def counts_of_all(outcomes: list) -> tuple[int, int, int]:
    totals = [0, 0, 0]
    for outcome in outcomes:
        assert outcome.success
        for c in outcome.counts:
            totals = [totals[0] + c.computed, totals[1] + c.skipped, totals[2] + c.failed]
    return tuple(totals)


def test_release_sensor_requests_range_runs(instance: dg.DagsterInstance, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data_root = tmp_path / "data"
    monkeypatch.setenv("ASTRA_DATA_ROOT", str(data_root))
    monkeypatch.setenv("ASTRA_RELEASE_ASSETS", "spectra")
    data_root.mkdir()
    context = dg.build_sensor_context(instance=instance, definitions=defs)
    assert isinstance(release_sensor(context), dg.SensorResult)  # no release: a skip reason
    build_release(data_root, "r1")
    result = release_sensor(dg.build_sensor_context(instance=instance, definitions=defs))
    assert [r.tags["dagster/asset_partition_range_start"] for r in result.run_requests] == ["00000001-00000004"]
    assert result.run_requests[0].tags["dagster/asset_partition_range_end"] == "00000005-00000008"
    assert result.run_requests[0].run_key.startswith("r1:")
    assert result.dynamic_partitions_requests[0].partition_keys == ["00000001-00000004", "00000005-00000008"]
    releases, waiting = read_cursor(result.cursor)
    assert list(releases) == ["r1"] and waiting == []
    # A release without manifest is not read; a new tick with the same cursor plans nothing.
    shutil.copytree(data_root / "r1", data_root / "r2")
    (data_root / "r2" / "manifest.json").unlink()
    again = release_sensor(dg.build_sensor_context(instance=instance, definitions=defs, cursor=result.cursor))
    assert again.run_requests == [] and again.skip_reason is not None
