"""Dask as the engine: a LocalCluster, and a real Slurm cluster (``slurm`` tests: spectra +
doppler over Slurm-launched Dask workers give the rows of the local run).

The Slurm test needs a running cluster: ``scripts/slurm-local.sh start`` makes a one-node one on
this machine (``.ci/run`` does, and sets ASTRA_REQUIRE_SLURM=1 so that it cannot skip there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.definitions import defs
from astra_dagster.engines.dask import DaskEngine
from astra_dagster.lineage.sources import blocks_for, register_sources
from astra_dagster.orchestration.planned_runs import materialize_range
from astra_dagster_tests import lineage_assets
from astra_dagster_tests.test_workers import doppler_release, snapshot

REPO = Path(__file__).resolve().parents[1]


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in proc.stdout.split())


@pytest.fixture
def slurm() -> None:
    if not _slurm_up():
        if os.environ.get("ASTRA_REQUIRE_SLURM"):
            pytest.fail("ASTRA_REQUIRE_SLURM is set but no Slurm node is up (scripts/slurm-local.sh start)")
        pytest.skip("no Slurm cluster here (scripts/slurm-local.sh start makes a one-node one)")


@pytest.mark.slow
def test_dask_local_cluster_gives_the_serial_results(clean_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "5")
    lineage_assets.create_tables(clean_db)
    with connect() as conn:
        pks = register_sources(conn, [f"SRC-{i}" for i in range(1, 11)] + ["SRC-BAD-11"])
    keys = blocks_for(pks.values(), 5)
    monkeypatch.setenv("ASTRA_ENGINE", "dask")
    monkeypatch.setenv("ASTRA_WORKERS", "2")
    try:
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("source_blocks", keys)
            result = lineage_assets.materialize_squares(instance, keys)
            assert result.success
            messages = [e.user_message for e in instance.all_logs(result.run_id)]
    finally:
        DaskEngine.close_all()
    assert any("a Dask LocalCluster of 2 workers" in m for m in messages), messages
    with connect() as conn:
        rows = dict(conn.execute(
            "select s.source_id, coalesce(r.value::text, t.error) from astra.task t join astra.source s "
            "on s.pk = t.source_pk left join astra_test.square r on r.output_pk = t.output_pk").fetchall())
    assert rows.pop("SRC-BAD-11") == "ValueError: SRC-BAD-11: corrupt input (test)"
    assert rows == {f"SRC-{i}": str(i * i) for i in range(1, 11)}


@pytest.mark.slow
@pytest.mark.slurm
def test_spectra_and_doppler_on_slurm_workers_equal_the_local_run(
        slurm: None, clean_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "3")
    keys = [dg.AssetKey("spectra"), dg.AssetKey("doppler")]
    with dg.instance_for_test() as instance:
        first, last = doppler_release(instance, tmp_path / "data", "slurm-test", 6, seed=9, block=3)

        monkeypatch.setenv("ASTRA_WORKERS", "1")
        assert materialize_range(defs, keys, first, last, instance=instance).success
        local = {a.path[-1]: snapshot(a.path[-1]) for a in keys}

        # the same tasks, forced, on Dask workers that Slurm starts (one job, two worker processes)
        monkeypatch.setenv("ASTRA_ENGINE", "dask")
        monkeypatch.setenv("ASTRA_DASK_CLUSTER", "slurm")
        monkeypatch.setenv("ASTRA_SLURM_PARTITION", "debug")
        monkeypatch.setenv("ASTRA_SLURM_CORES", "2")
        monkeypatch.setenv("ASTRA_SLURM_MEMORY", "3GB")
        monkeypatch.setenv("ASTRA_SLURM_TIME", "00:20:00")
        monkeypatch.setenv("ASTRA_SLURM_LOG_DIR", str(tmp_path / "slurm-logs"))
        monkeypatch.setenv("ASTRA_SLURM_WAIT", "240")
        # the workers import this checkout, wherever the venv's editable install points
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        forced = {"ops": {"spectra": {"config": {"force": True}}, "doppler": {"config": {"force": True}}}}
        try:
            result = materialize_range(defs, keys, first, last, instance=instance, run_config=forced)
            assert result.success
            messages = [e.user_message for e in instance.all_logs(result.run_id)]
            jobs = subprocess.run(["squeue", "-h", "-o", "%j %T"], capture_output=True, text=True).stdout
        finally:
            DaskEngine.close_all()
        on_slurm = {a.path[-1]: snapshot(a.path[-1]) for a in keys}
    assert sum("Dask workers in 1 Slurm job(s)" in m for m in messages) == 2, messages
    assert "dask-worker RUNNING" in jobs, jobs
    assert repr(on_slurm) == repr(local)  # same tasks and values, bit for bit
