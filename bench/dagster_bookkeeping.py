"""Dagster's own bookkeeping per partition: dagster-postgres as shipped (NullPool) vs pooled.

Materialises a no-op asset over a range of P partitions in one run (single-run backfill policy),
twice per storage, and reports the per-partition cost as the slope between a small and a large
range, so the fixed cost of a run cancels out. Each partition writes its planned and
materialisation events to the event log; with NullPool every event opens a new connection.

    python bench/dagster_bookkeeping.py [--small 20] [--large 220] [--repeats 2]

The last line is JSON: ``{"default_ms_per_partition": ..., "pooled_ms_per_partition": ..., "speedup": ...}``.
"""


import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
import yaml

PARTITIONS = dg.DynamicPartitionsDefinition(name="bench_blocks")
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dg.asset(partitions_def=PARTITIONS, backfill_policy=dg.BackfillPolicy.single_run())
def bench_noop(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"partitions": len(context.partition_keys)})


def instance_dir(root: Path, name: str, storage: dict) -> Path:
    home = root / name
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump({"storage": storage, "telemetry": {"enabled": False}}))
    return home


def run_range(instance: dg.DagsterInstance, keys: list[str]) -> float:
    t0 = time.perf_counter()
    result = dg.materialize(
        [bench_noop], instance=instance, run_config=QUIET,
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
    )
    assert result.success
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--large", type=int, default=220)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="astra-bench-dagster-"))
    os.environ["ASTRA_HOME"] = str(root / "astra")
    os.environ.pop("ASTRA_DATABASE_URL", None)
    from astra_dagster.db.connection import _ensure_database, _with_database, database_url, sqlalchemy_url

    server = database_url()
    for name in ("bench_default", "bench_pooled"):
        _ensure_database(server, name)
    default_url = sqlalchemy_url(_with_database(server, "bench_default"))
    storages = {
        "default": {"postgres": {"postgres_url": default_url}},
        "pooled": {"custom": {"module": "astra_dagster.db.dagster_storage", "class": "PooledPostgresStorage",
                              "config": {"postgres_url": _with_database(server, "bench_pooled")}}},
    }
    keys = [f"{i:08d}" for i in range(1, args.large + 1)]
    per_partition: dict[str, float] = {}
    for name, storage in storages.items():
        instance = dg.DagsterInstance.from_config(str(instance_dir(root, name, storage)))
        instance.add_dynamic_partitions(PARTITIONS.name, keys)
        run_range(instance, keys[:5])  # warm-up: imports, table creation
        small = statistics.median(run_range(instance, keys[: args.small]) for _ in range(args.repeats))
        large = statistics.median(run_range(instance, keys) for _ in range(args.repeats))
        per_partition[name] = 1000 * (large - small) / (args.large - args.small)
        print(f"{name:8s} {args.small} partitions {small:.2f} s, {args.large} partitions {large:.2f} s: "
              f"{per_partition[name]:.1f} ms per partition", flush=True)
        instance.dispose()
    from astra_dagster.db.embedded import stop_server

    stop_server(root / "astra")
    speedup = per_partition["default"] / per_partition["pooled"]
    print(f"pooled storage: {speedup:.2f}x less bookkeeping per partition")
    print(json.dumps({"default_ms_per_partition": round(per_partition["default"], 2),
                      "pooled_ms_per_partition": round(per_partition["pooled"], 2),
                      "speedup": round(speedup, 2)}))


if __name__ == "__main__":
    main()
