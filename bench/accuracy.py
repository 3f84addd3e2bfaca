"""Accuracy of a method's asset on a fresh synthetic release, against the release's truth.

    python bench/accuracy.py --method doppler --sources 200 --seed 1

Generates a release with that seed under a throw-away ASTRA_HOME (embedded PostgreSQL), runs the
release through the same code path as the release sensor (models trained first), then compares
the method's table with the truth tables per S/N bin. Prints a table per label; the last line is
one JSON object (contract 6 of ARCHITECTURE.md):

    {"method": M, "seed": S, "sources": N, "seconds_per_spectrum": t,
     "bins": [{"snr_lo": 10, "snr_hi": 20, "n": k, "labels": {"vrel": {"bias": ..., "rms": ...,
               "robust_sigma": ..., "outlier_frac": ..., "pull_std": ...}, ...}}, ...]}

Set OMP_NUM_THREADS=1 (the script does by default) so one core does one spectrum.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


@dataclass(frozen=True)
class Method:
    asset: str
    table: str
    #: Builds (truth, estimate, uncertainty, snr, kind of star) per spectrum from the result rows
    #: and the truth tables.
    compare: Callable[[list[dict], dict, dict], tuple[dict, dict, dict, list, list]]


def _doppler(rows: list[dict], stars: dict, visits: dict) -> tuple[dict, dict, dict, list, list]:
    """Per visit: vrel against the true v_rel; Doppler's coarse labels against the star's."""
    names = {"vrel": "vrel", "teff": "teff", "logg": "logg", "fe_h": "fe_h"}
    truth: dict[str, list] = {k: [] for k in names}
    est: dict[str, list] = {k: [] for k in names}
    unc: dict[str, list] = {k: [] for k in names}
    snr, kinds = [], []
    for row in rows:
        star = stars[row["source_id"]]
        for i, mjd in enumerate(row["mjd"]):
            visit = visits.get((row["source_id"], mjd))
            if visit is None:
                continue
            for name in names:
                truth[name].append(visit["vrel"] if name == "vrel" else star[name])
                value = row[name][i]
                est[name].append(float("nan") if value is None else value)
                u = row[f"u_{name}"]
                u = u[i] if isinstance(u, list) else u
                unc[name].append(float("nan") if u is None else u)
            snr.append(visit["snr"])
            kinds.append(star.get("kind", "?"))
    return truth, est, unc, snr, kinds


def _labels(mapping: dict[str, str], relative_teff: bool = False
            ) -> Callable[[list[dict], dict, dict], tuple[dict, dict, dict, list, list]]:
    """Per apStar stack: the table's columns (keys of ``mapping``) against the star's truth
    (values); with ``relative_teff`` also ``teff_frac`` = ΔTeff / Teff (the FERRE and APOGEENet
    targets are relative)."""

    def compare(rows: list[dict], stars: dict, visits: dict) -> tuple[dict, dict, dict, list, list]:
        names = list(mapping) + (["teff_frac"] if relative_teff else [])
        truth: dict[str, list] = {k: [] for k in names}
        est: dict[str, list] = {k: [] for k in names}
        unc: dict[str, list] = {k: [] for k in names}
        snr, kinds = [], []
        for row in rows:
            star = stars[row["source_id"]]
            for i, s in enumerate(row["snr"]):
                for column, true_name in mapping.items():
                    value, u = row[column][i], row[f"u_{column}"][i]
                    truth[column].append(star[true_name])
                    est[column].append(float("nan") if value is None else value)
                    unc[column].append(float("nan") if u is None else u)
                if relative_teff:
                    value, u = row["teff"][i], row["u_teff"][i]
                    truth["teff_frac"].append(0.0)
                    est["teff_frac"].append(float("nan") if value is None else value / star["teff"] - 1.0)
                    unc["teff_frac"].append(float("nan") if u is None else u / star["teff"])
                snr.append(float("nan") if s is None else s)
                kinds.append(star.get("kind", "?"))
        return truth, est, unc, snr, kinds

    return compare


_MAIN = {"teff": "teff", "logg": "logg", "fe_h": "fe_h", "alpha_m": "alpha_m"}

METHODS: dict[str, Method] = {
    "doppler": Method("doppler", "doppler", _doppler),
    "thecannon": Method("thecannon", "thecannon", _labels(_MAIN)),
    "thepayne": Method("thepayne", "thepayne", _labels({**_MAIN, "rv": "rv_zero"})),
    "ferre": Method("ferre", "ferre", _labels({"teff": "teff", "logg": "logg", "metals": "fe_h",
                                               "o_mg_si_s_ca_ti": "alpha_m"}, relative_teff=True)),
    "apogeenet": Method("apogeenet", "apogeenet", _labels({"teff": "teff", "logg": "logg", "fe_h": "fe_h"},
                                                          relative_teff=True)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--sources", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temporary ASTRA_HOME")
    parser.add_argument("--model-config", type=json.loads, default=None,
                        help='JSON Config of the model asset, e.g. \'{"n_train": 3000}\' (default: its defaults)')
    args = parser.parse_args()
    method = METHODS[args.method]

    home = Path(tempfile.mkdtemp(prefix="astra-accuracy-"))
    os.environ.update({"ASTRA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
                       "ASTRA_DATA_ROOT": str(home / "data"), "ASTRA_SOURCES_PER_PARTITION": "100"})
    os.environ.pop("ASTRA_DATABASE_URL", None)
    import dagster as dg

    from astra_dagster.build import load_definitions
    from astra_dagster.db.connection import close_pools, connect
    from astra_dagster.db.embedded import stop_server
    from astra_dagster.instance import get_instance, write_dagster_yaml
    from astra_dagster.methods.metrics import accuracy_bins
    from astra_dagster.pipeline import ensure_models, run_planned
    from astra_dagster.release_plan import SOURCE_BLOCKS_NAME, plan_new_releases
    from astra_dagster.spectra.release import generate_release, read_truth

    try:
        t0 = time.perf_counter()
        release_dir = generate_release(home / "data", f"accuracy-{args.seed}", args.sources, args.seed,
                                       progress=sys.stderr.isatty())
        print(f"generated {args.sources} sources in {time.perf_counter() - t0:.1f} s", flush=True)
        write_dagster_yaml()
        instance = get_instance()
        defs = load_definitions()
        plan = plan_new_releases(instance, home / "data", None, block_size=100)
        instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)
        assets = [dg.AssetKey("spectra"), dg.AssetKey(method.asset)]
        t0 = time.perf_counter()
        if args.model_config is not None:
            from astra_dagster.build import materialize_assets
            from astra_dagster.defs.sensors import RELEASE_ASSETS

            (model_key,) = RELEASE_ASSETS[dg.AssetKey(method.asset)]
            name = model_key.to_user_string()
            if not materialize_assets(defs, [model_key], instance=instance, log_level="WARNING",
                                      run_config={"ops": {name: {"config": args.model_config}}}).success:
                raise SystemExit(f"training {name} failed")
        ensure_models(defs, assets, instance=instance)
        print(f"models ready in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        for outcome in run_planned(defs, plan.runs, assets, instance=instance):
            if not outcome.success:
                raise SystemExit(f"run {outcome.run_id} failed")
            for c in outcome.counts:
                print(f"{c.asset}: {c.computed} computed, {c.skipped} skipped, {c.failed} failed", flush=True)
        print(f"assets ran in {time.perf_counter() - t0:.1f} s", flush=True)

        with connect() as conn, conn.cursor() as cur:
            cur.execute(
                f"select s.source_id, r.* from astra.task t join astra.{method.table} r on r.output_pk = t.output_pk "
                "join astra.source s on s.pk = t.source_pk where t.asset_key = %s and t.status_code = 1",
                (method.asset,))
            names = [d.name for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            science_s = conn.execute("select coalesce(sum(duration), 0) from astra.task where asset_key = %s "
                                     "and source_pk is not null", (method.asset,)).fetchone()[0]
        stars_list, visit_list = read_truth(release_dir)
        # apStar spectra are in the star's rest frame: a fitted RV offset should be zero.
        stars = {s["source_id"]: {**s, "rv_zero": 0.0} for s in stars_list}
        visits = {(v["source_id"], v["mjd"]): v for v in visit_list}
        truth, est, unc, snr, kinds = method.compare(rows, stars, visits)
        bins = accuracy_bins(truth, est, unc, snr)
        by_kind = {}
        for kind in sorted(set(kinds)):
            pick = [i for i, k in enumerate(kinds) if k == kind]
            sub = accuracy_bins({k: [v[i] for i in pick] for k, v in truth.items()},
                                {k: [v[i] for i in pick] for k, v in est.items()},
                                {k: [v[i] for i in pick] for k, v in unc.items()}, [snr[i] for i in pick],
                                bins=((20, None),))[0]
            by_kind[kind] = sub
            cells = "  ".join(f"{label} rms {st['rms']:.3g} (robust {st['robust_sigma']:.3g})"
                              for label, st in sub["labels"].items() if st["rms"] is not None)
            print(f"S/N>=20 {kind:6s} n={sub['n']:4d}  {cells}")
        per_spectrum = science_s / max(len(snr), 1)
        for b in bins:
            hi = "" if b["snr_hi"] is None else b["snr_hi"]
            print(f"S/N {b['snr_lo']}-{hi}: n={b['n']}")
            for label, st in b["labels"].items():
                if st["rms"] is None:
                    continue
                pull = "-" if st["pull_std"] is None else f"{st['pull_std']:.2f}"
                print(f"  {label:6s} bias {st['bias']:+.4g}  rms {st['rms']:.4g}  robust σ {st['robust_sigma']:.4g}"
                      f"  outliers {st['outlier_frac']:.3f}  pull std {pull}")
        print(f"{per_spectrum * 1000:.1f} ms per spectrum ({len(snr)} spectra, {len(rows)} sources)")
        report: dict[str, Any] = {"method": args.method, "seed": args.seed, "sources": args.sources,
                                  "seconds_per_spectrum": round(per_spectrum, 5), "bins": bins,
                                  "by_kind_snr_ge_20": by_kind}
    finally:
        close_pools()
        stop_server(home)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
