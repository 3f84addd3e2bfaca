"""The release sensor end to end: a real dagster-daemon on a temporary DAGSTER_HOME against the
embedded PostgreSQL picks up a new release, then a second release with one changed source."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pytest

from astra_dagster.db.connection import _ensure_database, _with_database, connect, database_url
from astra_dagster.orchestration.instance import write_dagster_yaml
from astra_dagster.settings import get_settings
from astra_dagster_tests.dagster_processes import dagster_services
from astra_dagster_tests.test_spectra_asset import GOOD, build_release


def wait_for(predicate, what: str, timeout: float = 240.0, logs: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = (logs / "daemon.log").read_text()[-3000:] if logs else ""
            pytest.fail(f"timed out waiting for {what}\n{tail}")
        time.sleep(2)


def task_counts() -> tuple[int, int]:
    with connect() as conn:
        return conn.execute("select count(*) filter (where status_code = 1), count(*) from astra.task "
                            "where source_pk is not null").fetchone()


@pytest.mark.slow
def test_daemon_runs_new_releases(clean_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = database_url()
    _ensure_database(server, "astra_dagster_sensor")
    data_root = tmp_path / "data"
    data_root.mkdir()
    env = {
        "ASTRA_SOURCES_PER_PARTITION": "4",
        "ASTRA_DATA_ROOT": str(data_root),
        "ASTRA_RELEASE_ASSETS": "spectra",  # the RV and label assets have tests of their own
        "ASTRA_DAGSTER_DATABASE_URL": _with_database(server, "astra_dagster_sensor"),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    write_dagster_yaml(get_settings())
    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    for key in instance.get_dynamic_partitions("source_blocks"):
        instance.delete_dynamic_partition("source_blocks", key)

    build_release(data_root, "r1")
    with dagster_services("astra_dagster.definitions", env, tmp_path, webserver=False):
        wait_for(lambda: task_counts()[0] == 6, "the spectra of release r1", logs=tmp_path)
        # The task rows commit before the run's last events: wait for the run itself to finish.
        runs = wait_for(lambda: [r for r in instance.get_runs(filters=dg.RunsFilter(tags={"astra/release": "r1"}))
                                 if r.is_finished], "the r1 run", logs=tmp_path)
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.SUCCESS
        assert instance.get_dynamic_partitions("source_blocks") == ["00000001-00000004", "00000005-00000008"]

        build_release(data_root, "r2", extra_visit={GOOD[1]})
        wait_for(lambda: task_counts()[0] == 7, "the changed source of release r2", logs=tmp_path)
        runs = wait_for(lambda: [r for r in instance.get_runs(filters=dg.RunsFilter(tags={"astra/release": "r2"}))
                                 if r.is_finished], "the r2 run", logs=tmp_path)
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.SUCCESS
        assert runs[0].tags["dagster/asset_partition_range_start"] == "00000001-00000004"
        assert runs[0].tags["dagster/asset_partition_range_end"] == "00000001-00000004"
    assert task_counts() == (7, 7)
