"""Two processes materialising the same task at once: one task row, one result row."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from astra_dagster.db.connection import connect
from astra_dagster.orchestration.instance import write_dagster_yaml

SCRIPT = """
import sys, time
from astra_dagster.orchestration.build import build
from astra_dagster.defs.examples import RandomNumberGeneratorTask
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))
result = build([RandomNumberGeneratorTask(seed=11, draws=4, delay_time=2)])[0]
print(result.success, result.metadata.get("astra/computed"), result.metadata.get("astra/skipped"))
"""


@pytest.mark.slow
def test_two_processes_same_task(clean_db: str) -> None:
    write_dagster_yaml()
    start = time.time() + 8  # both imports done well before the common start
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    # Both runs succeed; both computed (they overlapped) but only one result was written.
    assert all(line.startswith("True") for line in lines)
    with connect() as conn:
        assert conn.execute("select count(*) from astra.task").fetchone()[0] == 1
        assert conn.execute("select count(*) from astra.random_number_generator").fetchone()[0] == 1
        assert conn.execute("select count(*) from astra.output_interface").fetchone()[0] == 1
        assert conn.execute("select status_code from astra.task").fetchone()[0] == 1
    written = sorted(int(line.split()[1]) for line in lines)
    assert written == [0, 1]


@pytest.mark.slow
def test_four_concurrent_runs_over_overlapping_blocks_keep_counts_and_links(
        clean_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four processes over overlapping ranges at once: four batches; each batch's counts add up
    to the sources it covered and equal its links; every result is written exactly once."""
    import json
    import os

    from astra_dagster.lineage.sources import blocks_for, register_sources
    from astra_dagster_tests import lineage_assets

    block, n = 5, 20
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", str(block))
    lineage_assets.create_tables(clean_db)
    with connect() as conn:
        pks = register_sources(conn, [f"SRC-{i}" for i in range(1, n + 1)] + ["SRC-BAD-21"])
    keys = blocks_for(pks.values(), block)  # 5 blocks, the last holds the bad source
    ranges = [keys[0:3], keys[1:5], keys[0:5], keys[2:5]]
    env = {**os.environ, "ASTRA_WORKERS": "1", "ASTRA_LINEAGE_CHUNK": "2",
           "ASTRA_SOURCES_PER_PARTITION": str(block)}
    start = time.time() + 10  # all four imported before the common start
    procs = [subprocess.Popen([sys.executable, "-m", "astra_dagster_tests.range_run", ",".join(r),
                               json.dumps({"sleep_seconds": 0.05}), str(start)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ranges]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    with connect() as conn:
        batches = conn.execute(
            "select b.task_pk, b.n_sources, b.n_computed, b.n_skipped, b.n_failed, t.status_code, "
            "(select count(*) from astra.batch_interface l where l.parent_task_pk = b.task_pk) "
            "from astra.batch b join astra.task t on t.pk = b.task_pk").fetchall()
        runs = {r[0] for r in conn.execute(
            "select p.parameter_value from astra.task_parameter tp join astra.parameter p on p.pk = tp.parameter_pk "
            "where p.parameter_name = 'batch_run_id'").fetchall()}
        results = conn.execute("select count(*) from astra_test.square").fetchone()[0]
        outputs_n = conn.execute("select count(*) from astra.output_interface").fetchone()[0]
        succeeded = conn.execute("select count(*) from astra.task where source_pk is not null and status_code = 1"
                                 ).fetchone()[0]
        unfinished = conn.execute("select count(*) from astra.task where status_code = 0").fetchone()[0]
        # a child is linked once to each batch whose range covered it
        coverage = dict(conn.execute(
            "select s.source_id, count(*) from astra.batch_interface l join astra.task t on t.pk = l.child_task_pk "
            "join astra.source s on s.pk = t.source_pk group by 1").fetchall())

    print("batches (n_sources, computed, skipped, failed):", sorted(b[1:5] for b in batches))
    assert len(batches) == 4 and runs == {r["run_id"] for r in reports}  # four runs, four batches
    sizes = sorted(sum(1 if k == keys[-1] else block for k in r) for r in ranges)  # the last block holds 1
    assert sorted(b[1] for b in batches) == sizes
    for _, n_sources, computed, skipped, failed, status, links in batches:
        assert status == 1
        assert computed + skipped + failed == n_sources == links
    assert sum(b[2] for b in batches) == n == results == outputs_n == succeeded  # each result once
    assert unfinished == 0
    covering = {i: sum(1 for r in ranges if keys[i] in r) for i in range(len(keys))}
    assert coverage == {f"SRC-{pk}" if pk <= n else "SRC-BAD-21": covering[(pk - 1) // block]
                        for pk in range(1, n + 2)}
    # the Dagster metadata of each run says what its batch row says
    by_counts = sorted((b[2], b[3], b[4]) for b in batches)
    assert by_counts == sorted((r["astra/computed"], r["astra/skipped"], r["astra/failed"]) for r in reports)
