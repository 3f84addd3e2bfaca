"""Scale-out figures, measured in one run (no timing asserts anywhere in the tests):

    python bench/scale.py --sources 200 --workers 2 --sizes 100,200,2000

1. ``doppler`` over ``--sources`` synthetic sources in a 10-block range, once on 1 worker and once
   (forced: the same tasks) on ``--workers`` worker processes: the throughput ratio, the
   per-source science time, and the overhead (Dagster + lineage + pool) as % of science time.
2. A cheap per-source asset with doppler-sized result rows over ranges of ``--sizes`` sources,
   each range run in a fresh process: peak RSS (flat when lineage streams) and ms per source
   (linear cost).
3. ``import dagster``, then ``import astra_dagster.definitions`` (``-X importtime``, one
   interpreter): the definitions' import time as a ratio of Dagster's, and how many scipy,
   astropy, ... and method modules it imported (none: they load with their ops).

The last line is JSON.
"""

# No "from __future__ import annotations" here: Dagster reads Config annotations at runtime.
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import dagster as dg  # noqa: E402

from astra_dagster.db.connection import connect  # noqa: E402
from astra_dagster.defs.partitions import RANGE_POLICY, SOURCE_BLOCKS, partition_range  # noqa: E402
from astra_dagster.lineage.batch import TaskBatch, TaskItem, Work, run_tasks  # noqa: E402
from astra_dagster.lineage.config import SourceTaskConfig  # noqa: E402
from astra_dagster.lineage.io_manager import RESULT_TABLE_KEY, AstraIOManager  # noqa: E402
from astra_dagster.lineage.sources import sources_in_blocks  # noqa: E402

TEMPLATES = {"ops": {"doppler_templates": {"config": {"n_train": 600, "n_hot": 120, "seed": 7}}}}


# ------------------------------------------------------------------ a cheap asset, doppler-sized rows


class BenchRow(SourceTaskConfig):
    task_family: ClassVar[str] = "Bench.ScaleRow"
    #: Elements per array column: 200 makes a ~20 kB row, so results held for a whole range
    #: (the old, unstreamed write) would show in the peak RSS.
    visits: int = 200


def _row(config: BenchRow, item: TaskItem) -> dict:
    values = [float(item.source_pk + v) for v in range(config.visits)]
    return {c: values for c in ("vhelio", "vrel", "u_vrel", "teff", "u_teff", "logg", "u_logg", "fe_h", "u_fe_h",
                                "chisq", "bc")} | {"bitmask_flag": [0] * config.visits,
                                                     "mjd": list(range(config.visits)), "vhelio_star": 1.0}


@dg.asset(partitions_def=SOURCE_BLOCKS, backfill_policy=RANGE_POLICY, io_manager_key="astra_io_manager",
          metadata={RESULT_TABLE_KEY: "doppler", "astra/task_family": BenchRow.task_family})
def bench_rows(context: dg.AssetExecutionContext, config: BenchRow) -> TaskBatch:
    keys, first_last = partition_range(context)
    with connect() as conn:
        sources = sources_in_blocks(conn, keys)
    items = [TaskItem(source_pk=s.pk, source_id=s.source_id) for s in sources]
    return run_tasks(context, config, items, Work(_row, state=config), table="doppler", batch=True,
                     partition_range=first_last)


def child_memory(n: int, block: int) -> None:
    """One range run of bench_rows over the first n sources; prints seconds and peak RSS."""
    from astra_dagster.lineage.sources import blocks_for

    keys = blocks_for(range(1, n + 1), block)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("source_blocks", keys)
    t0 = time.perf_counter()
    result = dg.materialize([bench_rows], instance=instance, resources={"astra_io_manager": AstraIOManager()},
                            tags={"dagster/asset_partition_range_start": keys[0],
                                  "dagster/asset_partition_range_end": keys[-1]},
                            raise_on_error=True)
    seconds = time.perf_counter() - t0
    assert result.success
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"sources": n, "seconds": seconds, "peak_rss_mib": rss_kib / 1024}))


# ------------------------------------------------------------------ the parts


def doppler_part(home: Path, n: int, workers: int) -> dict:
    from astra_dagster.db.connection import connect
    from astra_dagster.definitions import defs
    from astra_dagster.orchestration.build import materialize_assets
    from astra_dagster.orchestration.planned_runs import materialize_range
    from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
    from astra_dagster.spectra.release import generate_release

    block = max(1, n // 10)
    os.environ["ASTRA_SOURCES_PER_PARTITION"] = str(block)
    generate_release(home / "data", "scale", n, seed=17, progress=False)
    keys = [dg.AssetKey("spectra"), dg.AssetKey("doppler")]
    figures: dict = {}
    with dg.instance_for_test() as instance:
        assert materialize_assets(defs, [dg.AssetKey("doppler_templates")], instance=instance,
                                  run_config=TEMPLATES, log_level="WARNING").success
        plan = plan_new_releases(instance, home / "data", None, block_size=block)
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
        first, last = plan.new_partition_keys[0], plan.new_partition_keys[-1]
        os.environ["ASTRA_WORKERS"] = "1"
        assert materialize_range(defs, [keys[0]], first, last, instance=instance).success
        for label, w in (("serial", 1), ("pool", workers)):
            os.environ["ASTRA_WORKERS"] = str(w)
            config = {"ops": {"doppler": {"config": {"force": True}}}} if label == "pool" else None
            t0 = time.perf_counter()
            assert materialize_range(defs, [keys[1]], first, last, instance=instance, run_config=config).success
            wall = time.perf_counter() - t0
            with connect() as conn:
                parent, science, count = conn.execute(
                    "select p.duration, sum(c.duration), count(*) from astra.task p "
                    "join astra.batch_interface l on l.parent_task_pk = p.pk "
                    "join astra.task c on c.pk = l.child_task_pk "
                    "where p.asset_key = 'doppler' and p.source_pk is null group by p.pk order by p.pk desc limit 1"
                ).fetchone()
            figures[label] = {"workers": w, "run_s": wall, "step_s": parent, "science_s": science, "sources": count,
                              "science_ms_per_source": 1000 * science / count,
                              "overhead_pct": 100 * (parent * w - science) / science}
    figures["speedup"] = figures["serial"]["step_s"] / figures["pool"]["step_s"]
    return figures


def memory_part(sizes: list[int], workers: int) -> list[dict]:
    from astra_dagster.db.schema import ensure_schema
    from astra_dagster.lineage.sources import register_sources

    ensure_schema()
    with connect() as conn:
        register_sources(conn, [f"BENCH-{i}" for i in range(1, max(sizes) + 1)])
    rows = []
    for n in sizes:
        env = {**os.environ, "ASTRA_WORKERS": str(workers), "ASTRA_SOURCES_PER_PARTITION": "100"}
        proc = subprocess.run([sys.executable, __file__, "--child-memory", str(n)], env=env,
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["ms_per_source"] = 1000 * row["seconds"] / n
        rows.append(row)
    return rows


#: What a code location should not import before an op needs it (issue #12 point 5).
HEAVY_MODULES = ("scipy", "astropy", "matplotlib", "pyarrow", "distributed", "dask", "astra_dagster.methods")


def import_part() -> dict:
    """``import dagster`` then ``import astra_dagster.definitions`` in one interpreter, timed by
    ``-X importtime`` (cumulative microseconds of each top-level import): the ratio is load
    independent, unlike two fresh interpreters timed apart. Best of 3."""
    code = ("import sys, dagster, astra_dagster.definitions\n"
            f"heavy = {HEAVY_MODULES!r}\n"
            "print(sum(1 for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy)))")
    best: dict = {}
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True,
                              capture_output=True, text=True)
        top = {}
        for line in proc.stderr.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
                top[parts[2].strip()] = int(parts[1])
        dagster_s, ours_s = top["dagster"] / 1e6, top["astra_dagster.definitions"] / 1e6
        if not best or dagster_s + ours_s < best["import_dagster_s"] + best["import_definitions_extra_s"]:
            best = {"import_dagster_s": dagster_s, "import_definitions_extra_s": ours_s,
                    "definitions_vs_dagster": (dagster_s + ours_s) / dagster_s,
                    "heavy_modules_imported": int(proc.stdout.split()[-1])}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=200, help="sources of the doppler part")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", default="100,200,2000", help="range sizes of the memory part")
    parser.add_argument("--parts", default="doppler,memory,imports")
    parser.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_memory(args.child_memory, int(os.environ["ASTRA_SOURCES_PER_PARTITION"]))
        return

    home = Path(tempfile.mkdtemp(prefix="astra-bench-scale-"))
    os.environ.update({"ASTRA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")})
    os.environ.pop("ASTRA_DATABASE_URL", None)
    from astra_dagster.db.connection import close_pools
    from astra_dagster.db.embedded import stop_server

    parts = set(args.parts.split(","))
    out: dict = {"cores": os.cpu_count(), "workers": args.workers}
    try:
        if "doppler" in parts:
            d = out["doppler"] = doppler_part(home, args.sources, args.workers)
            for label in ("serial", "pool"):
                f = d[label]
                print(f"doppler, {f['workers']} worker(s): {f['sources']} sources, step {f['step_s']:.1f} s, "
                      f"science {f['science_ms_per_source']:.0f} ms/source, overhead {f['overhead_pct']:.1f} % "
                      "of science time (Dagster + lineage + pool, and idle workers)")
            print(f"doppler speed-up, {args.workers} workers vs 1: {d['speedup']:.2f}x")
        if "memory" in parts:
            rows = out["memory"] = memory_part([int(s) for s in args.sizes.split(",")], args.workers)
            for prev, r in zip([None, *rows], rows, strict=False):
                marginal = "" if prev is None else (
                    f", {1000 * (r['seconds'] - prev['seconds']) / (r['sources'] - prev['sources']):.2f} ms per "
                    f"source beyond {prev['sources']}")
                print(f"range of {r['sources']} sources: peak RSS {r['peak_rss_mib']:.0f} MiB, "
                      f"{r['ms_per_source']:.2f} ms/source ({r['seconds']:.1f} s, Dagster's run start included)"
                      + marginal)
            print(f"peak RSS {rows[-1]['sources']} vs {rows[0]['sources']} sources: "
                  f"{rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.2f}x")
        if "imports" in parts:
            i = out["imports"] = import_part()
            print(f"import dagster {i['import_dagster_s']:.2f} s, then astra_dagster.definitions "
                  f"+{i['import_definitions_extra_s']:.2f} s: {i['definitions_vs_dagster']:.2f}x dagster's; "
                  f"{i['heavy_modules_imported']} modules of {', '.join(HEAVY_MODULES)}")
    finally:
        close_pools()
        stop_server(home)
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
