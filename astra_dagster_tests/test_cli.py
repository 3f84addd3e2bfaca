"""The astra command: init, db url, task show/rerun, materialize, quiet logs unless --verbose,
one-line errors with exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.defs.examples import RandomNumberGeneratorTask
from astra_dagster.orchestration.build import build
from astra_dagster_tests.dagster_processes import free_port, wait_for_webserver
from astra_dagster_tests.test_schema import psql_binary


def astra(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "astra"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_init_is_idempotent_and_db_url_works_with_psql(clean_db: str) -> None:
    for _ in range(2):
        proc = astra("init")
        assert proc.returncode == 0, proc.stderr
        assert "schema astra" in proc.stdout
    assert (Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml").exists()
    url = astra("db", "url").stdout.strip()
    out = subprocess.run([psql_binary(), url, "-tAc", "select count(*) from astra.schema_version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 1


def test_task_show_and_rerun(clean_db: str) -> None:
    result = build([RandomNumberGeneratorTask(seed=3, draws=2)])[0]
    task_id = result.task_id

    shown = astra("task", "show", task_id)
    assert shown.returncode == 0, shown.stderr
    for expected in (task_id, "astra_dagster.defs.examples", "RNG.RandomNumberGeneratorTask",
                     "1 (success)", "seed = 3", "draws = 2", "astra.random_number_generator",
                     "samples = [1.7886285, 0.43650985]"):
        assert expected in shown.stdout
    as_json = json.loads(astra("task", "show", "1", "--json").stdout)
    assert as_json["task_id"] == task_id and as_json["parameters"]["draws"] == "2"

    rerun = astra("task", "rerun", task_id)
    assert rerun.returncode == 0, rerun.stderr
    assert "round-trips" in rerun.stdout and "nothing recomputed" in rerun.stdout
    assert "status_code 1 -> 1" in rerun.stdout
    # quiet by default: our two summary lines, none of Dagster's DEBUG event log
    assert " - DEBUG - " not in rerun.stderr + rerun.stdout and rerun.stdout.count("\n") == 2
    for verbose in (("task", "rerun", task_id, "--verbose"), ("--verbose", "task", "rerun", task_id)):
        loud = astra(*verbose)
        assert loud.returncode == 0, loud.stderr
        assert " - DEBUG - " in loud.stderr and "RUN_SUCCESS" in loud.stderr
        assert "nothing recomputed" in loud.stdout
    with connect() as conn:
        output_before = conn.execute("select output_pk from astra.task").fetchone()[0]
    forced = astra("task", "rerun", "1", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "(recomputed)" in forced.stdout
    with connect() as conn:
        rows = conn.execute("select pk, output_pk from astra.task").fetchall()
        assert conn.execute("select count(*) from astra.random_number_generator").fetchone()[0] == 1
    assert len(rows) == 1 and rows[0][1] != output_before


def test_rerun_of_a_child_task_runs_only_its_source(clean_db: str, monkeypatch: pytest.MonkeyPatch) -> None:

    from astra_dagster.lineage.sources import blocks_for, register_sources
    from astra_dagster.orchestration.instance import get_instance
    from astra_dagster_tests import lineage_assets

    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "3")
    lineage_assets.create_tables(clean_db)
    with connect() as conn:
        pks = register_sources(conn, [f"SRC-{i}" for i in range(1, 7)])
    keys = blocks_for(pks.values(), 3)
    instance = get_instance()
    instance.add_dynamic_partitions("source_blocks", keys)
    lineage_assets.materialize_squares(instance, keys)
    with connect() as conn:
        child = conn.execute("select t.task_id, t.output_pk from astra.task t join astra.source s "
                             "on s.pk = t.source_pk where s.source_id = 'SRC-5'").fetchone()
    # The test assets are not in the code location, so call the re-run function in-process.
    from astra_dagster.lineage import rerun as rerun_module

    monkeypatch.setattr("astra_dagster.orchestration.build.load_definitions", lambda: lineage_assets.defs)
    report = rerun_module.rerun_task(child[0], force=True, instance=instance)
    assert report.success and report.recomputed and "SRC-5" in report.scope
    with connect() as conn:
        outputs = dict(conn.execute("select s.source_id, t.output_pk from astra.task t "
                                    "join astra.source s on s.pk = t.source_pk").fetchall())
    assert outputs["SRC-5"] != child[1]
    assert len(outputs) == 6


#: What the quick commands must not import (issue #12 point 5: process start dominated a memoised
#: re-run): the numerical stack of the methods, Dagster, and every method package.
HEAVY_MODULES = ("scipy", "astropy", "matplotlib", "pyarrow", "distributed", "dask", "dagster",
                 "astra_dagster.methods")

#: Runs the astra command in process, then prints the names of the modules it imported on stderr.
_WITH_MODULES = """
import sys
from astra_dagster.cli.main import main
try:
    main(sys.argv[1:], prog_name="astra")
finally:
    print("MODULES " + " ".join(sorted(sys.modules)), file=sys.stderr)
"""


def imported_by(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    proc = subprocess.run([sys.executable, "-c", _WITH_MODULES, *args], capture_output=True, text=True,
                          timeout=300)
    line = [li for li in proc.stderr.splitlines() if li.startswith("MODULES ")][-1]
    return proc, set(line.split()[1:])


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY_MODULES))


def test_quick_commands_import_no_method_nor_dagster(clean_db: str) -> None:
    task_id = build([RandomNumberGeneratorTask(seed=3, draws=2)])[0].task_id
    for command in (("--help",), ("db", "url"), ("task", "show", task_id), ("task", "show", "1", "--json")):
        proc, modules = imported_by(*command)
        assert proc.returncode == 0, proc.stderr
        assert heavy(modules) == [], command
    # the Config classes stay where Dagster and `task rerun` find them, loaded on demand
    proc, modules = imported_by("task", "show", "1")
    assert task_id in proc.stdout and "astra_dagster.lineage.config" not in modules


def test_unknown_task_is_one_line_and_exit_2(database: str) -> None:
    for ref in ("999999", "RNG.RandomNumberGeneratorTask_00000000"):
        for command in (("task", "show", ref), ("task", "rerun", ref)):
            proc = astra(*command)
            assert proc.returncode == 2
            assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("astra: no task with")


def test_unreachable_database_names_the_masked_url() -> None:
    url = "postgresql://astra:s3cret@127.0.0.1:9/astra"
    for command in (("init",), ("task", "show", "1")):
        proc = astra(*command, env={"ASTRA_DATABASE_URL": url})
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert "postgresql://astra:***@127.0.0.1:9/astra" in proc.stderr
        assert "s3cret" not in proc.stderr + proc.stdout


def test_release_generate_and_register(clean_db: str, tmp_path: Path) -> None:
    """astra release generate writes a complete release; register (without --run) records its
    sources once, and again is a no-op; a folder without a manifest is refused by name."""
    proc = astra("release", "generate", str(tmp_path), "--release", "cli-r1", "--sources", "3", "--seed", "4")
    assert proc.returncode == 0, proc.stderr
    assert "3 sources" in proc.stdout
    manifest = json.loads((tmp_path / "cli-r1" / "manifest.json").read_text())
    assert len(manifest["sources"]) == 3
    env = {"ASTRA_RELEASE_ASSETS": "spectra"}
    # a sibling release in the same folder is not registered by registering cli-r1
    assert astra("release", "generate", str(tmp_path), "--release", "cli-r0", "--sources", "2",
                 "--seed", "5").returncode == 0
    first = astra("release", "register", str(tmp_path / "cli-r1"), env=env)
    assert first.returncode == 0, first.stderr
    assert "3 sources" in first.stdout
    with connect() as conn:
        assert conn.execute("select count(*) from astra.release_source").fetchone()[0] == 3
        assert conn.execute("select array_agg(name) from astra.data_release").fetchone()[0] == ["cli-r1"]
    again = astra("release", "register", str(tmp_path / "cli-r1"), env=env)
    assert again.returncode == 0, again.stderr
    with connect() as conn:
        assert conn.execute("select count(*) from astra.release_source").fetchone()[0] == 3
    (tmp_path / "half").mkdir()
    bad = astra("release", "register", str(tmp_path / "half"), env=env)
    assert bad.returncode != 0 and "half" in (bad.stderr + bad.stdout)


def _blocks(n_sources: int, per_block: int) -> list[str]:
    """Registered sources and their partitions, without a release (enough for the checks)."""
    from astra_dagster.lineage.sources import blocks_for, register_sources
    from astra_dagster.orchestration.instance import get_instance

    with connect() as conn:
        pks = register_sources(conn, [f"CLI-{i}" for i in range(1, n_sources + 1)])
    keys = blocks_for(pks.values(), per_block)
    get_instance().add_dynamic_partitions("source_blocks", keys)
    return keys


def test_materialize_refuses_bad_input_in_one_line(clean_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every mistake is found before a run starts: exit 2, one line on stderr, no traceback."""
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "2")
    keys = _blocks(4, 2)
    rng = "random_number_generator"
    cases = {
        ("--config", '{"seed": 3,\n "draws": }'): ["not valid JSON", "line 2, column 11"],
        ("--config", '{"sed": 3}'): ["unknown config field 'sed'", rng, "valid: ", "seed", "draws"],
        ("--config", '{"seed": "3"}'): [rng, "'seed' must be int", '"3"'],
        ("--config", '{"draws": 2}'): ["missing required config field 'seed'"],
        ("--config", '{"ops": {"spectra": {"config": {}}}}'): ["'spectra'", "not selected"],
        ("--config", '{"seed": 3}', "--partitions", keys[0]): ["--partitions given", f"{rng} is not partitioned"],
    }
    for args, expected in cases.items():
        proc = astra("materialize", rng, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert all(e in proc.stderr for e in expected), (args, proc.stderr)
        assert proc.stdout == ""
    spectra_cases = {
        ("nosuch_asset",): ["unknown asset 'nosuch_asset'", "known: ", "spectra", rng],
        ("spectra",): ["spectra is partitioned", "--partitions"],
        # (other tests' partitions stay in the Dagster instance, so the count is not pinned)
        ("spectra", "--partitions", "00000099-00000100"): ["'00000099-00000100' is not in source_blocks",
                                                          " partitions: "],
        ("spectra", "--partitions", f"{keys[0]}...00000099-00000100"): ["'00000099-00000100' is not in"],
        ("spectra", "--partitions", f"{keys[1]}...{keys[0]}"): ["reversed"],
        ("spectra", "--config", '{"n_train": 300}', "--partitions", keys[0]):
            ["spectra: unknown config field 'n_train'", "verify_sha256"],
    }
    for args, expected in spectra_cases.items():
        proc = astra("materialize", *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert all(e in proc.stderr for e in expected), (args, proc.stderr)
    with connect() as conn:  # nothing ran
        assert conn.execute("select count(*) from astra.task").fetchone()[0] == 0
    # A run that fails (no model trained yet) is one line too, naming the step and the reason: exit 1.
    failed = astra("materialize", "thecannon", "--partitions", keys[0])
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "failed: step thecannon:" in failed.stderr and "thecannon_model" in failed.stderr
    assert "FAILED" in failed.stdout


def test_materialize_runs_an_asset_and_a_release_range(clean_db: str, tmp_path: Path) -> None:
    """A real run of the cheap example asset (op config, then the whole run config form) and of
    spectra over a generated release's partition range: one run, one batch, quiet output."""
    env = {"ASTRA_SOURCES_PER_PARTITION": "2", "ASTRA_RELEASE_ASSETS": "spectra"}
    rng = astra("materialize", "random_number_generator", "--config", '{"seed": 3, "draws": 2}', env=env)
    assert rng.returncode == 0, rng.stderr
    lines = rng.stdout.splitlines()
    assert lines[0].startswith("run ") and lines[0].endswith(": success")
    assert lines[1] == "  random_number_generator: 1 computed, 0 skipped, 0 failed"
    assert " - DEBUG - " not in rng.stderr and "Traceback" not in rng.stderr
    whole = astra("materialize", "random_number_generator", "--config",
                  '{"ops": {"random_number_generator": {"config": {"seed": 3, "draws": 2}}}}', env=env)
    assert whole.returncode == 0, whole.stderr
    assert "random_number_generator: 0 computed, 1 skipped, 0 failed" in whole.stdout  # memoised
    with connect() as conn:
        samples = conn.execute("select samples from astra.random_number_generator").fetchall()
    assert len(samples) == 1 and [round(x, 6) for x in samples[0][0]] == [1.788628, 0.436510]

    assert astra("release", "generate", str(tmp_path), "--release", "cli-m1", "--sources", "5",
                 "--seed", "2").returncode == 0
    registered = astra("release", "register", str(tmp_path / "cli-m1"), env=env)
    assert registered.returncode == 0, registered.stderr
    with connect() as conn:
        pks = [r[0] for r in conn.execute("select pk from astra.source order by pk")]
    from astra_dagster.lineage.sources import blocks_for

    keys = blocks_for(pks, 2)
    assert len(keys) == 3
    ranged = astra("materialize", "spectra", "--partitions", f"{keys[0]}...{keys[-1]}", env=env)
    assert ranged.returncode == 0, ranged.stderr
    assert ranged.stdout.splitlines()[0].endswith(f" over {keys[0]}...{keys[-1]}: success")
    assert "  spectra: 5 computed, 0 skipped, 0 failed" in ranged.stdout
    assert " - DEBUG - " not in ranged.stderr
    with connect() as conn:
        # the range went through the single-run policy path: one run, one batch over the range
        batches = conn.execute("select b.partition_first, b.partition_last, b.n_sources from astra.batch b "
                               "join astra.task t on t.pk = b.task_pk "
                               "where t.task_module = 'astra_dagster.defs.spectra'").fetchall()
    assert batches == [(keys[0], keys[-1], 5)]
    single = astra("materialize", "spectra", "--partitions", keys[1], "--config", '{"force": true}', env=env)
    assert single.returncode == 0, single.stderr
    assert f" over {keys[1]}: success" in single.stdout
    assert "  spectra: 2 computed, 0 skipped, 0 failed" in single.stdout


def _ui_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A DAGSTER_HOME and Dagster database of the test's own, as test_release_daemon.py uses: the
    UI's daemon must not pick up runs of other tests (here too: the test reads the instance)."""
    from astra_dagster.db.connection import _ensure_database, _with_database, database_url

    server = database_url()
    _ensure_database(server, "astra_dagster_ui")
    monkeypatch.setenv("ASTRA_DAGSTER_DATABASE_URL", _with_database(server, "astra_dagster_ui"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return dict(os.environ)


def _launch_slow_run(port: int, env: dict[str, str]) -> str:
    """A run of random_number_generator that sleeps 300 s, through the UI's webserver and queue."""
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    return client.submit_job_execution(
        "__ASSET_JOB", repository_location_name="astra", repository_name="__repository__",
        run_config={"ops": {"random_number_generator": {"config": {"seed": 93_001, "delay_time": 300}}}},
        asset_selection=["random_number_generator"])


def _task_row(task_id: str) -> bool:
    with connect() as conn:
        return conn.execute("select 1 from astra.task where task_id = %s", (task_id,)).fetchone() is not None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_its_whole_tree(clean_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 sig: signal.Signals) -> None:
    """SIGTERM or Ctrl-C to `astra ui` ends dagster dev, the webserver, the daemon, the code
    server and the run worker of a run in progress (issue #13 point 9), not just `astra ui`."""
    import dagster as dg

    env = _ui_env(tmp_path, monkeypatch)
    port = free_port()
    log = tmp_path / "ui.log"
    tree: list[psutil.Process] = []
    with open(log, "w") as out:
        ui = subprocess.Popen([str(Path(sys.executable).parent / "astra"), "ui", "--port", str(port)],
                              env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_webserver(port, ui, log, timeout=240)
        if sig == signal.SIGTERM:  # with a run in progress: its worker and step process must go too
            run_id = _launch_slow_run(port, env)
            instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
            deadline = time.monotonic() + 240
            while instance.get_run_by_id(run_id).status != dg.DagsterRunStatus.STARTED:
                assert time.monotonic() < deadline, f"the run did not start\n{log.read_text()[-3000:]}"
                assert instance.get_run_by_id(run_id).status in (dg.DagsterRunStatus.QUEUED,
                                                                 dg.DagsterRunStatus.NOT_STARTED,
                                                                 dg.DagsterRunStatus.STARTING), log.read_text()[-3000:]
                time.sleep(1)
            instance.dispose()
            # The task row exists once the step process computes (its 300 s sleep): the tree
            # then holds the run worker and the step process too.
            task_id = RandomNumberGeneratorTask(seed=93_001, delay_time=300).identity().task_id
            while not _task_row(task_id):
                assert time.monotonic() < deadline, f"the step did not start\n{log.read_text()[-3000:]}"
                time.sleep(1)
        tree = psutil.Process(ui.pid).children(recursive=True)
        names = sorted(" ".join(p.cmdline()[1:3]) for p in tree)
        assert len(tree) >= 3, names  # dagster dev, the webserver, the daemon (and a code server)
        ui.send_signal(sig)
        sent = time.monotonic()
        # 30 s: the 10 s grace period plus a generous margin on a loaded machine. (Popen, not
        # psutil, reaps `astra ui`: psutil's wait would take its exit code.)
        code = ui.wait(timeout=30)
        _gone, alive = psutil.wait_procs(tree, timeout=max(0.1, 30 - (time.monotonic() - sent)))
        stopped_after = time.monotonic() - sent
        assert not alive, f"still running {stopped_after:.0f} s after {sig.name}: {alive}"
        assert code == 128 + sig
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith(f"astra: stopped dagster dev on {sig.name}: "), log.read_text()[-3000:]
        print(f"{sig.name}: {len(tree)} processes ({', '.join(names)}) gone in {stopped_after:.1f} s; {last}")
    finally:
        # A failed test must not leave the tree behind: SIGKILL of `astra ui` alone would.
        if ui.poll() is None:
            ui.terminate()
            try:
                ui.wait(timeout=30)
            except subprocess.TimeoutExpired:
                ui.kill()
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.kill()  # psutil refuses a pid that now names another process


_TREE = """
import signal, subprocess, sys, time
# a grandchild in a session of its own that ignores SIGTERM: only the descendant walk finds it
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('grandchild', flush=True); time.sleep(300)"], start_new_session=True)
time.sleep(300)
"""


def test_run_tree_kills_descendants_that_left_the_group() -> None:
    """run_tree (astra ui's supervisor) forwards SIGTERM and, after its grace period, kills a
    descendant that moved to a session of its own and ignores SIGTERM."""
    import threading

    from astra_dagster.cli.supervise import run_tree

    def grandchild() -> list[psutil.Process]:
        return [p for p in psutil.Process().children(recursive=True) if "grandchild" in " ".join(p.cmdline())]

    found: list[psutil.Process] = []

    def stop() -> None:  # once the grandchild runs (and run_tree has seen it), SIGTERM this process
        deadline = time.monotonic() + 60
        while not found and time.monotonic() < deadline:
            found.extend(grandchild())
            time.sleep(0.5)
        time.sleep(2)  # run_tree looks at the tree once a second
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop, daemon=True).start()
    stopped = run_tree([sys.executable, "-c", _TREE], grace=2.0)
    assert found, "the grandchild never started"
    assert stopped.signal == signal.SIGTERM and stopped.killed == 1, stopped
    _gone, alive = psutil.wait_procs(found, timeout=30)
    assert not alive
    assert stopped.message("the tree").endswith(", 1 killed after the 2 s grace period")
