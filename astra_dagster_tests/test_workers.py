"""Worker pools: the same rows and task_ids as the serial run (spectra + doppler on a synthetic
release), a worker that dies fails only the source it held, and the run goes on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.definitions import defs
from astra_dagster.lineage import store
from astra_dagster.lineage.sources import blocks_for, register_sources
from astra_dagster.orchestration.build import materialize_assets
from astra_dagster.orchestration.planned_runs import materialize_range
from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
from astra_dagster.spectra.release import generate_release
from astra_dagster_tests import lineage_assets

TEMPLATES = {"ops": {"doppler_templates": {"config": {"n_train": 600, "n_hot": 120, "seed": 7}}}}
TABLES = {"spectra": "spectrum", "doppler": "doppler"}
RESULT_COLUMNS = {
    "spectra": "r.path, r.kind, r.row_index, r.snr, r.mjd, r.sha256",
    "doppler": "r.vhelio, r.vrel, r.u_vrel, r.teff, r.logg, r.fe_h, r.chisq, r.bitmask_flag, r.vhelio_star",
}


def doppler_release(instance: dg.DagsterInstance, data: Path, name: str, n_sources: int, *, seed: int,
                    block: int) -> tuple[str, str]:
    """A synthetic release under ``data`` planned into ``instance`` with doppler's templates
    trained (TEMPLATES): the first and last of its partition keys."""
    generate_release(data, name, n_sources, seed=seed, progress=False)
    assert materialize_assets(defs, [dg.AssetKey("doppler_templates")], instance=instance,
                              run_config=TEMPLATES, log_level="WARNING").success
    plan = plan_new_releases(instance, data, None, block_size=block)
    instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
    return plan.new_partition_keys[0], plan.new_partition_keys[-1]


def snapshot(asset: str) -> list[tuple]:
    """(source, task_id, status, result columns) of every task of the asset, in source order (then by
    path, kind and row: one apStar file holds several rows of a task)."""
    with connect() as conn:
        return [tuple(r) for r in conn.execute(
            f"select s.source_id, t.task_id, t.status_code, {RESULT_COLUMNS[asset]} from astra.task t "
            f"join astra.source s on s.pk = t.source_pk join astra.{TABLES[asset]} r on r.output_pk = t.output_pk "
            f"where t.asset_key = %s order by s.pk, 2, 4, 5, 6", (asset,)).fetchall()]


@pytest.mark.slow
def test_pool_gives_the_serial_rows_and_task_ids(clean_db: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "4")
    keys = [dg.AssetKey("spectra"), dg.AssetKey("doppler")]
    with dg.instance_for_test() as instance:
        first, last = doppler_release(instance, tmp_path / "data", "pool-test", 8, seed=5, block=4)

        monkeypatch.setenv("ASTRA_WORKERS", "1")
        assert materialize_range(defs, keys, first, last, instance=instance).success
        serial = {a.path[-1]: snapshot(a.path[-1]) for a in keys}
        durations = dict(_rows("select pk, duration from astra.task where source_pk is not null"))

        # the same tasks again, forced, on two worker processes: ASTRA_WORKERS is no parameter
        monkeypatch.setenv("ASTRA_WORKERS", "2")
        forced = {"ops": {"spectra": {"config": {"force": True}}, "doppler": {"config": {"force": True}}}}
        result = materialize_range(defs, keys, first, last, instance=instance, run_config=forced)
        assert result.success
        messages = [e.user_message for e in instance.all_logs(result.run_id)]
        assert sum("on 2 worker processes" in m for m in messages) == 2, messages  # spectra and doppler
        pooled = {a.path[-1]: snapshot(a.path[-1]) for a in keys}
        new_durations = dict(_rows("select pk, duration from astra.task where source_pk is not null"))

    assert len(serial["spectra"]) > 8
    assert len(serial["doppler"]) == 8
    for asset in ("spectra", "doppler"):
        assert [r[:3] for r in pooled[asset]] == [r[:3] for r in serial[asset]]  # same tasks, same sources
        assert repr(pooled[asset]) == repr(serial[asset])  # same values, bit for bit (repr: NaN == NaN)
    # every task got its own positive science time on the workers too
    assert new_durations.keys() == durations.keys() and all(d > 0 for d in new_durations.values())


def _rows(sql: str) -> list[tuple]:
    with connect() as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
def squares_setup(clean_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dg.DagsterInstance, list[str]]]:
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "6")
    monkeypatch.setenv("ASTRA_WORKERS", "2")
    lineage_assets.create_tables(clean_db)
    with connect() as conn:
        pks = register_sources(conn, [f"SRC-{i}" for i in range(1, 6)] + ["SRC-CRASH-6"]
                               + [f"SRC-{i}" for i in range(7, 13)])
    keys = blocks_for(pks.values(), 6)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("source_blocks", keys)
        yield instance, keys


def test_a_worker_that_dies_fails_only_its_source(squares_setup) -> None:
    instance, keys = squares_setup
    result = lineage_assets.materialize_squares(instance, keys, {"sleep_seconds": 0.02})
    assert result.success
    rows = {sid: (status, error, value) for sid, status, error, value in _rows(
        "select s.source_id, t.status_code, t.error, r.value from astra.task t join astra.source s "
        "on s.pk = t.source_pk left join astra_test.square r on r.output_pk = t.output_pk")}
    status, error, value = rows.pop("SRC-CRASH-6")
    assert status == store.STATUS_FAILURE and value is None
    assert error == "worker process died (killed by SIGKILL) while computing SRC-CRASH-6"
    assert {sid: v for sid, (_, _, v) in rows.items()} == {
        f"SRC-{i}": float(i * i) for i in [*range(1, 6), *range(7, 13)]}
    assert {s for s, _, _ in rows.values()} == {store.STATUS_SUCCESS}


def test_worker_modules_do_not_import_dagster() -> None:
    """What a worker imports (the engine, the per-source tasks, their preloads) leaves Dagster
    out: a pool's start costs the method's imports only."""
    import subprocess
    import sys

    from astra_dagster.tasks import doppler, labels

    modules = ["astra_dagster.engines.work", "astra_dagster.engines.local", "astra_dagster.tasks.doppler",
               "astra_dagster.tasks.labels", *doppler.PRELOAD,
               *(m for method in ("thecannon", "thepayne", "ferre", "apogeenet") for m in labels.preload(method))]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'psycopg', 'pydantic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_jobs_start_with_the_costliest_and_shrink_towards_the_end() -> None:
    from astra_dagster.engines.work import Work
    from astra_dagster.lineage.batch import _jobs

    work = Work(print)
    order = list(range(199, -1, -1))
    jobs = _jobs(work, 200, 2, order)
    assert sorted(i for job in jobs for i in job) == list(range(200))  # each index once
    assert jobs[0][0] == 199 and max(map(len, jobs)) == 8 and len(jobs[-1]) == 1
    sizes = [len(j) for j in jobs]
    assert sizes == sorted(sizes, reverse=True)
    chunked = _jobs(Work(print, chunk_function=lambda s, items: [], chunk_size=64), 200, 2)
    assert [len(j) for j in chunked] == [64, 64, 64, 8]
