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
