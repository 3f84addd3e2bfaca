"""χ²-based FFT cross-correlation against the templates' coarse grid (steps 2 and 4 of
:mod:`astra_dagster.methods.doppler`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as sp_fft

from astra_dagster.methods.doppler.emulator import Emulator
from astra_dagster.methods.doppler.prepare import _Prepared
from astra_dagster.spectra.spectrum import C_KMS

#: The CCF runs on a grid three template pixels wide (the apStar step, 4.14 km/s).
_CCF_STRIDE = 3


@dataclass
class _CCFResult:
    chi2: float
    vrel: float
    emulator: Emulator
    labels: np.ndarray
    edge: bool
    significance: float
    sigma_v: float  # velocity error from the χ² curvature at the peak (km/s)


def _coarse_templates(emulator: Emulator, n_fft: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coarse label points, and rfft of their line depth and depth² on the CCF grid (cached)."""
    key = ("ccf", n_fft)
    cached = emulator._coarse_cache.get(key)
    if cached is None:
        labels = emulator.coarse_labels()
        depth = 1.0 - emulator.flux(labels)[:, ::_CCF_STRIDE]
        cached = (labels, sp_fft.rfft(depth, n_fft, axis=1), sp_fft.rfft(depth**2, n_fft, axis=1))
        emulator._coarse_cache[key] = cached
    return cached


def _resample_for_ccf(prep: _Prepared, emulator: Emulator) -> tuple[int, np.ndarray, np.ndarray]:
    """Observed depth and weight on the emulator's coarse grid; returns (first index, d, w)."""
    h = emulator.ln_step * _CCF_STRIDE
    x0 = emulator.ln_start
    ln = prep.ln_all
    use = prep.ivar_all > 0
    lo = ln[use][0]
    hi = ln[use][-1]
    j0 = math.ceil((lo - x0) / h)
    j1 = math.floor((hi - x0) / h)
    xc = x0 + h * np.arange(j0, j1 + 1)
    gi = use.astype(float)
    g = np.interp(xc, ln, gi)
    d = np.interp(xc, ln, (1.0 - prep.flux_all) * gi)
    w = np.interp(xc, ln, prep.ivar_all)
    # Coarse points between pixels across a detector gap get no weight.
    step = np.diff(ln)
    pos = np.clip(np.searchsorted(ln, xc), 1, ln.size - 1)
    gap = step[pos - 1] > 3.0 * np.median(step)
    ok = (g > 0.999) & ~gap
    w = np.where(ok, w, 0.0)
    # Cap weights so a handful of pixels with tiny errors cannot dominate the correlation.
    if np.any(ok):
        w = np.minimum(w, 5.0 * np.median(w[ok]))
    d = np.where(ok, d, 0.0)
    return j0, d, w


def _ccf_peak(row: np.ndarray, lags: np.ndarray, l_max: int, h: float, c0: float,
              emulator: Emulator, labels: np.ndarray) -> _CCFResult:
    """The minimum of one template's χ²(lag), refined with a parabola."""
    i_best = int(np.argmin(row))
    lag = float(lags[i_best])
    edge = i_best <= 1 or i_best >= row.size - 2 or abs(lags[i_best]) >= l_max - 1
    sigma_lag = math.inf
    if 0 < i_best < row.size - 1:
        y0, y1, y2 = row[i_best - 1], row[i_best], row[i_best + 1]
        denom = y0 - 2 * y1 + y2
        if denom > 0:
            lag = lag - 0.5 * (y2 - y0) / denom
            sigma_lag = math.sqrt(2.0 / denom)
    # Significance: √Δχ² of the best scaled template against a constant, the S/N of the
    # correlation peak (pure noise gives ~4 as the maximum over all lags and templates).
    significance = float(math.sqrt(max(c0 - row[i_best], 0.0)))
    return _CCFResult(float(row[i_best]), C_KMS * math.expm1(lag * h), emulator, labels.copy(),
                      bool(edge), significance, sigma_lag * h * C_KMS)


def _ccf(prep: _Prepared, emulators: list[Emulator], vrange: float,
         only: tuple[Emulator, np.ndarray] | None = None, vsini: float = 0.0) -> list[_CCFResult]:
    """The best velocity of every coarse template by χ² of a scaled template within ±vrange.

    χ²(L) = Σw (d − β)² − max(0, cov(d, t_L))² / var(t_L) for line depth d = 1 − f (a scaled
    template plus a constant), for every lag L at once with three FFT correlations per template;
    each minimum is refined with a parabola. Returns one result per template, lowest χ² first.
    ``only``: one emulator at the given labels instead of the coarse grid, rotationally
    broadened by ``vsini`` km/s (0: not).
    """
    results: list[_CCFResult] = []
    for emulator in emulators if only is None else [only[0]]:
        h = emulator.ln_step * _CCF_STRIDE
        n_t = math.ceil(emulator.n_pixels / _CCF_STRIDE)
        # The valid lags keep every product inside the template, so no circular wrap-around
        # reaches them with an FFT length of just the template length.
        n_fft = sp_fft.next_fast_len(n_t)
        j0, d, w = _resample_for_ccf(prep, emulator)
        m = d.size
        fa = sp_fft.rfft(w * d, n_fft)
        fw = sp_fft.rfft(w, n_fft)
        s0 = max(float(np.sum(w)), 1e-300)
        s_d = float(np.sum(w * d))
        # χ² after removing the best constant: the normalisation's offset must not count as
        # signal.
        c0 = float(np.sum(w * d * d)) - s_d * s_d / s0
        l_max = math.ceil(math.log1p(vrange / C_KMS) / h)
        if only is None:
            labels, fdepth, fdepth2 = _coarse_templates(emulator, n_fft)
        else:
            labels = np.atleast_2d(only[1])
            flux = emulator.flux(labels)
            if vsini > 0:
                kernel = emulator.rotation_kernel(vsini)
                flux = np.array([1.0 + np.convolve(f - 1.0, kernel, mode="same") for f in flux])
            depth = 1.0 - flux[:, ::_CCF_STRIDE]
            fdepth, fdepth2 = sp_fft.rfft(depth, n_fft, axis=1), sp_fft.rfft(depth**2, n_fft, axis=1)
        # out[k] = Σ_n t[n + k] a[n]; template index n + k = j - L with j = n + j0, so L = j0 - k.
        a_corr = sp_fft.irfft(fdepth * np.conj(fa), n_fft, axis=1)
        b_corr = sp_fft.irfft(fdepth2 * np.conj(fw), n_fft, axis=1)
        t_corr = sp_fft.irfft(fdepth * np.conj(fw), n_fft, axis=1)
        lags = np.arange(-l_max, l_max + 1)
        k = j0 - lags
        valid = (k >= 0) & (k <= n_t - m)
        lags, k = lags[valid], k[valid]
        # Model d ≈ α t_L + β at every lag: covariance and variance about the weighted means.
        s_t = t_corr[:, k]
        a = a_corr[:, k] - s_d * s_t / s0
        b = np.maximum(b_corr[:, k] - s_t * s_t / s0, 1e-300)
        chi2 = c0 - np.where(a > 0, a * a / b, 0.0)
        for t_index, row in enumerate(chi2):
            results.append(_ccf_peak(row, lags, l_max, h, c0, emulator, labels[t_index]))
    return sorted(results, key=lambda r: r.chi2)
