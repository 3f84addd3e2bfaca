"""Speed of the synthetic release generator on one core.

    python bench/release_generate.py [--sources 200] [--seed 1] [--keep DIR]

Measures (1) the bare generator: ``synth.synthesize`` with the release settings on the apStar
grid for survey-population stars, (2) a whole release: apVisit rendering (spectrum, continuum,
throughput, tellurics, sky, noise, masks), apStar stacking, FITS writing, truth tables and the
manifest. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from astra_dagster.spectra import release, synth  # noqa: E402
from astra_dagster.spectra.spectrum import apstar_wavelength  # noqa: E402

#: The generator's budget per release-settings spectrum on one core (timed here, not in the tests).
SYNTH_TARGET_MS = 25.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="write the release here and keep it")
    args = parser.parse_args()

    wave = apstar_wavelength()
    labels = synth.draw_labels(200, np.random.default_rng(args.seed))
    stars = [{k: labels[k][i] for k in synth.ALL_LABELS} for i in range(200)]
    synth.synthesize(stars[0], wave)  # line list and grid caches
    t0 = time.perf_counter()
    for i, star in enumerate(stars):
        synth.synthesize(star, wave, synth.RELEASE_SETTINGS, rv_kms=float(i % 50), fiber=i % 300 + 1)
    synth_ms = (time.perf_counter() - t0) / len(stars) * 1e3
    t0 = time.perf_counter()
    for star in stars:
        synth.synthesize(star, wave, synth.TRAINING_SETTINGS)
    train_ms = (time.perf_counter() - t0) / len(stars) * 1e3

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t0 = time.perf_counter()
        path = release.generate_release(root, f"bench-{args.seed}", args.sources, args.seed, progress=False)
        seconds = time.perf_counter() - t0
        summary = release.summarize(path)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    snr = np.array(summary.snr)
    print(f"generator: {synth_ms:.1f} ms/spectrum (release settings), {train_ms:.1f} ms (training settings)")
    print(f"release: {args.sources} sources, {summary.visits} visits in {seconds:.1f} s "
          f"= {summary.visits / seconds:.1f} visits/s ({seconds / summary.visits * 1e3:.1f} ms per visit "
          f"incl. apStar, FITS, truth), {size / 1e6:.0f} MB")
    print(f"stack S/N 5/50/95 %: {np.percentile(snr, [5, 50, 95]).round(1).tolist()}")
    print(f"speed: generator {synth_ms:.1f} ms per spectrum, target < {SYNTH_TARGET_MS:.0f}: "
          f"{'PASS' if synth_ms < SYNTH_TARGET_MS else 'FAIL'}")
    print(json.dumps({
        "bench": "release_generate", "sources": args.sources, "visits": summary.visits,
        "seconds": round(seconds, 3), "spectra_per_second": round(summary.visits / seconds, 2),
        "ms_per_visit": round(seconds / summary.visits * 1e3, 2),
        "synth_ms_per_spectrum": round(synth_ms, 2), "synth_training_ms_per_spectrum": round(train_ms, 2),
        "megabytes": round(size / 1e6, 1),
        "speed_target": {"synth_ms_per_spectrum_max": SYNTH_TARGET_MS, "pass": synth_ms < SYNTH_TARGET_MS},
    }))


if __name__ == "__main__":
    main()
