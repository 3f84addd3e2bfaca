"""A small analytic line-list model for network-free tests of the Doppler method.

Flux is ``1 - Σ_j depth_j(labels) G_j(λ)`` with Gaussian lines whose depths are cubic
polynomials in the labels, so a cubic Cannon represents it exactly: fits of spectra made with
:func:`toy_flux` test the RV/label machinery (and its error calibration) without model error.
Test spectra are evaluated analytically at shifted wavelengths, not interpolated from the
emulator grid.
"""

from __future__ import annotations

import functools

import numpy as np

from astra_dagster.methods.doppler import (
    TEMPLATE_LOG10_STEP,
    Emulator,
    template_log10_grid,
    train_cannon,
)
from astra_dagster.spectra.spectrum import C_KMS, Spectrum

TOY_RANGES = np.array([[3500.0, 6500.0], [0.0, 5.0], [-2.0, 0.5]])
#: Line width (km/s): APOGEE's LSF (σ = 5.66 km/s) combined with ~3 km/s intrinsic width.
LINE_SIGMA_KMS = 6.4
#: APOGEE-like visit chips (Å, vacuum, observed frame) and pixels per chip.
CHIPS = ((15142.0, 15810.0), (15857.0, 16435.0), (16473.0, 16955.0))
CHIP_PIXELS = 3000


@functools.lru_cache(maxsize=1)
def _lines() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12345)
    n = 450
    centre = np.sort(rng.uniform(14990.0, 17110.0, n))
    base = rng.uniform(0.03, 0.35, n)
    # Per-line sensitivities to Teff (cool lines deepen), logg and [Fe/H], plus a curvature.
    coef = np.column_stack([
        rng.normal(-0.25, 0.12, n), rng.normal(0.0, 0.2, n), rng.uniform(0.15, 0.35, n),
        rng.normal(0.0, 0.04, n),
    ])
    return centre, base, coef


def toy_depths(labels: np.ndarray) -> np.ndarray:
    """Line depths (n_lines,) for one label triple: a cubic polynomial in the labels."""
    _, base, coef = _lines()
    x = (labels[0] - 5000.0) / 1000.0
    y = (labels[1] - 2.5) / 2.5
    z = labels[2]
    poly = 1.0 + coef[:, 0] * x + coef[:, 1] * y + coef[:, 2] * z + coef[:, 3] * x**3
    return np.clip(base * poly, 0.0, None)


def toy_flux(wavelength: np.ndarray, labels: np.ndarray, v: float = 0.0) -> np.ndarray:
    """Normalised flux at observed vacuum wavelengths for a star moving at ``v`` km/s."""
    centre, _, _ = _lines()
    depth = toy_depths(np.asarray(labels, dtype=float))
    rest = np.asarray(wavelength) / (1.0 + v / C_KMS)
    sigma = centre * LINE_SIGMA_KMS / C_KMS
    flux = np.ones_like(rest)
    lo = np.searchsorted(rest, centre - 6 * sigma)
    hi = np.searchsorted(rest, centre + 6 * sigma)
    for j in range(centre.size):
        seg = slice(lo[j], hi[j])
        flux[seg] -= depth[j] * np.exp(-0.5 * ((rest[seg] - centre[j]) / sigma[j]) ** 2)
    return flux


@functools.lru_cache(maxsize=1)
def toy_emulator() -> Emulator:
    """A cubic Cannon trained on 120 noise-free toy spectra on the standard template grid."""
    start, n = template_log10_grid()
    wave = 10 ** (start + TEMPLATE_LOG10_STEP * np.arange(n))
    rng = np.random.default_rng(7)
    labels = np.column_stack([rng.uniform(*TOY_RANGES[i], 120) for i in range(3)])
    flux = np.array([toy_flux(wave, lab) for lab in labels])
    return train_cannon(flux, labels, name="toy", log10_start=start, log10_step=TEMPLATE_LOG10_STEP,
                        ranges=TOY_RANGES, meta={"source": "toy"})


def visit_wavelength() -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Three APOGEE-like chips with slightly non-uniform sampling, ascending."""
    waves, slices, n0 = [], [], 0
    for a, b in CHIPS:
        u = np.linspace(0.0, 1.0, CHIP_PIXELS)
        waves.append(a + (b - a) * (u + 0.03 * u * (1 - u)))
        slices.append((n0, n0 + CHIP_PIXELS))
        n0 += CHIP_PIXELS
    return np.concatenate(waves), slices


def toy_visit(labels: np.ndarray, vrel: float, snr: float, rng: np.random.Generator, *,
              bc: float | None = 0.0, continuum_seed: int = 0) -> Spectrum:
    """A noisy observed-frame visit: toy flux × smooth per-chip continuum + Gaussian noise."""
    wave, slices = visit_wavelength()
    flux = toy_flux(wave, labels, vrel)
    cont = np.empty_like(wave)
    crng = np.random.default_rng(continuum_seed)
    for a, b in slices:
        t = np.linspace(-1, 1, b - a)
        cont[a:b] = 900.0 * (1 + crng.uniform(-0.1, 0.1)) * (1 + crng.uniform(-0.08, 0.08) * t
                                                             + crng.uniform(-0.04, 0.04) * t * t)
    sigma = cont / snr
    obs = flux * cont + rng.normal(0.0, 1.0, wave.size) * sigma
    meta = {"frame": "observed", "kind": "visit", "snr": snr, "chip_slices": slices,
            "path": "toy", "index": 0, "telescope": "apo25m"}
    if bc is not None:
        meta["bc"] = bc
    return Spectrum(wave, obs, 1.0 / sigma**2, np.zeros(wave.size, dtype=np.int64), meta)
