"""Batches on real Dagster range runs: parent and child tasks, per-source failures, memoisation,
force, downstream loading, and atomicity when the write fails half-way."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.lineage import store
from astra_dagster.lineage.io_manager import AstraIOManager
from astra_dagster.lineage.sources import blocks_for, register_sources
from astra_dagster_tests import lineage_assets

SOURCES = [f"SRC-{i}" for i in range(1, 11)] + ["SRC-BAD-11"]
BLOCK = 4


@pytest.fixture
def setup(clean_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dg.DagsterInstance, list[str]]]:
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", str(BLOCK))
    lineage_assets.create_tables(clean_db)
    with connect() as conn:
        pks = register_sources(conn, SOURCES)
    keys = blocks_for(pks.values(), BLOCK)
    assert keys == ["00000001-00000004", "00000005-00000008", "00000009-00000012"]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("source_blocks", keys)
        yield instance, keys


def materialize(instance: dg.DagsterInstance, keys: list[str], config: dict | None = None,
                selection: str = "squares", **kwargs) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [lineage_assets.squares, lineage_assets.squares_plus],
        selection=[selection],
        instance=instance,
        resources={"astra_io_manager": AstraIOManager()},
        run_config={"ops": {selection: {"config": config or {}}}},
        tags={"dagster/asset_partition_range_start": keys[0],
              "dagster/asset_partition_range_end": keys[-1]},
        **kwargs,
    )


def counts(result: dg.ExecuteInProcessResult) -> tuple[int, int, int]:
    events = result.get_asset_materialization_events()
    meta = events[0].materialization.metadata
    return tuple(meta[k].value for k in ("astra/computed", "astra/skipped", "astra/failed"))


def scalar(sql: str, *args: object) -> object:
    with connect() as conn:
        return conn.execute(sql, args).fetchone()[0]


def test_range_run_makes_one_parent_with_a_child_per_source(setup) -> None:
    instance, keys = setup
    result = materialize(instance, keys, {"scale": 2, "sleep_seconds": 0.01})
    assert result.success
    assert len(result.get_asset_materialization_events()) == len(keys)  # one per partition
    assert counts(result) == (10, 0, 1)

    with connect() as conn:
        parent_pk, n, computed, skipped, failed = conn.execute(
            "select task_pk, n_sources, n_computed, n_skipped, n_failed from astra.batch").fetchone()
        assert (n, computed, skipped, failed) == (11, 10, 0, 1)
        children = conn.execute(
            "select t.status_code, t.duration, t.error, s.source_id, t.output_pk "
            "from astra.batch_interface b join astra.task t on t.pk = b.child_task_pk "
            "join astra.source s on s.pk = t.source_pk where b.parent_task_pk = %s order by s.pk",
            (parent_pk,)).fetchall()
        parent = conn.execute("select status_code, duration, error, source_pk from astra.task "
                              "where pk = %s", (parent_pk,)).fetchone()
        values = dict(conn.execute(
            "select s.source_id, r.value from astra_test.square r "
            "join astra.task t on t.output_pk = r.output_pk join astra.source s on s.pk = t.source_pk"
        ).fetchall())
        params = dict(conn.execute(
            "select p.parameter_name, p.parameter_value from astra.task_parameter tp "
            "join astra.parameter p on p.pk = tp.parameter_pk join astra.task t on t.pk = tp.task_pk "
            "join astra.source s on s.pk = t.source_pk where s.source_id = 'SRC-3'").fetchall())

    assert len(children) == 11
    statuses = {row[3]: row[0] for row in children}
    assert statuses.pop("SRC-BAD-11") == store.STATUS_FAILURE
    assert set(statuses.values()) == {store.STATUS_SUCCESS}
    bad = next(row for row in children if row[3] == "SRC-BAD-11")
    assert "corrupt input" in bad[2] and bad[4] is None
    child_durations = [row[1] for row in children]
    assert all(d >= 0.009 for d, row in zip(child_durations, children, strict=True) if row[0] == 1)
    assert parent[0] == store.STATUS_SUCCESS and parent[3] is None
    assert parent[1] >= sum(child_durations)  # parent = whole step, children = science only
    assert "1 of 11" in parent[2]
    assert values == {f"SRC-{i}": 2.0 * i * i for i in range(1, 11)}
    assert params == {"astra_version_major": "0", "astra_version_minor": "1", "scale": "2.0",
                      "sleep_seconds": "0.01", "source_id": "SRC-3"}


def test_chunked_compute_gives_the_same_tasks_and_isolates_a_bad_chunk(setup) -> None:
    """Vectorised chunks (3 sources per call): the same results and statuses as one by one; the
    chunk holding the bad source falls back to one by one, so only that source fails; every
    child has its own positive duration."""
    instance, keys = setup
    result = materialize(instance, keys, {"scale": 2, "sleep_seconds": 0.01, "chunk_size": 3})
    assert result.success and counts(result) == (10, 0, 1)
    with connect() as conn:
        rows = conn.execute(
            "select s.source_id, t.status_code, t.duration, r.value from astra.task t "
            "join astra.source s on s.pk = t.source_pk left join astra_test.square r on r.output_pk = t.output_pk"
        ).fetchall()
    assert {sid: value for sid, _, _, value in rows} == {**{f"SRC-{i}": 2.0 * i * i for i in range(1, 11)},
                                                         "SRC-BAD-11": None}
    assert {sid: status for sid, status, _, _ in rows}["SRC-BAD-11"] == store.STATUS_FAILURE
    assert all(d >= 0.009 for sid, status, d, _ in rows if status == store.STATUS_SUCCESS)
    # chunk_size is insignificant: the one-by-one run of the same tasks skips them all
    assert counts(materialize(instance, keys, {"scale": 2, "sleep_seconds": 0.01})) == (0, 10, 1)


def test_identical_batch_is_skipped_and_failed_sources_are_retried(setup) -> None:
    instance, keys = setup
    assert counts(materialize(instance, keys)) == (10, 0, 1)
    n_tasks = scalar("select count(*) from astra.task where source_pk is not null")
    n_params = scalar("select count(*) from astra.parameter where parameter_name <> 'batch_run_id'")

    again = materialize(instance, keys)
    assert again.success
    assert counts(again) == (0, 10, 1)  # the failed source is retried, and fails again
    assert scalar("select count(*) from astra.task where source_pk is not null") == n_tasks
    assert scalar("select count(*) from astra.parameter where parameter_name <> 'batch_run_id'") == n_params
    assert scalar("select count(*) from astra_test.square") == 10
    # two runs are two batches, each linked to every source it covered
    assert scalar_rows("select n_sources, n_computed, n_skipped, n_failed from astra.batch order by task_pk") == [
        (11, 10, 0, 1), (11, 0, 10, 1)]
    assert scalar("select count(*) from astra.batch_interface") == 22

    # Other parameters make other tasks.
    assert counts(materialize(instance, keys, {"scale": 3.0})) == (10, 0, 1)
    assert scalar("select count(*) from astra.task where source_pk is not null") == 2 * n_tasks
    # A sub-range re-uses the succeeded tasks of the full range.
    assert counts(materialize(instance, keys[:1], {"scale": 3})) == (0, 4, 0)


def test_force_recomputes_into_the_same_task_rows(setup) -> None:
    instance, keys = setup
    materialize(instance, keys)
    before = dict(scalar_rows("select pk, output_pk from astra.task where source_pk is not null "
                              "and status_code = 1"))
    forced = materialize(instance, keys, {"force": True})
    assert counts(forced) == (10, 0, 1)
    after = dict(scalar_rows("select pk, output_pk from astra.task where source_pk is not null "
                             "and status_code = 1"))
    assert before.keys() == after.keys()
    assert all(before[pk] != after[pk] for pk in before)
    assert scalar("select count(*) from astra_test.square") == 10
    assert scalar("select count(*) from astra.output_interface") == 10


def scalar_rows(sql: str) -> list[tuple]:
    with connect() as conn:
        return conn.execute(sql).fetchall()


def test_downstream_asset_loads_upstream_results(setup) -> None:
    instance, keys = setup
    materialize(instance, keys, {"scale": 1})
    result = materialize(instance, keys, {"offset": 0.25}, selection="squares_plus")
    assert result.success
    assert counts(result) == (10, 0, 0)  # the failed upstream source has no result to use
    with connect() as conn:
        rows = conn.execute(
            "select s.source_id, r.value, p.parameter_value from astra_test.square_plus r "
            "join astra.task t on t.output_pk = r.output_pk join astra.source s on s.pk = t.source_pk "
            "join astra.task_parameter tp on tp.task_pk = t.pk "
            "join astra.parameter p on p.pk = tp.parameter_pk and p.parameter_name = 'input_task_id'"
        ).fetchall()
    assert {r[0]: r[1] for r in rows} == {f"SRC-{i}": i * i + 0.25 for i in range(1, 11)}
    assert all(r[2].startswith("Test.SquareTask_") for r in rows)
    # Forcing the upstream keeps its task identity (same task_id, new output row), so the
    # downstream tasks, keyed on that task_id, stay memoised: force them too when needed.
    materialize(instance, keys, {"scale": 1, "force": True})
    assert counts(materialize(instance, keys, {"offset": 0.25}, selection="squares_plus")) == (0, 10, 0)


def test_failed_write_leaves_no_half_written_batch(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    instance, keys = setup
    original = store._copy_results

    def copy_then_crash(conn, table, outcomes, output_pks):
        original(conn, table, outcomes, output_pks)
        raise RuntimeError("disk full (simulated) after writing results")

    monkeypatch.setattr(store, "_copy_results", copy_then_crash)
    result = materialize(instance, keys, raise_on_error=False)
    assert not result.success
    assert scalar("select count(*) from astra_test.square") == 0
    assert scalar("select count(*) from astra.output_interface") == 0
    assert scalar("select count(*) from astra.task where source_pk is not null and status_code <> 0") == 0
    parent_status, parent_error = scalar_rows(
        "select status_code, error from astra.task where source_pk is null")[0]
    assert parent_status == store.STATUS_FAILURE and "disk full" in parent_error

    monkeypatch.setattr(store, "_copy_results", original)
    assert counts(materialize(instance, keys)) == (10, 0, 1)
    assert scalar("select count(*) from astra_test.square") == 10


def test_only_sources_runs_one_source(setup) -> None:
    instance, keys = setup
    result = materialize(instance, keys[:1], {"only_sources": ["SRC-2"]})
    assert counts(result) == (1, 0, 0)
    assert scalar("select count(*) from astra_test.square") == 1
