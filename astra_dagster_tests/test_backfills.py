"""Backfills from the command line, end to end with a real webserver and daemon:
`dagster job backfill` (one run per block), `dagster asset materialize --partition-range`
(one run, in process) and `astra backfill` (policy-aware asset backfill through GraphQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from astra_dagster.db.connection import _ensure_database, _with_database, connect, database_url
from astra_dagster.lineage.sources import blocks_for, register_sources
from astra_dagster.orchestration.instance import write_dagster_yaml
from astra_dagster.settings import get_settings
from astra_dagster_tests import lineage_assets
from astra_dagster_tests.dagster_processes import dagster_services

MODULE = "astra_dagster_tests.lineage_assets"


def squares_by_scale() -> dict[str, int]:
    with connect() as conn:
        rows = conn.execute(
            "select p.parameter_value, count(*) from astra.task t "
            "join astra.task_parameter tp on tp.task_pk = t.pk "
            "join astra.parameter p on p.pk = tp.parameter_pk and p.parameter_name = 'scale' "
            "where t.source_pk is not null and t.status_code = 1 group by 1").fetchall()
    return dict(rows)


def wait_for_runs(instance: dg.DagsterInstance, tags: dict[str, str], n: int, timeout: float = 240) -> list:
    deadline = time.monotonic() + timeout
    while True:
        runs = instance.get_runs(filters=dg.RunsFilter(tags=tags))
        finished = [r for r in runs if r.is_finished]
        if len(runs) >= n and len(finished) == len(runs):
            return runs
        if time.monotonic() > deadline:
            pytest.fail(f"runs with {tags} not finished: {[(r.run_id, r.status) for r in runs]}")
        time.sleep(1)


@pytest.mark.slow
def test_three_ways_to_backfill(clean_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A private Dagster database and home, so partitions and runs of other tests do not mix in.
    server = database_url()
    _ensure_database(server, "astra_dagster_e2e")
    env = {
        "ASTRA_SOURCES_PER_PARTITION": "3",
        "ASTRA_DAGSTER_DATABASE_URL": _with_database(server, "astra_dagster_e2e"),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    write_dagster_yaml(get_settings())
    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    lineage_assets.create_tables(clean_db)
    with connect() as conn:
        pks = register_sources(conn, [f"SRC-{i}" for i in range(1, 10)])
    keys = blocks_for(pks.values(), 3)
    for key in instance.get_dynamic_partitions("source_blocks"):
        instance.delete_dynamic_partition("source_blocks", key)
    instance.add_dynamic_partitions("source_blocks", keys)
    bin_dir = Path(sys.executable).parent

    with dagster_services(MODULE, env, tmp_path) as url:
        # 1. dagster job backfill: one run per partition, queued and run by the daemon.
        proc = subprocess.run(
            [str(bin_dir / "dagster"), "job", "backfill", "-m", MODULE, "-j", "squares_job",
             "--from", keys[0], "--to", keys[-1], "--noprompt"],
            capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        backfill_ids = {r.tags.get("dagster/backfill") for r in instance.get_runs() if r.tags.get("dagster/backfill")}
        assert len(backfill_ids) == 1
        runs = wait_for_runs(instance, {"dagster/backfill": backfill_ids.pop()}, len(keys))
        assert len(runs) == 3 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert squares_by_scale() == {"1.0": 9}

        # 2. astra backfill: an asset backfill through GraphQL; the single-run policy makes one run.
        config = {"ops": {"squares": {"config": {"scale": 2.0}}}}
        proc = subprocess.run(
            [str(bin_dir / "astra"), "backfill", "--select", "squares", "--from", keys[0], "--to", keys[-1],
             "--url", url, "--config-json", json.dumps(config), "--wait", "--timeout", "300"],
            capture_output=True, text=True, timeout=400, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "all 1 backfill(s) completed" in proc.stdout
        backfill_id = proc.stdout.split()[1].rstrip(":")
        runs = wait_for_runs(instance, {"dagster/backfill": backfill_id}, 1)
        assert len(runs) == 1
        assert squares_by_scale() == {"1.0": 9, "2.0": 9}

        # An unknown partition is one clear line and a non-zero exit.
        bad = subprocess.run([str(bin_dir / "astra"), "backfill", "--select", "squares", "--from", "99999999",
                              "--url", url], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and bad.stderr.startswith("astra: partition 99999999")

    # 3. dagster asset materialize over a range: one run in the CLI process (no daemon needed).
    config = {"ops": {"squares": {"config": {"scale": 3.0}}}}
    proc = subprocess.run(
        [str(bin_dir / "dagster"), "asset", "materialize", "-m", MODULE, "--select", "squares",
         "--partition-range", f"{keys[0]}...{keys[-1]}", "--config-json", json.dumps(config)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert squares_by_scale() == {"1.0": 9, "2.0": 9, "3.0": 9}
    with connect() as conn:
        batches = conn.execute("select n_sources, n_computed from astra.batch order by task_pk").fetchall()
    # three one-block batches, then one batch over all blocks twice
    assert batches == [(3, 3)] * 3 + [(9, 9)] * 2


def test_astra_backfill_without_webserver_is_one_line() -> None:
    exe = Path(sys.executable).parent / "astra"
    proc = subprocess.run([str(exe), "backfill", "--select", "squares", "--url", "http://127.0.0.1:9/graphql"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "cannot reach the Dagster webserver" in proc.stderr
