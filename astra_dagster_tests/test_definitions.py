"""The code location loads as Dagster loads it, and its asset graph is the one the README describes.

A smoke test in the style of Dagster's own example projects: every asset, job, sensor and resource
resolves, and the graph's shape (dependencies, partitions, backfill policies, IO managers) is
pinned, so a change to it is a deliberate one. It also keeps the architecture's one rule that an
import can break silently: the pure science (``methods/``) never imports Dagster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import dagster as dg

from astra_dagster.definitions import defs
from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME

ROOT = Path(__file__).resolve().parents[1]
MODEL_OF = {"doppler": "doppler_templates", "thecannon": "thecannon_model", "thepayne": "thepayne_model",
            "ferre": "ferre_grid", "apogeenet": "apogeenet_model"}

# Asset -> its upstream assets.
EXPECTED_GRAPH = {
    "random_number_generator": set(),
    "spectra": set(),
    **{model: set() for model in MODEL_OF.values()},
    **{method: {"spectra", model} for method, model in MODEL_OF.items()},
    # summary files of each per-source method (astraAllStar<Method>): unpartitioned, after it
    **{f"{method}_summary": {method} for method in MODEL_OF},
}


def test_definitions_load_as_dagster_loads_them(tmp_path: Path) -> None:
    dg.Definitions.validate_loadable(defs)
    # The workspace that `astra ui`, dagster-webserver and the daemon load, through Dagster's own CLI.
    dagster = Path(sys.executable).with_name("dagster")
    proc = subprocess.run([str(dagster), "definitions", "validate", "-w", str(ROOT / "workspace.yaml")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "DAGSTER_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Validation successful for code location astra" in proc.stderr + proc.stdout


def test_asset_graph_is_as_expected() -> None:
    graph = defs.resolve_asset_graph()
    actual = {key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
              for key in graph.get_all_asset_keys()}
    assert actual == EXPECTED_GRAPH


def test_per_source_assets_share_the_source_block_partitions() -> None:
    graph = defs.resolve_asset_graph()
    partitioned = {"spectra", *MODEL_OF}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        name = key.to_user_string()
        if name in partitioned:
            assert isinstance(node.partitions_def, dg.DynamicPartitionsDefinition), name
            assert node.partitions_def.name == SOURCE_BLOCKS_NAME, name
            # `dagster asset materialize --partition-range` needs a single-run policy.
            assert node.backfill_policy == dg.BackfillPolicy.single_run(), name
        else:
            assert node.partitions_def is None, name


def test_every_asset_writes_through_an_astra_io_manager() -> None:
    resources = defs.resources or {}
    for assets_def in defs.assets or []:
        for key in assets_def.keys:
            io_key = assets_def.get_io_manager_key_for_asset_key(key)
            assert io_key in resources, (key, io_key)
            expected = "astra_model_io_manager" if key.to_user_string() in MODEL_OF.values() else "astra_io_manager"
            assert io_key == expected, key


def test_jobs_and_sensors_resolve() -> None:
    spectra_job = defs.resolve_job_def("spectra_job")
    assert spectra_job.asset_layer.executable_asset_keys == {dg.AssetKey("spectra")}
    sensor = defs.resolve_sensor_def("release_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    # The implicit asset job carries every asset, so the sensor's run requests can select any of them.
    all_assets = defs.resolve_implicit_global_asset_job_def().asset_layer.executable_asset_keys
    assert {k.to_user_string() for k in all_assets} == set(EXPECTED_GRAPH)
    # The sensor's page lists its target: the per-source assets and the models it trains.
    target = {k.to_user_string() for k in sensor.asset_selection.resolve(defs.resolve_asset_graph())}
    assert target == {"spectra", *MODEL_OF, *MODEL_OF.values()}


def test_import_prints_no_beta_warning() -> None:
    """backfill_policy's BetaWarning is silenced once, in our code, not repeated per asset."""
    proc = subprocess.run([sys.executable, "-c", "import astra_dagster.definitions"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BetaWarning" not in proc.stderr and "backfill_policy" not in proc.stderr, proc.stderr[-2000:]


def test_code_location_defers_the_methods() -> None:
    """Loading the definitions (every run's process, the code server) imports Dagster and our
    Config classes only: the methods, scipy and astropy come with the op that needs them."""
    heavy = ("scipy", "astropy", "matplotlib", "pyarrow", "distributed", "dask", "astra_dagster.methods")
    code = ("import sys, astra_dagster.definitions\n"
            f"heavy = {heavy!r}\n"
            "print(' '.join(sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == []


class CountingModel:
    """A model class whose reads are counted (for the lazy LoadedModel below)."""

    reads: ClassVar[list[str]] = []

    @classmethod
    def read(cls, path: Path) -> CountingModel:
        cls.reads.append(str(path))
        return cls()


def test_a_loaded_model_is_read_on_first_use(tmp_path: Path) -> None:
    """A memoised run gets its model input without reading the file nor importing the method."""
    from astra_dagster.lineage.model_io import LoadedModel

    loaded = LoadedModel(1, "T.Model_0", tmp_path / "model.npz", f"{__name__}:CountingModel", {})
    assert CountingModel.reads == []
    assert loaded.model is loaded.model and isinstance(loaded.model, CountingModel)
    assert CountingModel.reads == [str(tmp_path / "model.npz")]


def test_pure_science_does_not_import_dagster() -> None:
    code = (
        "import sys, pkgutil, importlib, astra_dagster.methods as m\n"
        "for info in pkgutil.walk_packages(m.__path__, 'astra_dagster.methods.'):\n"
        "    importlib.import_module(info.name)\n"
        "bad = sorted(k for k in sys.modules if k == 'dagster' or k.startswith('dagster.'))\n"
        "print(len(list(pkgutil.walk_packages(m.__path__))))\n"
        "sys.exit('methods imported ' + ', '.join(bad[:3]) if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout
    assert int(proc.stdout.split()[-1]) >= 5  # the walk found the method modules


def test_product_and_bench_code_do_not_import_the_tests() -> None:
    offenders = [str(path.relative_to(ROOT)) for folder in ("astra_dagster", "bench")
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 if "astra_dagster_tests" in path.read_text(encoding="utf-8")]
    assert offenders == []
