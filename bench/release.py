"""Generating a synthetic release, then registering its spectra through the spectra asset.

    python bench/release.py --sources 200 --seed 3

Prints spectra generated per second (visit renders + stacks, FITS writing included) and spectra
registered per second by the ``spectra`` asset over one range run, with the share of the
registration spent reading and checking files (the tasks' own durations) against everything else
(Dagster, the database). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=200)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="astra-bench-release-"))
    os.environ.update({"ASTRA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
                       "ASTRA_SOURCES_PER_PARTITION": "100"})
    os.environ.pop("ASTRA_DATABASE_URL", None)
    import dagster as dg

    from astra_dagster.db.connection import close_pools, connect
    from astra_dagster.db.embedded import stop_server
    from astra_dagster.orchestration.build import load_definitions
    from astra_dagster.orchestration.instance import get_instance, write_dagster_yaml
    from astra_dagster.orchestration.planned_runs import run_planned
    from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
    from astra_dagster.spectra.release import generate_release, read_truth

    try:
        t0 = time.perf_counter()
        release = generate_release(home / "data", "bench", args.sources, args.seed, progress=False)
        generate_s = time.perf_counter() - t0
        _, visits = read_truth(release)
        n_generated = len(visits) + sum(1 if n == 1 else n + 2 for n in
                                        _visits_per_source(visits).values())

        write_dagster_yaml()
        instance = get_instance()
        defs = load_definitions()
        t0 = time.perf_counter()
        plan = plan_new_releases(instance, home / "data", None, block_size=100)
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
        plan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        outcomes = run_planned(defs, plan.runs, [dg.AssetKey("spectra")], instance=instance)
        register_s = time.perf_counter() - t0
        assert all(o.success for o in outcomes)
        with connect() as conn:
            n_registered = conn.execute("select count(*) from astra.spectrum").fetchone()[0]
            reading_s = conn.execute("select sum(duration) from astra.task where asset_key = 'spectra' "
                                     "and source_pk is not null").fetchone()[0]
    finally:
        close_pools()
        stop_server(home)
        shutil.rmtree(home, ignore_errors=True)

    print(f"generated {n_generated} spectra ({len(visits)} apVisit) of {args.sources} sources in "
          f"{generate_s:.1f} s: {n_generated / generate_s:.1f} spectra/s")
    print(f"release registration (manifest, sources, partitions): {plan_s:.2f} s")
    print(f"spectra asset: {n_registered} spectra in {register_s:.1f} s: {n_registered / register_s:.1f} spectra/s; "
          f"reading and checking files {reading_s:.1f} s ({100 * reading_s / register_s:.0f} %), "
          f"the rest (Dagster run, database) {register_s - reading_s:.1f} s")
    print(json.dumps({"sources": args.sources, "spectra_generated": n_generated,
                      "generated_spectra_per_s": round(n_generated / generate_s, 2),
                      "spectra_registered": n_registered,
                      "registered_spectra_per_s": round(n_registered / register_s, 2),
                      "file_read_fraction": round(reading_s / register_s, 3)}))


def _visits_per_source(visits: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in visits:
        counts[v["source_id"]] = counts.get(v["source_id"], 0) + 1
    return counts


if __name__ == "__main__":
    main()
