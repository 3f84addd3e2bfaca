"""`astra provenance` and the astra.provenance view on a real run: a small synthetic release, a
Cannon model (small settings), the spectra and thecannon assets, then a retrained model and a
second label run. Every link of the chain must resolve to the row it claims to."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.definitions import defs
from astra_dagster.orchestration.build import materialize_assets
from astra_dagster.orchestration.planned_runs import run_planned
from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
from astra_dagster.spectra.release import generate_release
from astra_dagster_tests.test_cli import astra

N_SOURCES = 6
TRAIN = {"n_train": 300, "seed": 5, "regions": "none"}
RETRAIN = {"n_train": 300, "seed": 6, "regions": "none"}


def _train(instance: dg.DagsterInstance, config: dict) -> None:
    assert materialize_assets(defs, [dg.AssetKey("thecannon_model")], instance=instance, log_level="WARNING",
                              run_config={"ops": {"thecannon_model": {"config": config}}}).success


def _provenance(*args: str) -> dict:
    proc = astra("provenance", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _results(conn) -> dict[str, list[int]]:
    """output_pk of every thecannon result per source, oldest first."""
    rows = conn.execute("select s.source_id, r.output_pk from astra.thecannon r "
                        "join astra.task t on t.output_pk = r.output_pk join astra.source s on s.pk = t.source_pk "
                        "order by r.output_pk").fetchall()
    out: dict[str, list[int]] = {}
    for source_id, output_pk in rows:
        out.setdefault(source_id, []).append(output_pk)
    return out


def _check_links(conn, chain: dict) -> None:
    """Each link of one --json chain against the lineage tables, and against the view."""
    task = chain["task"]
    source_pk = conn.execute("select source_pk from astra.task where pk = %s", (task["pk"],)).fetchone()[0]
    # The spectra task is the one named by input_task_id, and its output rows hold this source's files.
    spectra = chain["spectra_task"]
    assert spectra["task_id"] == task["parameters"]["input_task_id"]
    assert conn.execute("select array_agg(distinct source_pk) from astra.spectrum where output_pk = %s",
                        (spectra["output_pk"],)).fetchone()[0] == [source_pk]
    expected = set(conn.execute(
        "select r.path || '/' || f.path, f.sha256 from astra.release_file f "
        "join astra.data_release r on r.pk = f.release_pk where f.source_pk = %s", (source_pk,)).fetchall())
    assert {(f["path"], f["sha256"]) for f in spectra["files"]} == expected
    for f in spectra["files"]:
        assert Path(f["path"]).exists() and Path(f["manifest_path"]).exists()
    # The model task trained the model row whose task_id the label task's parameters name.
    model = chain["model_task"]
    assert model["task_id"] == task["parameters"]["model_task_id"]
    assert model["model"]["sha256"] == conn.execute(
        "select m.sha256 from astra.model m join astra.task t on t.output_pk = m.output_pk where t.pk = %s",
        (model["pk"],)).fetchone()[0]
    # The batch parent links this task, in the run that wrote the result.
    batch = chain["batch"]
    assert conn.execute("select 1 from astra.batch_interface where parent_task_pk = %s and child_task_pk = %s",
                        (batch["pk"], task["pk"])).fetchone() is not None
    assert batch["run_id"] == task["run_id"] and batch["counts"]["n_sources"] >= 1
    # The view says the same as the CLI.
    view = conn.execute(
        "select task_pk, task_id, source_id, input_task_id, model_task_id, batch_task_id, run_id "
        "from astra.provenance where method = 'thecannon' and output_pk = %s",
        (chain["result"]["output_pk"],)).fetchone()
    assert view == (task["pk"], task["task_id"], chain["result"]["source_id"], spectra["task_id"],
                    model["task_id"], batch["task_id"], task["run_id"])


@pytest.mark.slow
def test_provenance_of_results_before_and_after_retraining(tmp_path: Path, clean_db: str) -> None:
    release = generate_release(tmp_path / "data", "provenance-test", N_SOURCES, seed=23, progress=False)
    with dg.instance_for_test() as instance:
        _train(instance, TRAIN)
        plan = plan_new_releases(instance, release.parent, None, block_size=3)
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
        assert all(o.success for o in run_planned(defs, plan.runs, [dg.AssetKey("spectra"),
                                                                     dg.AssetKey("thecannon")], instance=instance))
        with connect() as conn:
            first = _results(conn)
            assert len(first) == N_SOURCES
            old_model = conn.execute("select pk from astra.task where asset_key = 'thecannon_model'").fetchone()[0]
            chains = {source_id: _provenance("thecannon", str(pks[0])) for source_id, pks in first.items()}
            for chain in chains.values():
                _check_links(conn, chain)
                assert chain["model_task"]["pk"] == old_model
                assert chain["model_task"]["parameters"]["seed"] == "5"
            # Two blocks of three in one range run: one batch parent over all six.
            (batch,) = {c["batch"]["pk"]: c["batch"] for c in chains.values()}.values()
            assert batch["counts"]["n_sources"] == batch["counts"]["n_computed"] == N_SOURCES

        tree = astra("provenance", "thecannon", str(first[min(first)][0]))
        assert tree.returncode == 0, tree.stderr
        chain = chains[min(first)]
        for expected in (chain["task"]["task_id"], chain["spectra_task"]["task_id"],
                         chain["model_task"]["task_id"], chain["batch"]["task_id"], "sha256 ",
                         "manifest.json", "seed = 5", "teff=", "bitmask_flag="):
            assert expected in tree.stdout, (expected, tree.stdout)

        # A model retrained with another seed is a new model task; the new results name it, the
        # old results still name the old one.
        _train(instance, RETRAIN)
        assert all(o.success for o in run_planned(defs, plan.runs, [dg.AssetKey("thecannon")], instance=instance))
    with connect() as conn:
        second = _results(conn)
        new_model = conn.execute("select pk from astra.task where asset_key = 'thecannon_model' and pk <> %s",
                                 (old_model,)).fetchone()[0]
        source_id = min(second)
        old_pk, new_pk = second[source_id]
        old, new = _provenance("thecannon", str(old_pk)), _provenance("thecannon", str(new_pk))
        for c in (old, new):
            _check_links(conn, c)
        assert old == chains[source_id]
        assert new["model_task"]["pk"] == new_model and new["model_task"]["parameters"]["seed"] == "6"
        assert new["spectra_task"]["pk"] == old["spectra_task"]["pk"]   # same spectra, not recomputed
        assert new["batch"]["pk"] != old["batch"]["pk"]
        # By source: its newest result.
        assert _provenance("--source", source_id, "--method", "thecannon") == new
        view_models = dict(conn.execute("select output_pk, model_task_pk from astra.provenance "
                                        "where method = 'thecannon'").fetchall())
    assert {view_models[pks[0]] for pks in second.values()} == {old_model}
    assert {view_models[pks[1]] for pks in second.values()} == {new_model}

    for args, message in [(("nosuchtable", "1"), "unknown table 'nosuchtable'"),
                          (("thecannon", "999999"), "no row with output_pk 999999"),
                          (("--source", "2M00000000+0000000", "--method", "thecannon"), "unknown source"),
                          (("--source", source_id, "--method", "doppler"), "has no doppler result")]:
        proc = astra("provenance", *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, (args, proc.stderr)


@pytest.mark.slow
def test_doppler_provenance_names_the_templates_task(tmp_path: Path, clean_db: str) -> None:
    """Doppler names its model by templates_task_id; the view and the tree follow that link too."""
    generate_release(tmp_path / "data", "provenance-rv", 3, seed=11, progress=False)
    templates = {"ops": {"doppler_templates": {"config": {"n_train": 600, "n_hot": 120, "seed": 7}}}}
    with dg.instance_for_test() as instance:
        assert materialize_assets(defs, [dg.AssetKey("doppler_templates")], instance=instance,
                                  run_config=templates, log_level="WARNING").success
        plan = plan_new_releases(instance, tmp_path / "data", None, block_size=100)
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
        assert all(o.success for o in run_planned(defs, plan.runs, [dg.AssetKey("spectra"), dg.AssetKey("doppler")],
                                                  instance=instance))
    with connect() as conn:
        (source_id,) = conn.execute("select source_id from astra.source order by pk limit 1").fetchone()
        templates_pk, templates_id = conn.execute(
            "select pk, task_id from astra.task where asset_key = 'doppler_templates'").fetchone()
        assert set(conn.execute("select model_task_pk, model_task_id from astra.provenance "
                                "where method = 'doppler'").fetchall()) == {(templates_pk, templates_id)}
    chain = _provenance("--source", source_id, "--method", "doppler")
    assert chain["model_task"]["task_id"] == chain["task"]["parameters"]["templates_task_id"] == templates_id
    assert chain["model_task"]["model"] is not None and chain["result"]["values"]["vhelio_star"] is not None
    tree = astra("provenance", "doppler", str(chain["result"]["output_pk"]))
    assert tree.returncode == 0 and f"templates {templates_id}" in tree.stdout, tree.stderr
