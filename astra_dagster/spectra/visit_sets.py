"""Release-like synthetic APOGEE visits for Doppler tests and benches.

Stars from the generator's survey population (:func:`astra_dagster.spectra.synth.draw_labels`),
rendered with ``RELEASE_SETTINGS`` (fiber-dependent R, Gauss-Hermite LSF, pixel integration,
hidden labels scattering about their relations) on an apVisit-like observed-frame grid: three
chips of 4096 pixels with a non-uniform dispersion. Each visit has a random barycentric
correction and a systemic velocity, ``vrel = v_bary - bc``; the stellar continuum times a
random per-chip throughput; Poisson-like noise at the requested S/N; ~1.5 % flagged bad pixels
holding garbage. The fits use emulators trained on ``TRAINING_SETTINGS`` grids instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from astra_dagster.spectra import synth
from astra_dagster.spectra.bitmask import flag
from astra_dagster.spectra.spectrum import C_KMS, Spectrum

#: apVisit chip coverage (Å, vacuum, observed frame) as in the real DR16 files.
VISIT_CHIPS = ((15142.3, 15809.9), (15857.1, 16435.2), (16472.6, 16954.5))
VISIT_CHIP_PIXELS = 4096


@dataclass
class SyntheticVisit:
    spectrum: Spectrum
    labels: dict[str, float]
    kind: str
    vrel: float
    v_bary: float
    bc: float
    snr: float
    fiber: int


def visit_wavelength() -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Ascending observed-frame wavelengths of the three chips and their slices."""
    waves, slices, n0 = [], [], 0
    for a, b in VISIT_CHIPS:
        u = np.linspace(0.0, 1.0, VISIT_CHIP_PIXELS)
        # Dispersion varies by ~10 % across a chip, as in the real wavelength solutions.
        waves.append(a + (b - a) * (u + 0.05 * u * (1.0 - u)))
        slices.append((n0, n0 + VISIT_CHIP_PIXELS))
        n0 += VISIT_CHIP_PIXELS
    return np.concatenate(waves), slices


def make_visit(labels: dict[str, float], kind: str, v_bary: float, bc: float, snr: float,
               rng: np.random.Generator, *, fiber: int | None = None) -> SyntheticVisit:
    """One observed visit of a star (see the module docstring)."""
    wave, slices = visit_wavelength()
    fiber = int(rng.integers(1, 301)) if fiber is None else fiber
    vrel = v_bary - bc
    norm = synth.synthesize(labels, wave, synth.RELEASE_SETTINGS, rv_kms=vrel, fiber=fiber)
    cont = synth.continuum(labels, wave / (1.0 + vrel / C_KMS))
    for a, b in slices:
        t = np.linspace(-1.0, 1.0, b - a)
        cont[a:b] *= (1.0 + rng.uniform(-0.08, 0.08)) * (1.0 + rng.uniform(-0.06, 0.06) * t
                                                         + rng.uniform(-0.03, 0.03) * t * t)
    scale = 800.0
    flux = scale * cont * norm
    level = float(np.median(scale * cont))
    sigma = (level / snr) * np.sqrt(np.clip(flux / level, 0.05, None))
    obs = flux + rng.normal(0.0, 1.0, wave.size) * sigma
    mask = np.zeros(wave.size, dtype=np.int64)
    bad = rng.random(wave.size) < 0.015
    mask[bad] = flag("BADPIX")
    obs[bad] = rng.uniform(0.0, 3.0 * level, int(bad.sum()))
    meta = {"frame": "observed", "kind": "visit", "snr": snr, "bc": bc, "chip_slices": slices,
            "fiber": fiber, "telescope": "apo25m", "path": "synthetic", "index": 0}
    spectrum = Spectrum(wave, obs, 1.0 / sigma**2, mask, meta)
    return SyntheticVisit(spectrum, labels, kind, vrel, v_bary, bc, snr, fiber)


def synthetic_visits(n: int, seed: int, *, snr_range: tuple[float, float] = (20.0, 150.0),
                     population: str = "survey") -> list[SyntheticVisit]:
    """``n`` single visits of different stars, S/N log-uniform in ``snr_range``."""
    rng = np.random.default_rng(seed)
    labels, kinds = synth.draw_labels_with_kind(n, rng, population)
    out = []
    for i in range(n):
        lab = {k: float(labels[k][i]) for k in synth.ALL_LABELS}
        snr = float(np.exp(rng.uniform(*np.log(snr_range))))
        out.append(make_visit(lab, str(kinds[i]), float(rng.normal(0.0, 50.0)),
                              float(rng.uniform(-30.0, 30.0)), snr, rng))
    return out
