"""Calibrate the synthetic generator's free constants against Doppler's Synspec emulator (offline).

    python bench/synth_calibrate.py [--maxiter 400]

The generator (astra_dagster/spectra/synth.py) has a few global constants that physics-lite
cannot pin down: log offsets of the species strengths (Fe-peak atoms, α atoms, CO, OH, CN, H2O,
FeH), the residual flux of saturated line cores and the pressure contrast seen by molecules.
This script fits them so that the line-blanketing statistics per chip (fraction of pixels below
0.8 / 0.9 / 0.97, median, 5th percentile) match the shipped Synspec Cannon emulator (vacuum,
R = 22,500) at 14 label points from M giants to F dwarfs. The result is printed and frozen by
hand in synth.py (_CALIBRATION, _DEPTH_METAL, _MOL_PRESSURE_SCALING): the generator never
downloads anything at run time. Needs the thedoppler wheel (network or cache).

Last line: a JSON object with the fitted constants and the before/after statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

from astra_dagster.methods.doppler import load_synspec_emulators  # noqa: E402
from astra_dagster.spectra import synth  # noqa: E402
from astra_dagster.spectra.spectrum import apstar_wavelength  # noqa: E402

POINTS = [  # teff, logg, fe_h
    (3600, 0.8, -0.3), (4000, 1.5, -0.2), (4300, 1.8, -0.5), (4500, 2.5, 0.0), (4800, 2.8, -1.0),
    (5000, 3.0, 0.0), (4600, 1.5, -2.0), (3600, 4.8, 0.0), (3900, 4.7, 0.0), (4200, 4.7, 0.0), (5000, 4.6, 0.0),
    (5500, 4.3, -1.0), (5800, 4.4, 0.0), (6500, 4.2, 0.0), (7500, 4.0, 0.0),
]
SPECIES = ("atoms", "CO", "OH", "CN", "H2O", "FeH")
#: Prior width (dex) of the CO and OH offsets around the physics anchors: blanketing statistics
#: alone cannot tell molecules from atoms, and the α/O features must stay strong.
PRIOR_DEX = {"CO": 0.5, "OH": 0.5}


def alpha_for(fe_h: float) -> float:
    return 0.0 if fe_h >= -0.5 else (0.3 if fe_h <= -1.0 else 0.15)


def statistics(flux: np.ndarray, chips: list[np.ndarray]) -> np.ndarray:
    out = []
    for sel in chips:
        f = flux[sel]
        out += [np.mean(f < 0.8), np.mean(f < 0.9), np.mean(f < 0.97), 3 * np.median(f),
                np.percentile(f, 5)]
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--maxiter", type=int, default=400)
    args = parser.parse_args()
    wave = apstar_wavelength()
    chips = [np.arange(a, b + 1) for a, b in synth.APSTAR_CHIP_PIXELS]
    cool = load_synspec_emulators(("coolstars",))[0]
    targets = []
    for teff, logg, fe_h in POINTS:
        ref = np.interp(wave, cool.wavelength, cool.flux(np.array([teff, logg, fe_h], dtype=float)))
        targets.append(statistics(ref, chips))
    targets = np.array(targets)

    def apply(x: np.ndarray) -> None:
        for name, value in zip(SPECIES, x[: len(SPECIES)], strict=True):
            synth._CALIBRATION[name] = float(value)
        synth._CALIBRATION["alpha_atoms"] = float(x[0])  # α elements share the Fe-peak offset
        synth._DEPTH_METAL = float(np.clip(x[len(SPECIES)], 0.6, 0.95))
        synth._MOL_PRESSURE_SCALING = float(np.clip(x[len(SPECIES) + 1], 0.0, 1.5))
        synth._line_list.cache_clear()
        synth._grid.cache_clear()

    def model_stats(x: np.ndarray) -> np.ndarray:
        apply(x)
        rows = []
        for teff, logg, fe_h in POINTS:
            lab = {"teff": teff, "logg": logg, "fe_h": fe_h, "alpha_m": alpha_for(fe_h)}
            rows.append(statistics(synth.synthesize(lab, wave, synth.TRAINING_SETTINGS), chips))
        return np.array(rows)

    def loss(x: np.ndarray) -> float:
        prior = sum((x[SPECIES.index(k)] / w) ** 2 for k, w in PRIOR_DEX.items())
        return float(np.sum((model_stats(x) - targets) ** 2) + 0.05 * prior)

    x0 = np.array([synth._CALIBRATION[k] for k in SPECIES] + [synth._DEPTH_METAL, synth._MOL_PRESSURE_SCALING])
    before = loss(x0)
    t0 = time.perf_counter()
    res = minimize(loss, x0, method="Nelder-Mead",
                   options={"maxiter": args.maxiter, "xatol": 0.01, "fatol": 1e-4,
                            "initial_simplex": np.vstack([x0] + [x0 + 0.3 * np.eye(x0.size)[i]
                                                                 for i in range(x0.size)])})
    for _ in range(2):  # Nelder-Mead restarts: the statistics are slightly noisy in the constants
        res = minimize(loss, res.x, method="Nelder-Mead",
                       options={"maxiter": args.maxiter, "xatol": 0.01, "fatol": 1e-4,
                                "initial_simplex": np.vstack([res.x] + [res.x + 0.15 * np.eye(x0.size)[i]
                                                                        for i in range(x0.size)])})
    stats = model_stats(res.x)
    print(f"loss {before:.4f} -> {res.fun:.4f} in {time.perf_counter() - t0:.0f} s, {res.nfev} evaluations")
    print("point                 frac<0.9 per chip (emulator -> generator)")
    for p, t, s in zip(POINTS, targets, stats, strict=True):
        print(f"{p!s:22s}", "  ".join(f"{t[1 + 5 * c]:.2f}->{s[1 + 5 * c]:.2f}" for c in range(3)))
    fitted = {k: round(float(v), 3) for k, v in zip(SPECIES, res.x, strict=False)}
    fitted["alpha_atoms"] = fitted["atoms"]
    fitted["depth_metal"] = round(float(np.clip(res.x[len(SPECIES)], 0.6, 0.95)), 3)
    fitted["mol_pressure_scaling"] = round(float(np.clip(res.x[len(SPECIES) + 1], 0.0, 1.5)), 3)
    print(json.dumps({"loss_before": before, "loss_after": float(res.fun), "constants": fitted}))


if __name__ == "__main__":
    main()
