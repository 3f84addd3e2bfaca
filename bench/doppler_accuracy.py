"""Accuracy of the Doppler method on release-like synthetic visits, per S/N bin.

    python bench/doppler_accuracy.py [--visits 600] [--seed 1] [--population survey]
                                     [--snr-min 10] [--snr-max 200]

Visits come from :mod:`astra_dagster.spectra.visit_sets` (RELEASE_SETTINGS, random RV/BC,
fiber-dependent R, noise at a log-uniform S/N); the templates are the generator-trained
emulators (:func:`astra_dagster.methods.doppler.templates.train_generator_emulators`, trained once and
cached). For every S/N bin (10-20, 20-50, 50-100, 100+) and for ``vrel``, ``teff``, ``logg``,
``fe_h``: n, bias, rms, robust σ (1.4826 MAD), outlier fraction (|Δ| > 3 robust σ) and pull
std (Δ/σ). Subsets: ``all`` and ``disk`` (Teff < 7000 K and [Fe/H] > -1: the bulk of APOGEE
targets; metal-poor and hot stars carry less velocity information, which their own reported
errors show). BLAS threads are forced to 1. The last line is JSON.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from astra_dagster.methods.doppler import fit_visit, train_generator_emulators  # noqa: E402
from astra_dagster.spectra.visit_sets import synthetic_visits  # noqa: E402

BINS = ((10.0, 20.0), (20.0, 50.0), (50.0, 100.0), (100.0, None))


def _stats(delta: np.ndarray, sigma: np.ndarray) -> dict:
    ok = np.isfinite(delta)
    d = delta[ok]
    if d.size == 0:
        return {"n": 0}
    med = float(np.median(d))
    robust = float(1.4826 * np.median(np.abs(d - med)))
    s = sigma[ok]
    pull = d / s
    return {"n": int(d.size), "bias": round(float(np.mean(d)), 4),
            "rms": round(float(np.sqrt(np.mean(d * d))), 4), "robust_sigma": round(robust, 4),
            "outlier_frac": round(float(np.mean(np.abs(d - med) > 3 * robust)) if robust > 0 else 0.0, 3),
            "pull_std": round(float(np.std(pull[np.isfinite(pull)])), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--population", default="survey")
    parser.add_argument("--snr-min", type=float, default=10.0)
    parser.add_argument("--snr-max", type=float, default=200.0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    templates = train_generator_emulators()
    t_train = time.perf_counter() - t0
    visits = synthetic_visits(args.visits, args.seed, snr_range=(args.snr_min, args.snr_max),
                              population=args.population)
    fit_visit(visits[0].spectrum, templates)  # fill per-process template caches
    rows, seconds = [], 0.0
    for v in visits:
        t = time.perf_counter()
        r = fit_visit(v.spectrum, templates)
        seconds += time.perf_counter() - t
        rows.append((v, r))
    snr = np.array([v.snr for v, _ in rows])
    teff_true = np.array([v.labels["teff"] for v, _ in rows])
    feh_true = np.array([v.labels["fe_h"] for v, _ in rows])
    delta = {
        "vrel": np.array([r.vrel - v.vrel for v, r in rows]),
        "teff": np.array([r.teff - v.labels["teff"] for v, r in rows]),
        "logg": np.array([r.logg - v.labels["logg"] for v, r in rows]),
        "fe_h": np.array([r.fe_h - v.labels["fe_h"] for v, r in rows]),
    }
    sigma = {
        "vrel": np.array([r.u_vrel for _, r in rows]), "teff": np.array([r.u_teff for _, r in rows]),
        "logg": np.array([r.u_logg for _, r in rows]), "fe_h": np.array([r.u_fe_h for _, r in rows]),
    }
    subsets = {"all": np.ones(snr.size, dtype=bool), "disk": (teff_true < 7000) & (feh_true > -1.0)}
    out = {"method": "doppler", "seed": args.seed, "visits": args.visits,
           "population": args.population, "training_seconds": round(t_train, 1),
           "seconds_per_spectrum": round(seconds / len(rows), 4),
           "n_failed": int(sum(not r.ok for _, r in rows)), "subsets": {}}
    print(f"{len(rows)} visits, {1e3 * seconds / len(rows):.1f} ms/visit, "
          f"{out['n_failed']} without a velocity, templates in {t_train:.1f} s")
    for name, sel in subsets.items():
        bins = []
        for lo, hi in BINS:
            in_bin = sel & (snr >= lo) & (snr < (hi if hi is not None else np.inf))
            labels = {k: _stats(delta[k][in_bin], sigma[k][in_bin]) for k in delta}
            bins.append({"snr_lo": lo, "snr_hi": hi, "n": int(in_bin.sum()), "labels": labels})
            v = labels["vrel"]
            if v["n"]:
                print(f"{name:4s} S/N {lo:>5.0f}-{'' if hi is None else f'{hi:.0f}':>4s} n={v['n']:4d} "
                      f"vrel bias {v['bias']:+.3f} rms {v['rms']:.3f} robust {v['robust_sigma']:.3f} "
                      f"pull {v['pull_std']:.2f} | Teff rms {labels['teff']['rms']:.0f} "
                      f"logg {labels['logg']['rms']:.2f} [Fe/H] {labels['fe_h']['rms']:.2f}")
        out["subsets"][name] = bins
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
