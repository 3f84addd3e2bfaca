"""Cost of one Doppler visit fit on one core (BLAS threads forced to 1).

    python bench/doppler_speed.py [--data real,synth,toy] [--visits 40] [--repeat 3]

Data sets (each skipped with a note when unavailable):
* ``real``  — the two real apVisit files from the thedoppler wheel, Synspec templates (both
  families, as the pipeline runs them);
* ``synth`` — generator visits (RELEASE_SETTINGS, random RV/BC, S/N 20-150) fitted with
  generator-trained templates (trained once, then cached);
* ``toy``   — the analytic line-list model of the tests (always available).

Every spectrum is fitted once untimed (template caches fill once per process), then ``--repeat``
times timed. Prints one line per data set; the last line is JSON:
``{"bench": "doppler_speed", "ms_per_visit": <worst data set median>, "data": {name: {...}}}``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from astra_dagster.methods.doppler import fit_visit  # noqa: E402


def _real() -> tuple[list, list]:
    from astra_dagster.methods.doppler import load_synspec_emulators
    from astra_dagster.spectra.apogee import read_apvisit
    from astra_dagster.spectra.realdata import THEDOPPLER, extract_matching

    spectra = [read_apvisit(p) for p in extract_matching(*THEDOPPLER, "*apVisit*.fits")]
    return spectra, load_synspec_emulators()


def _synth(n: int, seed: int) -> tuple[list, list]:
    from astra_dagster.methods.doppler import train_generator_emulators
    from astra_dagster.spectra.visit_sets import synthetic_visits

    visits = synthetic_visits(n, seed, snr_range=(20.0, 150.0))
    return [v.spectrum for v in visits], train_generator_emulators()


def _toy(n: int, seed: int) -> tuple[list, list]:
    from astra_dagster.spectra.toy_templates import toy_emulator, toy_visit

    rng = np.random.default_rng(seed)
    spectra = []
    for i in range(n):
        labels = np.array([rng.uniform(3800, 6200), rng.uniform(0.5, 4.5), rng.uniform(-1.5, 0.3)])
        spectra.append(toy_visit(labels, float(rng.normal(0, 100)), float(rng.uniform(20, 150)), rng,
                                 continuum_seed=i))
    return spectra, [toy_emulator()]


def _time(spectra: list, templates: list, repeat: int) -> dict:
    for s in spectra:
        fit_visit(s, templates)  # warm: coarse template FFTs are cached per process
    times = []
    for _ in range(repeat):
        for s in spectra:
            t0 = time.perf_counter()
            fit_visit(s, templates)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"n_spectra": len(spectra), "n_fits": len(times),
            "median_ms": round(statistics.median(times), 2),
            "mean_ms": round(statistics.fmean(times), 2),
            "p90_ms": round(float(np.percentile(times, 90)), 2),
            "n_pixels": int(np.median([s.n_pixels for s in spectra]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="real,synth,toy")
    parser.add_argument("--visits", type=int, default=40, help="synthetic/toy visits")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    out: dict[str, dict] = {}
    for name in [d.strip() for d in args.data.split(",") if d.strip()]:
        try:
            if name == "real":
                spectra, templates = _real()
            elif name == "synth":
                spectra, templates = _synth(args.visits, args.seed)
            elif name == "toy":
                spectra, templates = _toy(args.visits, args.seed)
            else:
                parser.error(f"unknown data set {name!r}")
        except (ImportError, RuntimeError) as exc:
            print(f"{name}: skipped ({exc})")
            continue
        stats = _time(spectra, templates, args.repeat)
        out[name] = stats
        print(f"{name}: {stats['median_ms']:.1f} ms/visit median, {stats['mean_ms']:.1f} mean, "
              f"{stats['p90_ms']:.1f} p90 ({stats['n_fits']} fits, {stats['n_pixels']} px)")
    worst = max((d["median_ms"] for d in out.values()), default=None)
    print(json.dumps({"bench": "doppler_speed", "blas_threads": 1, "ms_per_visit": worst, "data": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
