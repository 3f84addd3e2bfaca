"""The seed's example (contract 3) through Dagster: Python build(), the dagster CLI, bad config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.defs.examples import RandomNumberGeneratorTask
from astra_dagster.orchestration.build import build
from astra_dagster.orchestration.instance import write_dagster_yaml

SEED_IDS = ["36a542f0", "ced8556d", "41bbabea", "5abe446d"]


def test_the_four_seed_tasks_and_the_seed_queries(clean_db: str) -> None:
    tasks = [
        RandomNumberGeneratorTask(seed=0),
        RandomNumberGeneratorTask(seed=0, draws=10),
        RandomNumberGeneratorTask(seed=3, draws=2, delay_time=2),
        RandomNumberGeneratorTask(seed=5, draws=1, delay_time=1),
    ]
    results = build(tasks)
    assert all(r.success for r in results)
    assert [r.task_id for r in results[:2]] == [f"RNG.RandomNumberGeneratorTask_{h}" for h in SEED_IDS[:2]]
    assert len({r.task_id for r in results}) == 4

    with connect() as conn:
        # The seed's first query, verbatim.
        rows = conn.execute(
            "select t.pk, t.task_module, t.task_id, t.duration, rng.samples from astra.task as t, "
            "astra.random_number_generator as rng where t.output_pk = rng.output_pk;"
        ).fetchall()
        # The seed's second query, verbatim.
        params = conn.execute(
            "select t.task_id, t.duration, p.parameter_name, p.parameter_value from astra.parameter "
            "as p, astra.task_parameter as tp, astra.task as t where t.pk = 3 and t.pk = tp.task_pk "
            "and tp.parameter_pk = p.pk;"
        ).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert {r[1] for r in rows} == {"astra_dagster.defs.examples"}
    samples = [r[4] for r in rows]
    np.testing.assert_allclose(samples[0], [1.7640524], rtol=1e-6)
    np.testing.assert_allclose(samples[1][:3], [1.7640524, 0.4001572, 0.978738], rtol=1e-6)
    np.testing.assert_allclose(samples[2], [1.7886285, 0.43650985], rtol=1e-6)
    np.testing.assert_allclose(samples[3], [0.4412275], rtol=1e-6)
    durations = [r[3] for r in rows]
    # delay_time is in the duration; compared with each other, not with a wall-clock limit
    assert durations[2] >= 2.0 and durations[3] >= 1.0 and durations[0] < durations[3]
    assert {(p[2], p[3]) for p in params} == {
        ("astra_version_major", "0"), ("astra_version_minor", "1"),
        ("seed", "3"), ("draws", "2"), ("delay_time", "2"),
    }

    again = build([RandomNumberGeneratorTask(seed=0, draws=10)])
    assert again[0].success and again[0].metadata["astra/skipped"] == 1
    with connect() as conn:
        assert conn.execute("select count(*) from astra.task").fetchone()[0] == 4
        assert conn.execute("select count(*) from astra.random_number_generator").fetchone()[0] == 4


def _dagster(*args: str) -> subprocess.CompletedProcess:
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    return subprocess.run([dagster, *args], capture_output=True, text=True, timeout=300)


def test_dagster_cli_materialize_with_config_json(clean_db: str) -> None:
    write_dagster_yaml()
    config = {"ops": {"random_number_generator": {"config": {"seed": 3, "draws": 2, "delay_time": 0}}}}
    proc = _dagster("asset", "materialize", "-m", "astra_dagster.definitions",
                    "--select", "random_number_generator", "--config-json", json.dumps(config))
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = RandomNumberGeneratorTask(seed=3, draws=2).identity().task_id
    with connect() as conn:
        rows = conn.execute("select task_id, status_code, run_id from astra.task").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(expected, 1)]
    # The run is in the persistent instance (dagster-postgres through our pooled storage).
    from astra_dagster.orchestration.instance import get_instance

    instance = get_instance()
    assert instance.get_run_by_id(rows[0][2]) is not None
    from sqlalchemy.pool import QueuePool

    from astra_dagster.db.dagster_storage import PooledPostgresEventLogStorage, PooledPostgresRunStorage

    assert isinstance(instance.run_storage, PooledPostgresRunStorage)
    assert isinstance(instance.event_log_storage, PooledPostgresEventLogStorage)
    assert isinstance(instance.event_log_storage._engine.pool, QueuePool)


def test_wrong_config_types_write_nothing(clean_db: str) -> None:
    write_dagster_yaml()
    config = {"ops": {"random_number_generator": {"config": {"seed": "three"}}}}
    proc = _dagster("asset", "materialize", "-m", "astra_dagster.definitions",
                    "--select", "random_number_generator", "--config-json", json.dumps(config))
    assert proc.returncode != 0
    assert "seed" in proc.stderr and "Int" in proc.stderr
    with connect() as conn:
        assert conn.execute("select count(*) from astra.task").fetchone()[0] == 0
        assert conn.execute("select count(*) from astra.parameter").fetchone()[0] == 0


def test_parameter_values_are_stored_verbatim(clean_db: str) -> None:
    from astra_dagster.lineage import store
    from astra_dagster.lineage.identity import TaskIdentity

    nasty = ["it's", 'say "hi"', "x'); drop table astra.task; --", "semi;colon", "back\\slash",
             "percent %s %(x)s", "unicode ✓ ß", "a" * 5000]
    identities = [TaskIdentity.build("test.module", "Test.Nasty", {"value": v}) for v in nasty]
    with connect() as conn, conn.transaction():
        store.create_tasks(conn, identities)
    with connect() as conn:
        stored = [r[0] for r in conn.execute(
            "select p.parameter_value from astra.parameter p where p.parameter_name = 'value'")]
        assert sorted(stored) == sorted(nasty)
        assert conn.execute("select count(*) from astra.task").fetchone()[0] == len(nasty)


@pytest.mark.parametrize("draws", [-1])
def test_bad_values_fail_the_task_with_a_message(clean_db: str, draws: int) -> None:
    result = build([RandomNumberGeneratorTask(seed=1, draws=draws)])[0]
    assert result.success  # the run completes; the task is recorded as failed
    assert result.metadata["astra/failed"] == 1
    with connect() as conn:
        status, error = conn.execute("select status_code, error from astra.task").fetchone()
    assert status == 30 and "draws must be >= 0" in error
