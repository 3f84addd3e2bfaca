"""Training-time augmentation: fresh noise, throughput, extinction, masked runs and persistence
drawn for every epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from astra_dagster.methods.apogeenet.preprocess import CHIP_PIXELS, CROP


@dataclass(frozen=True)
class Augmentation:
    """What each training epoch does to the (noiseless) training flux.

    ``snr``: S/N range drawn log-uniformly per spectrum (None: add no noise, use the flux as
    given). Noise is Poisson-like: σ = (level/snr)·√(flux/level + ``noise_floor``).
    ``chip_scatter``, ``slope``, ``curvature``: per-chip throughput exp(N(0, s))·(1 + a x + b x²),
    x ∈ [-1, 1] across the chip. ``extinction``: mean A_H (exponential) with a λ^-2 law.
    ``mask_fraction``: range of the fraction of pixels masked per spectrum, in runs of about
    ``mask_run`` pixels (sky-line masks cover 0-30 % of a faint star in runs of 6-40 pixels,
    bad detector pixels less); ``stretch_rate``: chance of a 700-pixel masked stretch;
    ``persistence_rate``: chance of an additive ramp (2-8 % of the median) on the red end of the
    blue chip, as APOGEE-N persistence does.
    """

    snr: tuple[float, float] | None = (8.0, 400.0)
    noise_floor: float = 0.01
    chip_scatter: float = 0.12
    slope: float = 0.05
    curvature: float = 0.04
    extinction: float = 0.15
    mask_fraction: tuple[float, float] = (0.0, 0.3)
    mask_run: float = 10.0
    stretch_rate: float = 0.05
    persistence_rate: float = 0.2

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def augment(flux: np.ndarray, good: np.ndarray, rng: np.random.Generator, aug: Augmentation,
            wavelength: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One random realisation (flux, good, σ) of apStar-like observations of the given rows
    (σ is None when ``aug.snr`` is None)."""
    from astra_dagster.spectra.spectrum import apstar_wavelength

    wave = apstar_wavelength() if wavelength is None else wavelength
    n, npix = flux.shape
    f = flux.astype(np.float32, copy=True)
    g = good.copy()
    trans = np.ones((n, npix), dtype=np.float32)
    for a, b in CHIP_PIXELS:
        x = np.linspace(-1.0, 1.0, b - a + 1, dtype=np.float32)
        scale = np.exp(rng.normal(0.0, aug.chip_scatter, n)).astype(np.float32)
        s1 = rng.normal(0.0, aug.slope, n).astype(np.float32)
        s2 = rng.normal(0.0, aug.curvature, n).astype(np.float32)
        trans[:, a: b + 1] = scale[:, None] * (1.0 + s1[:, None] * x + s2[:, None] * x * x)
    if aug.extinction > 0:
        a_h = rng.exponential(aug.extinction, n).astype(np.float32)
        law = ((wave / 16500.0) ** -2.0).astype(np.float32)
        trans *= 10.0 ** (-0.4 * a_h[:, None] * law[None, :])
    f *= trans
    with np.errstate(invalid="ignore"):
        level = np.nanmedian(np.where(g, f, np.nan), axis=1)
    level = np.where(np.isfinite(level) & (level > 0), level, 1.0).astype(np.float32)
    if aug.persistence_rate > 0:
        a, b = CHIP_PIXELS[0]
        for i in np.flatnonzero(rng.random(n) < aug.persistence_rate):
            length = int(rng.integers(700, 1400))
            amp = float(rng.uniform(0.02, 0.08)) * level[i]
            f[i, b + 1 - length: b + 1] += amp * np.linspace(0.3, 1.0, length, dtype=np.float32)
    sigma = None
    if aug.snr is not None:
        lo, hi = aug.snr
        snr = np.exp(rng.uniform(math.log(lo), math.log(hi), n)).astype(np.float32)
        with np.errstate(invalid="ignore"):
            sigma = (level / snr)[:, None] * np.sqrt(np.clip(f / level[:, None], 0.0, None) + aug.noise_floor)
        f += sigma * rng.standard_normal((n, npix), dtype=np.float32)
    if aug.mask_fraction[1] > 0:
        # Runs of masked pixels, all spectra at once: +1 at each start, -1 after each end.
        frac = rng.uniform(aug.mask_fraction[0], aug.mask_fraction[1], n)
        n_runs = rng.poisson(frac * npix / aug.mask_run)
        rows = np.repeat(np.arange(n), n_runs)
        starts = rng.integers(0, npix, rows.size)
        ends = np.minimum(starts + np.maximum(rng.exponential(aug.mask_run, rows.size), 1).astype(np.intp), npix)
        edges = np.zeros((n, npix + 1), dtype=np.int32)
        np.add.at(edges, (rows, starts), 1)
        np.add.at(edges, (rows, ends), -1)
        g &= np.cumsum(edges[:, :npix], axis=1) == 0
    if aug.stretch_rate > 0:
        for i in np.flatnonzero(rng.random(n) < aug.stretch_rate):
            s = int(rng.integers(CROP[0], CROP[1] - 700))
            g[i, s: s + 700] = False
    return f, g, sigma
