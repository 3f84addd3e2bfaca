"""Train APOGEENet and measure it: accuracy per population at S/N ≥ 50 and per S/N bin, inference cost.

    python bench/apogeenet_train.py [--size full|ci] [--n-train N] [--epochs E] [--seed S]
                                    [--model PATH] [--load PATH] [--n-test 80] [--draws 20]

``--size full`` uses :data:`astra_dagster.methods.apogeenet.FULL_TRAINING` (tens of minutes on one
core), ``ci`` the ``train_model`` defaults. ``--load`` skips training and evaluates a saved model.
Test spectra: release-like raw apStar rows (``RELEASE_SETTINGS``, own stream; see
``astra_dagster/spectra/labelled_sets.py``), per population (giants, dwarfs, hot, yso) at S/N
log-uniform 50-300, plus a survey-mix set at S/N 10-300 for the S/N bins. The inference cost is
``fit_spectra`` wall and CPU time per spectrum on one core with ``--draws`` noisy passes (best of
3; the 1-minute load average is printed with it, as other processes inflate the wall time).
Last line: JSON ``{"bench": "apogeenet_train", ...}``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from astra_dagster.methods import apogeenet as an  # noqa: E402
from astra_dagster.methods.metrics import accuracy_bins  # noqa: E402
from astra_dagster.spectra.labelled_sets import raw_release_like  # noqa: E402


def _evaluate(model: an.ApogeeNet, population: str, n: int, seed: int, snr_range: tuple[float, float],
              bins: tuple, n_draws: int) -> list[dict]:
    snr = np.exp(np.random.default_rng(seed).uniform(math.log(snr_range[0]), math.log(snr_range[1]), n))
    spectra, truth, snr = raw_release_like(n, seed, snr, population)
    rows = an.fit_spectra(model, spectra, n_draws=n_draws)
    est = {k: np.array([np.nan if r[k] is None else r[k] for r in rows]) for k in ("teff", "logg", "fe_h")}
    unc = {k: np.array([np.nan if r["u_" + k] is None else r["u_" + k] for r in rows]) for k in est}
    est["teff_frac"] = est["teff"] / truth["teff"] - 1.0
    unc["teff_frac"] = unc["teff"] / truth["teff"]
    return accuracy_bins({**truth, "teff_frac": np.zeros(n)}, est, unc, snr, bins=bins)


def _short(stats: dict) -> dict:
    return {k: {s: (None if v[s] is None else round(v[s], 4)) for s in ("bias", "robust_sigma", "rms",
                                                                         "outlier_frac", "pull_std")}
            for k, v in stats.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("full", "ci"), default="full")
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, help="write the trained model here")
    ap.add_argument("--load", type=Path, help="evaluate this saved model instead of training")
    ap.add_argument("--n-test", type=int, default=80, help="test spectra per population")
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args()

    out: dict = {"bench": "apogeenet_train"}
    if args.load:
        model = an.ApogeeNet.read(args.load)
    else:
        size = an.FULL_TRAINING if args.size == "full" else an.DEFAULT_TRAINING
        n_train = args.n_train or size["n_spectra"]
        epochs = args.epochs or size["epochs"]
        t0 = time.perf_counter()
        model = an.train_default(args.seed, n_spectra=n_train, epochs=epochs,
                                 log=lambda s: print(s, flush=True))
        out["train_wall_s"] = round(time.perf_counter() - t0, 1)
        if args.model:
            model.write(args.model)
    out["summary"] = model.summary()
    print(json.dumps(out["summary"]), flush=True)

    out["high_snr"] = {}
    for i, pop in enumerate(("giants", "dwarfs", "hot", "yso")):
        (stats,) = _evaluate(model, pop, args.n_test, 500 + i, (50.0, 300.0), ((50, None),), args.draws)
        out["high_snr"][pop] = _short(stats["labels"])
        print(pop, json.dumps(out["high_snr"][pop]), flush=True)
    survey = _evaluate(model, "survey", 4 * args.n_test, 600, (10.0, 300.0),
                       ((10, 20), (20, 50), (50, 100), (100, None)), args.draws)
    out["survey_bins"] = [{"snr_lo": b["snr_lo"], "snr_hi": b["snr_hi"], "n": b["n"], "labels": _short(b["labels"])}
                          for b in survey]
    for b in out["survey_bins"]:
        print("survey S/N", b["snr_lo"], b["snr_hi"], b["n"],
              {k: v["robust_sigma"] for k, v in b["labels"].items()}, flush=True)

    spectra, _, _ = raw_release_like(64, 700, 60.0, "survey")
    an.fit_spectra(model, spectra[:4], n_draws=args.draws)   # warm-up
    timing = {}
    for draws in sorted({0, args.draws}):
        best_wall = best_cpu = math.inf
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            an.fit_spectra(model, spectra, n_draws=draws)
            best_wall = min(best_wall, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        # CPU time too: on a shared machine the wall time also counts other processes' turns
        timing[f"ms_per_spectrum_{draws}_draws"] = round(1e3 * best_wall / len(spectra), 3)
        timing[f"cpu_ms_per_spectrum_{draws}_draws"] = round(1e3 * best_cpu / len(spectra), 3)
    timing["load_average_1min"] = os.getloadavg()[0]
    out["timing"] = timing
    print(json.dumps(timing), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
