"""Streamed lineage on real processes: a range run killed with ``kill -9`` half-way keeps every
chunk it wrote, leaves its unfinished tasks recognisably abandoned, and the re-run computes only
the sources without a succeeded task (0 lost, 0 duplicated, 0 orphaned rows)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.lineage import store
from astra_dagster.lineage.sources import blocks_for, register_sources
from astra_dagster_tests import lineage_assets

N_SOURCES = 40
BLOCK = 10



@pytest.fixture
def keys(clean_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", str(BLOCK))
    lineage_assets.create_tables(clean_db)
    with connect() as conn:
        pks = register_sources(conn, [f"SRC-{i}" for i in range(1, N_SOURCES + 1)])
    yield blocks_for(pks.values(), BLOCK)


def start_run(keys: list[str], config: dict, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "astra_dagster_tests.range_run", ",".join(keys), json.dumps(config)],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own process group, workers included


def one(sql: str, *args: object) -> object:
    with connect() as conn:
        return conn.execute(sql, args).fetchone()[0]


def wait_until(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the condition held:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the run")
        time.sleep(0.1)


def astra(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "astra"), *args], capture_output=True, text=True,
                          timeout=120)


def test_kill_9_mid_range_then_rerun_computes_only_the_rest(keys: list[str]) -> None:
    config = {"sleep_seconds": 0.6}  # 40 sources on 2 workers: ~12 s
    env = {"ASTRA_WORKERS": "2", "ASTRA_LINEAGE_CHUNK": "4", "ASTRA_LINEAGE_SECONDS": "1",
           "ASTRA_SOURCES_PER_PARTITION": str(BLOCK)}
    proc = start_run(keys, config, env)
    try:
        done = "select count(*) from astra.task where source_pk is not null and status_code = 1"
        wait_until(lambda: one(done) >= N_SOURCES // 4, 180, proc)
        # while it runs, its unfinished tasks belong to a live run
        run_id = one("select run_id from astra.task where source_pk is not null and status_code = 0 limit 1")
        with connect() as conn:
            assert store.live_runs(conn, [run_id]) == {run_id}
        # the last source is computed last; on a loaded machine even it may finish while `astra
        # task show` starts, so a task that was shown finished is replaced by a later one
        for _ in range(3):
            shown = astra("task", "show", str(one("select pk from astra.task where status_code = 0 and "
                                                 "source_pk is not null order by source_pk desc limit 1")))
            if "status_code 1" not in shown.stdout:
                break
        assert "in progress in run" in shown.stdout, shown.stdout + shown.stderr
        wait_until(lambda: one(done) >= N_SOURCES // 2, 180, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)

    written = one(done)
    assert 0 < written < N_SOURCES
    # every written chunk is whole: a result row and an output per succeeded task, nothing else
    assert one("select count(*) from astra_test.square") == written
    assert one("select count(*) from astra.output_interface") == written
    assert one("select count(*) from astra.task where source_pk is not null") == N_SOURCES
    assert one("select n_computed + n_skipped + n_failed from astra.batch") == written
    assert one("select count(*) from astra.batch_interface") == N_SOURCES
    # the rest is left at status 0 by a run that no longer runs: abandoned, and shown so
    with connect() as conn:
        assert store.live_runs(conn, [run_id]) == set()
    stale_pk = one("select pk from astra.task where status_code = 0 and source_pk is not null limit 1")
    shown = astra("task", "show", str(stale_pk))
    assert shown.returncode == 0, shown.stderr
    assert f"abandoned: run {run_id} is no longer running" in shown.stdout
    assert json.loads(astra("task", "show", "--json", str(stale_pk)).stdout)["abandoned"] is True

    # the re-run computes only what has no succeeded task: 0 lost, 0 duplicated
    rerun = start_run(keys, config, env)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    counts = json.loads(out.strip().splitlines()[-1])
    assert {k: v for k, v in counts.items() if k != "run_id"} == {
        "astra/computed": N_SOURCES - written, "astra/skipped": written, "astra/failed": 0}
    print(f"killed after {written} of {N_SOURCES} written; the re-run computed {N_SOURCES - written}")
    assert one("select count(*) from astra_test.square") == N_SOURCES
    assert one("select count(*) from astra.output_interface") == N_SOURCES
    assert one("select count(*) from astra.task where source_pk is not null and status_code = 1") == N_SOURCES
    assert one("select count(distinct t.source_pk) from astra.task t join astra_test.square r "
               "on r.output_pk = t.output_pk") == N_SOURCES
    assert one("select count(*) from astra.task where source_pk is not null and status_code = 0") == 0
    # the dead batch keeps its counts and links; the new one covered every source
    batches = [tuple(r) for r in _rows("select n_sources, n_computed, n_skipped, n_failed from astra.batch "
                                       "order by task_pk")]
    assert batches == [(N_SOURCES, written, 0, 0), (N_SOURCES, N_SOURCES - written, written, 0)]


def _rows(sql: str) -> list[tuple]:
    with connect() as conn:
        return conn.execute(sql).fetchall()


def test_chunks_are_written_while_the_run_goes_on(keys: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ASTRA_LINEAGE_CHUNK sources a transaction: results appear before the step ends."""
    monkeypatch.setenv("ASTRA_WORKERS", "1")
    monkeypatch.setenv("ASTRA_LINEAGE_CHUNK", "5")
    seen: list[int] = []
    original = store.write_chunk

    def spy(conn, table, outcomes, **kwargs):
        report = original(conn, table, outcomes, **kwargs)
        seen.append(one("select count(*) from astra_test.square"))
        return report

    monkeypatch.setattr(store, "write_chunk", spy)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("source_blocks", keys)
        result = lineage_assets.materialize_squares(instance, keys)
    assert result.success
    assert seen == list(range(5, N_SOURCES + 1, 5))  # committed chunk by chunk, not at the end
