"""Pre-processing of apStar flux for the network (APOGEENet III): usable pixels, median
normalisation, clipped log flux, 4x binning, and the σ of the binned input.
"""

from __future__ import annotations

import numpy as np

from astra_dagster.methods.apogeenet.flags import ApogeeNetError
from astra_dagster.spectra.bitmask import BAD_PIXELS, flag
from astra_dagster.spectra.spectrum import APSTAR_NPIX

#: apStar pixels fed to the network (the three chips cover 201-8377); 8192 = 2048 bins of 4.
CROP = (200, 8392)
#: apStar pixel ranges (inclusive) the detectors cover; the usable fraction is counted there.
CHIP_PIXELS = ((201, 3319), (3537, 6125), (6295, 8377))
#: Lowest flux relative to the median that the log sees. APOGEENet clips at 1e-6 in absolute
#: units; relative to the median that would turn every noisy near-zero pixel into a -14 outlier.
LOG_FLOOR = 0.01
#: Pixels whose inverse variance is this far below the spectrum's median count as bad (apStar
#: inflates σ of bad pixels by 1e10 instead of flagging every one of them).
IVAR_RATIO_BAD = 1e-6
#: Pixel bits that mask a pixel: the never-use bits plus significant sky lines, whose
#: subtraction residuals in faint stars are deep, narrow, unmodelled dips (Doppler masks them too).
MASK_BITS = BAD_PIXELS | flag("SIG_SKYLINE")
#: In the noisy copies, σ is capped at this multiple of the median σ (as APOGEENet does).
SIGMA_CAP = 5.0

_CHIP_INDEX = np.concatenate([np.arange(a, b + 1) for a, b in CHIP_PIXELS])

# ----------------------------------------------------------------------------- pre-processing


def _check_arrays(flux: np.ndarray, ivar: np.ndarray, pixel_flags: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    flux = np.asarray(flux, dtype=float)
    ivar = np.asarray(ivar, dtype=float)
    if flux.ndim == 1:
        flux = flux[None, :]
    if ivar.ndim == 1:
        ivar = ivar[None, :]
    if flux.ndim != 2 or flux.shape[1] != APSTAR_NPIX:
        raise ApogeeNetError(f"flux must have shape (n, {APSTAR_NPIX}) on the apStar grid, got {flux.shape}")
    if ivar.shape != flux.shape:
        raise ApogeeNetError(f"ivar has shape {ivar.shape}, flux has {flux.shape}")
    if pixel_flags is not None:
        pixel_flags = np.asarray(pixel_flags)
        if pixel_flags.ndim == 1:
            pixel_flags = pixel_flags[None, :]
        if pixel_flags.shape != flux.shape:
            raise ApogeeNetError(f"pixel_flags has shape {pixel_flags.shape}, flux has {flux.shape}")
        if not np.issubdtype(pixel_flags.dtype, np.integer):
            raise ApogeeNetError(f"pixel_flags must be integers (APOGEE_PIXMASK bits), got {pixel_flags.dtype}")
    return flux, ivar, pixel_flags


def usable_pixels(flux: np.ndarray, ivar: np.ndarray, pixel_flags: np.ndarray | None = None,
                  mask_bits: int = MASK_BITS) -> tuple[np.ndarray, np.ndarray]:
    """(good, non_finite): per pixel whether it can be used, per spectrum whether non-finite
    values appeared where data were expected (NaN flux with ivar > 0, any non-finite ivar,
    infinite flux, negative ivar). Chip gaps (NaN flux, ivar 0) are normal."""
    with np.errstate(invalid="ignore"):
        fin_f = np.isfinite(flux)
        fin_i = np.isfinite(ivar)
        odd = (~fin_f & fin_i & (ivar > 0)) | ~fin_i | np.isinf(flux) | (fin_i & (ivar < 0))
        good = fin_f & fin_i & (ivar > 0)
    if pixel_flags is not None:
        good &= (pixel_flags.astype(np.int64) & mask_bits) == 0
    # Inflated-σ pixels: ivar far below the spectrum's typical value.
    med = np.nan_to_num(_masked_median(ivar, good), nan=0.0)
    good &= ivar >= IVAR_RATIO_BAD * med[:, None]
    return good, odd.any(axis=1)


def _row_quantile(sorted_rows: np.ndarray, counts: np.ndarray, q: float) -> np.ndarray:
    """Quantile ``q`` of the first ``counts[i]`` values of each sorted row (linear interpolation);
    NaN for empty rows."""
    pos = np.maximum(counts - 1, 0) * q
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, np.maximum(counts - 1, 0))
    rows = np.arange(sorted_rows.shape[0])
    t = (pos - lo).astype(sorted_rows.dtype)
    out = sorted_rows[rows, lo] * (1 - t) + sorted_rows[rows, hi] * t
    return np.where(counts > 0, out, np.nan)


def _masked_median(values: np.ndarray, mask: np.ndarray, step: int = 2) -> np.ndarray:
    """Median of each row over its ``mask``ed entries, from every ``step``-th pixel (NaN for a
    row without any). One sort of all rows: np.nanmedian loops over rows in Python (measured
    ~4x slower here); the subsample changes the median by far less than the noise."""
    v = np.where(mask[:, ::step], values[:, ::step], np.nan)
    return _row_quantile(np.sort(v, axis=1), mask[:, ::step].sum(axis=1), 0.5)


def _fill_masked(x: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Replace masked entries of each row by linear interpolation between the nearest good ones
    (constant beyond the ends; 0 for rows without any good entry). Vectorised over rows."""
    npx = x.shape[1]
    idx = np.arange(npx, dtype=np.int32)
    prev = np.maximum.accumulate(np.where(good, idx, np.int32(-1)), axis=1)
    nxt = np.minimum.accumulate(np.where(good, idx, np.int32(npx))[:, ::-1], axis=1)[:, ::-1]
    xp = np.take_along_axis(x, np.clip(prev, 0, npx - 1), axis=1)
    xn = np.take_along_axis(x, np.clip(nxt, 0, npx - 1), axis=1)
    t = ((idx - prev) / np.maximum(nxt - prev, 1)).astype(x.dtype)
    out = xp + (xn - xp) * t
    out = np.where(prev < 0, xn, np.where(nxt >= npx, xp, out))
    out = np.where(good, x, out)
    return np.where(good.any(axis=1)[:, None], out, np.zeros((), dtype=x.dtype))


def preprocess(flux: np.ndarray, good: np.ndarray, bin_factor: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Network input (n, n_bins) float32 and the median flux level (n,) of apStar-grid rows.

    Over the :data:`CROP` pixels marked ``good``: divide by the median flux (the per-spectrum
    normalisation), take the log of that clipped below at :data:`LOG_FLOOR`, clip at the 95th
    percentile + 1 (APOGEENet III) and, symmetrically, at the 5th percentile − 1 (deep
    unflagged artefacts), average the good pixels of each ``bin_factor`` bin and fill bins
    without any by linear interpolation (the bad-pixel replacement). The quantiles come from
    every other pixel (half the sorting; the same numbers to well below the noise). Rows whose
    median is not positive come back as zeros with a non-positive (or NaN) level.
    """
    a, b = CROP
    f = np.asarray(flux[:, a:b], dtype=np.float32)
    g = good[:, a:b]
    fs = np.where(g, f, np.float32(np.nan))
    srt = np.sort(fs[:, ::2], axis=1)  # NaN sort last
    counts = g[:, ::2].sum(axis=1)
    level = _row_quantile(srt, counts, 0.5)
    ok = np.isfinite(level) & (level > 0)
    safe = np.where(ok, level, 1.0).astype(np.float32)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        p05, p95 = (np.log(np.maximum(np.where(ok, _row_quantile(srt, counts, q), 1.0)[:, None] / safe, LOG_FLOOR))
                    for q in (0.05, 0.95))
        x = np.log(np.maximum(fs / safe, np.float32(LOG_FLOOR)))
    x = np.clip(x, (p05 - 1.0).astype(np.float32), (p95 + 1.0).astype(np.float32))
    use = g & ok[:, None]
    n, npx = x.shape
    nb = npx // bin_factor
    sums = np.where(use, x, np.float32(0.0))[:, : nb * bin_factor].reshape(n, nb, bin_factor).sum(axis=2)
    cnt = use[:, : nb * bin_factor].reshape(n, nb, bin_factor).sum(axis=2)
    out = _fill_masked((sums / np.maximum(cnt, 1)).astype(np.float32), cnt > 0)
    return out, level


def input_sigma(flux: np.ndarray, ivar: np.ndarray, good: np.ndarray, level: np.ndarray,
                bin_factor: int = 4) -> np.ndarray:
    """Standard deviation (n, n_bins) float32 of the :func:`preprocess` output that the pixel
    noise σ = 1/√ivar causes, to first order: σ/f per pixel in the log, averaged over the good
    pixels of a bin (√Σσ²/count). σ is capped at :data:`SIGMA_CAP` times the spectrum's median σ
    (APOGEENet does so for its noisy copies: a few hugely uncertain pixels would otherwise
    dominate), f at :data:`LOG_FLOOR` times the level from below. Bins without good pixels,
    filled by interpolation, get 0."""
    a, b = CROP
    g = good[:, a:b] & (np.isfinite(level) & (level > 0))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sig = np.where(g, 1.0 / np.sqrt(np.where(g, ivar[:, a:b], 1.0)), np.nan)
        med = np.nanmedian(sig[:, ::2], axis=1)
        sig = np.minimum(sig, SIGMA_CAP * med[:, None])
        lev = np.where(np.isfinite(level) & (level > 0), level, 1.0)[:, None]
        rel = sig / np.maximum(np.where(g, flux[:, a:b], lev), LOG_FLOOR * lev)
    var = np.where(g, rel * rel, 0.0)
    n, npx = var.shape
    nb = npx // bin_factor
    sums = var[:, : nb * bin_factor].reshape(n, nb, bin_factor).sum(axis=2)
    cnt = g[:, : nb * bin_factor].reshape(n, nb, bin_factor).sum(axis=2)
    return (np.sqrt(sums) / np.maximum(cnt, 1)).astype(np.float32)
