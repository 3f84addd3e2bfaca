"""A spectrum made ready for fitting (step 1 of :mod:`astra_dagster.methods.doppler`): bad and
outlying pixels masked, each chip normalised by a pseudo-continuum, the continuum basis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import median_filter

from astra_dagster.methods.doppler.emulator import Emulator
from astra_dagster.methods.doppler.flags import (
    APOGEE_CHIP_EDGES,
    CLIP_SIGMA,
    CONTINUUM_ORDER,
    MIN_CHIP_PIXELS,
    MIN_GOOD_PIXELS,
    DopplerError,
    DopplerFlag,
    UnsupportedSpectrumError,
)
from astra_dagster.spectra.bitmask import DOPPLER_BAD_PIXELS
from astra_dagster.spectra.spectrum import C_KMS, Spectrum

# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------

def as_emulators(templates: Emulator | Sequence[Emulator]) -> list[Emulator]:
    """Normalise the ``templates`` argument to a non-empty list of emulators."""
    if isinstance(templates, Emulator):
        return [templates]
    try:
        out = list(templates)
    except TypeError as exc:
        raise DopplerError(f"templates must be an Emulator or a list of them, got {type(templates)}") from exc
    if not out or not all(isinstance(e, Emulator) for e in out):
        raise DopplerError("templates must be a non-empty list of Emulator objects")
    return out


# ---------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------

@dataclass
class _Prepared:
    """A spectrum ready for fitting: good pixels only, continuum-normalised."""

    ln_wave: np.ndarray        # (n,) ln λ of good pixels
    flux: np.ndarray           # (n,) normalised flux
    ivar: np.ndarray           # (n,) normalised inverse variance
    chip: np.ndarray           # (n,) chip index 0..n_chips-1 (compacted)
    basis: np.ndarray          # (n, CONTINUUM_ORDER + 1) Legendre basis within each pixel's chip
    n_chips: int
    # All-pixel arrays (normalised, bad → weight 0) for resampling in the CCF.
    ln_all: np.ndarray
    flux_all: np.ndarray
    ivar_all: np.ndarray
    snr: float
    flags: int
    source: str
    frame: str
    message: str = ""


def _source_name(spectrum: Spectrum) -> str:
    meta = spectrum.meta
    path = meta.get("path") or meta.get("source_id") or "spectrum"
    index = meta.get("index")
    return f"{path}[{index}]" if index is not None else str(path)


def _chip_labels(spectrum: Spectrum) -> np.ndarray:
    """Chip index per pixel: from ``meta['chip_slices']`` or the APOGEE detector gaps."""
    n = spectrum.n_pixels
    slices = spectrum.meta.get("chip_slices")
    if slices:
        chip = np.full(n, -1, dtype=np.int64)
        for k, sl in enumerate(slices):
            sl = slice(*sl) if isinstance(sl, (tuple, list)) else sl
            chip[sl] = k
        return chip
    return np.searchsorted(np.asarray(APOGEE_CHIP_EDGES), spectrum.wavelength).astype(np.int64)


def _normalise_chip(ln_w: np.ndarray, flux: np.ndarray, ivar: np.ndarray) -> np.ndarray | None:
    """Pseudo-continuum of one chip: cubic through the 90th flux percentile in ~15 bins."""
    n = ln_w.size
    n_bins = int(np.clip(n // 150, 4, 16))
    per_bin = n // n_bins
    if per_bin < 10:
        return None
    # Equal-count bins (the last few pixels join no bin): one vectorised percentile call.
    xs_arr = ln_w[: n_bins * per_bin].reshape(n_bins, per_bin).mean(axis=1)
    ys_arr = np.percentile(flux[: n_bins * per_bin].reshape(n_bins, per_bin), 90, axis=1)
    xs = xs_arr
    x0, x1 = ln_w[0], ln_w[-1]
    scale = lambda x: 2 * (x - x0) / (x1 - x0 + 1e-30) - 1  # noqa: E731
    order = min(3, len(xs) - 1)
    coef = np.polynomial.legendre.legfit(scale(xs_arr), ys_arr, order)
    cont = np.polynomial.legendre.legval(scale(ln_w), coef)
    if not np.all(cont > 0):
        return None
    return cont


def _prepare(spectrum: Spectrum, emulators: list[Emulator], vrange: float) -> _Prepared:
    if not isinstance(spectrum, Spectrum):
        raise DopplerError(f"expected a Spectrum, got {type(spectrum).__name__}")
    source = _source_name(spectrum)
    wave = spectrum.wavelength
    if wave.size == 0:
        raise DopplerError(f"{source}: empty spectrum")
    if not np.all(np.isfinite(wave)) or np.any(wave <= 0):
        raise DopplerError(f"{source}: non-finite or non-positive wavelengths")
    if np.any(np.diff(wave) <= 0):
        raise DopplerError(f"{source}: wavelengths must increase strictly")
    frame = str(spectrum.meta.get("frame", "observed"))

    # Usable wavelengths: every emulator must cover the pixel after any shift within vrange.
    shift = math.log1p(vrange / C_KMS) + 8 * max(e.ln_step for e in emulators)
    lo = max(e.ln_start for e in emulators) + shift
    hi = min(e.ln_start + e.ln_step * (e.n_pixels - 1) for e in emulators) - shift
    ln_all = np.log(wave)
    covered = (ln_all > lo) & (ln_all < hi)
    if not np.any(covered):
        raise UnsupportedSpectrumError(
            source, f"wavelengths {wave[0]:.1f}-{wave[-1]:.1f} Å are outside the templates' "
            f"range {math.exp(lo):.1f}-{math.exp(hi):.1f} Å (for ±{vrange:g} km/s)"
        )

    flags = 0
    flux = spectrum.flux.copy()
    ivar = spectrum.ivar.copy()
    finite = np.isfinite(flux) & np.isfinite(ivar)
    # NaN where ivar is already 0 is a declared gap (apStar chip gaps), not bad input.
    if np.any(~finite[covered] & (ivar[covered] != 0)):
        flags |= DopplerFlag.NONFINITE_INPUT
    flux[~finite] = 0.0
    ivar[~finite] = 0.0
    good = covered & finite & (ivar > 0) & ((spectrum.pixel_flags & DOPPLER_BAD_PIXELS) == 0)

    chip = _chip_labels(spectrum)
    flux_n = np.zeros_like(flux)
    ivar_n = np.zeros_like(ivar)
    chips_used = []
    for k in np.unique(chip[covered & (chip >= 0)]):
        in_chip = covered & (chip == k)
        sel = good & in_chip
        if sel.sum() < MIN_CHIP_PIXELS or np.median(flux[sel]) <= 0:
            good &= ~in_chip
            flags |= DopplerFlag.CHIP_MASKED
            continue
        idx = np.flatnonzero(sel)
        cont = _normalise_chip(ln_all[idx], flux[idx], ivar[idx])
        if cont is None:
            good &= ~in_chip
            flags |= DopplerFlag.CHIP_MASKED
            continue
        fn = flux[idx] / cont
        iv = ivar[idx] * cont**2
        # A few pixels with absurdly small errors must not outweigh the rest of the chip.
        iv = np.minimum(iv, 10.0 * np.median(iv))
        # Large positive outliers (sky residuals, cosmic rays) against a running median.
        smooth = median_filter(fn, size=15, mode="nearest")
        spike = (fn - smooth) * np.sqrt(iv) > CLIP_SIGMA
        spike |= fn > smooth + 0.5
        good[idx[spike]] = False
        flux_n[idx] = fn
        ivar_n[idx] = np.where(spike, 0.0, iv)
        chips_used.append(k)
    # Chips the caller declared but that hold no usable pixel at all.
    declared = spectrum.meta.get("chip_slices")
    if declared and len(chips_used) < len(declared):
        flags |= DopplerFlag.CHIP_MASKED

    n_good = int(good.sum())
    snr = spectrum.snr
    if snr is None or not np.isfinite(snr):
        snr = float(np.median(flux_n[good] * np.sqrt(ivar_n[good]))) if n_good else math.nan
    message = ""
    if n_good < MIN_GOOD_PIXELS:
        flags |= DopplerFlag.LOW_GOOD_PIXELS
        message = f"{source}: only {n_good} usable pixels (need {MIN_GOOD_PIXELS})"

    idx = np.flatnonzero(good)
    chip_g = chip[idx]
    chip_c = np.searchsorted(np.asarray(chips_used, dtype=np.int64), chip_g)
    n_chips = len(chips_used)
    basis = _continuum_basis(ln_all[idx], chip_c, n_chips)
    ivar_all = np.where(good, ivar_n, 0.0)
    return _Prepared(
        ln_wave=ln_all[idx], flux=flux_n[idx], ivar=ivar_n[idx], chip=chip_c, basis=basis,
        n_chips=n_chips, ln_all=ln_all, flux_all=np.where(good, flux_n, 1.0), ivar_all=ivar_all,
        snr=float(snr), flags=int(flags), source=source, frame=frame, message=message,
    )


def _continuum_basis(ln_w: np.ndarray, chip: np.ndarray, n_chips: int) -> np.ndarray:
    """Legendre polynomials (n, CONTINUUM_ORDER + 1) in ln λ scaled to [-1, 1] within each chip."""
    basis = np.zeros((ln_w.size, CONTINUUM_ORDER + 1))
    for k in range(n_chips):
        sel = chip == k
        x = ln_w[sel]
        if x.size == 0:
            continue
        t = 2 * (x - x.min()) / max(x.max() - x.min(), 1e-12) - 1
        basis[sel] = np.polynomial.legendre.legvander(t, CONTINUUM_ORDER)
    return basis
