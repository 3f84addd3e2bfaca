"""APOGEENet: a small 1-D convolutional network that predicts Teff, logg and [Fe/H] from apStar flux.

Pure numpy, forward and backward passes written out (reference/methods.md §2.5, §6.7).

* **Input** is the raw apStar flux on the 8575-pixel rest-frame grid, physical continuum
  included (no continuum normalisation). Pre-processing follows APOGEENet III: bad pixels are
  masked, the flux is divided by its median (the per-spectrum normalisation), the log is taken
  of the flux clipped below (at :data:`LOG_FLOOR` of the median rather than 1e-6, see
  :func:`preprocess`), and values above the 95th percentile + 1 (and below the 5th − 1) are
  clipped (sky-line residuals, cosmic rays). The result is averaged 4× over the good pixels;
  bins without any are filled by linear interpolation.
* **Network**: blocks of [Conv1d ('same' padding) → ReLU → MaxPool 2], a dense ReLU layer and a
  linear output: standardised log10 Teff, logg, [Fe/H]. A convolution is k matrix products of
  shifted row slices of the zero-padded activations (:func:`_conv`); float32 throughout.
* **Training**: mean squared error on the standardised labels, Adam, mini-batches, cosine
  learning-rate decay, early stopping on a validation split (whole stars held out). Each epoch
  draws fresh noise (a random S/N per spectrum), a smooth random throughput per chip,
  extinction, masked pixel runs and occasional persistence, so a few thousand noiseless
  generator spectra (:func:`make_training_spectra`) go a long way.
* **Uncertainties**: the labels are the direct forward pass; ``n_draws`` (20) noisy copies of the
  input go through the network too, the noise drawn on the binned log-flux with the σ the pixel
  errors propagate to (:func:`input_sigma`; one pre-processing per spectrum, not per copy). Their
  standard deviation plus an error floor is the uncertainty; the floors (one set for cool, one
  for hot stars) are fitted on the validation split so that residual / uncertainty has unit
  robust spread there.
* **Flags** (:class:`ApogeeNetFlag`): predictions outside the trained label ranges; [Fe/H] of
  stars outside 3200-8000 K; non-finite input (masked); spectra with too few usable pixels or
  no positive flux level get no labels (None in the result rows).

Entry points for the Dagster wiring: :func:`train_model` (→ :class:`ApogeeNet`, with
:meth:`ApogeeNet.summary`, :meth:`~ApogeeNet.write`, :meth:`~ApogeeNet.read`) and
:func:`fit_spectra` (rows with the ``astra.apogeenet`` columns). The weights live in one small
``.npz`` that a Dagster asset produces; they are never committed.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import os
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astra_dagster.methods.modelfile import write_arrays
from astra_dagster.spectra.bitmask import BAD_PIXELS, flag
from astra_dagster.spectra.spectrum import APSTAR_NPIX, Spectrum

#: Version of the weight-file layout (checked by :meth:`ApogeeNet.read`).
FILE_FORMAT = "astra-apogeenet/1"

#: Labels the network predicts, in output order (Teff is learnt as log10 Teff).
LABELS: tuple[str, ...] = ("teff", "logg", "fe_h")

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

#: Default architecture: (kernel size, output channels) per conv block, then the dense width.
DEFAULT_BLOCKS: tuple[tuple[int, int], ...] = ((7, 8), (5, 16), (5, 16), (5, 32), (3, 32))
DEFAULT_HIDDEN = 128

#: Predicted Teff from which a star counts as hot for the error floors.
HOT_TEFF = 7000.0
#: Fewest validation stars a regime needs for its own error floor.
MIN_FLOOR_STARS = 15
#: Fewest training spectra :meth:`ApogeeNet.train` accepts (a validation split must remain).
MIN_TRAINING_SPECTRA = 20

_CHIP_INDEX = np.concatenate([np.arange(a, b + 1) for a, b in CHIP_PIXELS])


class ApogeeNetError(ValueError):
    """Inputs the network cannot take at all (wrong shapes, unusable training data, bad files)."""


class ApogeeNetFlag(enum.IntFlag):
    """Bits of :attr:`ApogeeNetResult.bitmask_flag`. ``FATAL`` bits leave the labels NaN."""

    TEFF_OUT_OF_RANGE = 1 << 0    # predicted Teff outside the trained range
    LOGG_OUT_OF_RANGE = 1 << 1    # predicted logg outside the trained range
    FE_H_OUT_OF_RANGE = 1 << 2    # predicted [Fe/H] outside the trained range
    NON_FINITE_INPUT = 1 << 3     # NaN/inf flux or ivar where data were expected (masked)
    MOSTLY_MASKED = 1 << 4        # fewer than min_good_fraction of the chip pixels usable: NaN
    NO_FLUX = 1 << 5              # no usable pixel at all, or median flux <= 0: NaN
    FE_H_UNRELIABLE = 1 << 6      # predicted Teff outside FE_H_RELIABLE_TEFF: [Fe/H] weakly constrained


FATAL_FLAGS = ApogeeNetFlag.MOSTLY_MASKED | ApogeeNetFlag.NO_FLUX
#: Predicted Teff range where [Fe/H] is trusted: above it metal lines are few and weak in
#: broad profiles, below it molecules blanket the spectrum (APOGEENet flags < 3200 K too).
FE_H_RELIABLE_TEFF = (3200.0, 8000.0)


def flag_names(flags: int) -> list[str]:
    """Names of the bits set in ``flags``."""
    return [f.name for f in ApogeeNetFlag if flags & f and f.name]


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


# ----------------------------------------------------------------------------- the network


def _pad_flat(h: np.ndarray, k: int) -> np.ndarray:
    """(B, L, C) → (B·(L+k−1), C): each row 'same'-padded with zeros, rows stacked contiguously.

    A convolution is then k matrix products of contiguous row slices of this array (shift j
    reads rows j … j+M−1), which is several times faster than copying an im2col window matrix
    whose innermost axis has only C floats (measured). Output rows that straddle two spectra
    are computed and thrown away ((k−1)/L extra work).
    """
    B, L, C = h.shape
    pad = k // 2
    xp = np.zeros((B, L + k - 1, C), dtype=h.dtype)
    xp[:, pad: pad + L, :] = h
    return xp.reshape(B * (L + k - 1), C)


def _conv(xf: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Rows of ``xf`` (from :func:`_pad_flat`) convolved with ``w`` (k·C, c), ordering j·C + c_in:
    (B·(L+k−1), c) with the last k−1 rows zero; the valid outputs of spectrum b are rows
    b·(L+k−1) … b·(L+k−1)+L−1."""
    n_rows, C = xf.shape
    m = n_rows - (k - 1)
    y = np.zeros((n_rows, w.shape[1]), dtype=xf.dtype)
    if C < 4:
        # one or two input channels: k products with a C-wide inner dimension are outer
        # products (slow); a (m, k·C) window matrix is cheap to build here
        cols = np.empty((m, k * C), dtype=xf.dtype)
        for j in range(k):
            cols[:, j * C: (j + 1) * C] = xf[j: j + m]
        y[:m] = cols @ w
        return y
    tmp = np.empty((m, w.shape[1]), dtype=xf.dtype)  # one buffer for the k products
    for j in range(k):
        np.matmul(xf[j: j + m], w[j * C: (j + 1) * C], out=tmp)
        y[:m] += tmp
    return y


class _Network:
    """Parameters and forward/backward passes of the conv stack + dense head."""

    def __init__(self, n_in: int, blocks: Sequence[tuple[int, int]], hidden: int, n_out: int,
                 rng: np.random.Generator | None = None) -> None:
        self.blocks = tuple((int(k), int(c)) for k, c in blocks)
        self.hidden = int(hidden)
        self.n_in = int(n_in)
        self.n_out = int(n_out)
        length = self.n_in
        for _ in self.blocks:
            if length % 2:
                raise ApogeeNetError(f"input length {self.n_in} is not divisible by 2^{len(self.blocks)}")
            length //= 2
        self.n_flat = length * self.blocks[-1][1]
        self.params: dict[str, np.ndarray] = {}
        if rng is not None:
            c_in = 1
            for i, (k, c) in enumerate(self.blocks):
                self.params[f"conv{i}_w"] = (rng.standard_normal((c_in * k, c)) * math.sqrt(2.0 / (c_in * k)))
                self.params[f"conv{i}_b"] = np.zeros(c)
                c_in = c
            self.params["dense_w"] = rng.standard_normal((self.n_flat, self.hidden)) * math.sqrt(2.0 / self.n_flat)
            self.params["dense_b"] = np.zeros(self.hidden)
            self.params["out_w"] = rng.standard_normal((self.hidden, self.n_out)) * math.sqrt(1.0 / self.hidden)
            self.params["out_b"] = np.zeros(self.n_out)
            self.params = {k: v.astype(np.float32) for k, v in self.params.items()}

    def n_parameters(self) -> int:
        return int(sum(v.size for v in self.params.values()))

    def forward(self, x: np.ndarray, keep: bool = False) -> tuple[np.ndarray, list[Any]]:
        """Outputs (B, n_out) for inputs (B, n_in); with ``keep`` the activations for backward."""
        h = np.asarray(x)[:, :, None]
        cache: list[Any] = []
        for i, (k, c) in enumerate(self.blocks):
            B, L, _ = h.shape
            xf = _pad_flat(h, k)
            y = _conv(xf, self.params[f"conv{i}_w"], k).reshape(B, L + k - 1, c)
            # max-pool before bias + ReLU (both monotone, so the order does not matter): half the work
            even, odd = y[:, 0:L:2, :], y[:, 1:L:2, :]
            pooled = np.maximum(even, odd)
            pooled += self.params[f"conv{i}_b"]
            if keep:
                positive = pooled > 0
                pooled *= positive
                cache.append((xf, h.shape, positive, even >= odd))
            else:
                np.maximum(pooled, 0.0, out=pooled)
            h = pooled
        flat = h.reshape(h.shape[0], -1)
        a = flat @ self.params["dense_w"]
        a += self.params["dense_b"]
        np.maximum(a, 0.0, out=a)
        out = a @ self.params["out_w"] + self.params["out_b"]
        if keep:
            cache.append((flat, a, h.shape))
        return out, cache

    def backward(self, dout: np.ndarray, cache: list[Any], input_grad: bool = False) -> dict[str, np.ndarray]:
        """Gradients of the loss for ∂loss/∂out = ``dout`` (with ``input_grad`` also of the
        input, key ``"x"``)."""
        grads: dict[str, np.ndarray] = {}
        flat, a, hshape = cache[-1]
        grads["out_w"] = a.T @ dout
        grads["out_b"] = dout.sum(axis=0)
        da = dout @ self.params["out_w"].T
        da *= a > 0
        grads["dense_w"] = flat.T @ da
        grads["dense_b"] = da.sum(axis=0)
        dh = (da @ self.params["dense_w"].T).reshape(hshape)
        for i in range(len(self.blocks) - 1, -1, -1):
            k, c = self.blocks[i]
            xf, in_shape, positive, first = cache[i]
            B, L, C = in_shape
            dh = dh * positive
            grads[f"conv{i}_b"] = dh.sum(axis=(0, 1))
            # route the pooled gradient to the winning position; padding rows stay zero
            dy = np.zeros((B, L + k - 1, c), dtype=dh.dtype)
            dy[:, 0:L:2, :] = dh * first
            dy[:, 1:L:2, :] = dh * ~first
            dyf = dy.reshape(B * (L + k - 1), c)
            m = dyf.shape[0] - (k - 1)
            w = self.params[f"conv{i}_w"]
            gw = np.empty_like(w)
            for j in range(k):
                gw[j * C: (j + 1) * C] = xf[j: j + m].T @ dyf[:m]
            grads[f"conv{i}_w"] = gw
            if i == 0 and not input_grad:
                break
            dxf = np.zeros_like(xf)
            for j in range(k):
                dxf[j: j + m] += dyf[:m] @ w[j * C: (j + 1) * C].T
            pad = k // 2
            dh = dxf.reshape(B, L + k - 1, C)[:, pad: pad + L, :]
        if input_grad:
            grads["x"] = dh[:, :, 0]
        return grads

    def predict(self, x: np.ndarray, batch: int = 8) -> np.ndarray:
        """Forward pass in chunks (no activations kept)."""
        out = np.empty((x.shape[0], self.n_out), dtype=np.float32)
        for s in range(0, x.shape[0], batch):
            out[s: s + batch] = self.forward(x[s: s + batch])[0]
        return out


class _Adam:
    def __init__(self, params: dict[str, np.ndarray], lr: float, weight_decay: float = 0.0,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, beta1, beta2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        c1 = 1.0 - self.b1**self.t
        c2 = 1.0 - self.b2**self.t
        for k, g in grads.items():
            m, v = self.m[k], self.v[k]
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            update = (m / c1) / (np.sqrt(v / c2) + self.eps)
            if self.wd and k.endswith("_w"):  # decoupled weight decay (AdamW), weights only
                update = update + self.wd * params[k]
            params[k] -= (lr * update).astype(np.float32)


# ----------------------------------------------------------------------------- augmentation


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


# ----------------------------------------------------------------------------- results


@dataclass
class ApogeeNetResult:
    """Per-spectrum results (arrays of length n). NaN where nothing could be measured (see
    ``bitmask_flag``); ``snr`` is the median flux·√ivar over the usable pixels."""

    teff: np.ndarray
    u_teff: np.ndarray
    logg: np.ndarray
    u_logg: np.ndarray
    fe_h: np.ndarray
    u_fe_h: np.ndarray
    bitmask_flag: np.ndarray
    snr: np.ndarray
    #: Monte-Carlo standard deviations alone (before the error floor), in the same units.
    raw_u_teff: np.ndarray = field(default_factory=lambda: np.empty(0))
    raw_u_logg: np.ndarray = field(default_factory=lambda: np.empty(0))
    raw_u_fe_h: np.ndarray = field(default_factory=lambda: np.empty(0))

    def __len__(self) -> int:
        return int(self.teff.size)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per spectrum with the ``astra.apogeenet`` columns (None for NaN)."""
        out = []
        for i in range(len(self)):
            row: dict[str, Any] = {}
            for name in ("snr", "teff", "u_teff", "logg", "u_logg", "fe_h", "u_fe_h"):
                v = float(getattr(self, name)[i])
                row[name] = v if math.isfinite(v) else None
            row["bitmask_flag"] = int(self.bitmask_flag[i])
            row["flag_names"] = flag_names(row["bitmask_flag"])
            out.append(row)
        return out


# ----------------------------------------------------------------------------- the model


@dataclass
class TrainingReport:
    """What happened in :meth:`ApogeeNet.train`."""

    epochs_run: int = 0
    best_epoch: int = 0
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    #: Residual statistics of the direct pass on the augmented (noisy) validation split:
    #: label → {"rms", "robust_sigma", "bias"} (teff in K, plus "teff_frac" for ΔTeff/Teff).
    validation: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pull_floor(resid: np.ndarray, std: np.ndarray) -> float:
    """Smallest floor f ≥ 0 with robust spread (1.4826 × median |pull|) of resid / √(std² + f²)
    at most 1. Robust: the rms would let a few catastrophic failures set the floor of all stars."""
    ok = np.isfinite(resid) & np.isfinite(std)
    r, s = resid[ok], std[ok]
    if r.size < 2:
        return 0.0

    def spread(fl: float) -> float:
        return float(1.4826 * np.median(np.abs(r) / np.sqrt(s**2 + fl**2 + 1e-30)))

    if spread(0.0) <= 1.0:
        return 0.0
    lo, hi = 0.0, float(np.sqrt(np.mean(r**2))) * 3.0 + 1e-12
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if spread(mid) > 1.0 else (lo, mid)
    return hi


def _residual_stats(value: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    """rms, robust σ and bias of (n, 3) predictions in output units against the truth, per
    label in physical units (Teff in K; ``teff_frac`` is ΔTeff/Teff)."""
    from astra_dagster.methods.metrics import robust_sigma

    out: dict[str, dict[str, float]] = {}
    t_pred, t_true = 10.0 ** value[:, 0], 10.0 ** truth[:, 0]
    deltas = {"teff": t_pred - t_true, "teff_frac": (t_pred - t_true) / t_true,
              "logg": value[:, 1] - truth[:, 1], "fe_h": value[:, 2] - truth[:, 2]}
    for name, d in deltas.items():
        d = d[np.isfinite(d)]
        if d.size == 0:
            continue
        out[name] = {"rms": float(np.sqrt(np.mean(d**2))), "robust_sigma": robust_sigma(d),
                     "bias": float(np.mean(d))}
    return out


class ApogeeNet:
    """The network plus everything needed to use it (label scaling, trained ranges, error floor).

    ``blocks``: (kernel, channels) per conv block; ``hidden``: dense width; ``bin_factor``:
    apStar pixels averaged per input bin. Construct, then :meth:`train`, or :meth:`read` a file.
    """

    def __init__(self, blocks: Sequence[tuple[int, int]] = DEFAULT_BLOCKS, hidden: int = DEFAULT_HIDDEN,
                 bin_factor: int = 4, *, min_good_fraction: float = 0.5) -> None:
        if bin_factor < 1 or (CROP[1] - CROP[0]) % bin_factor:
            raise ApogeeNetError(f"bin_factor={bin_factor} must divide {CROP[1] - CROP[0]}")
        if not blocks or any(k < 1 or c < 1 for k, c in blocks):
            raise ApogeeNetError(f"blocks must be a non-empty list of (kernel, channels) >= 1, got {blocks}")
        if not 0.0 < min_good_fraction <= 1.0:
            raise ApogeeNetError(f"min_good_fraction={min_good_fraction} must be in (0, 1]")
        self.bin_factor = int(bin_factor)
        self.min_good_fraction = float(min_good_fraction)
        self.net = _Network((CROP[1] - CROP[0]) // self.bin_factor, blocks, hidden, len(LABELS))
        self.label_mean = np.zeros(len(LABELS))
        self.label_std = np.ones(len(LABELS))
        self.input_mean = np.zeros(self.net.n_in, dtype=np.float32)
        self.label_range: dict[str, tuple[float, float]] = {}
        #: Error floor per regime (cool, hot: predicted Teff vs :data:`HOT_TEFF`) and output
        #: (log10 Teff, logg, [Fe/H]), added in quadrature to the MC scatter.
        self.error_floor = np.zeros((2, len(LABELS)))
        self.report = TrainingReport()
        self.trained = False

    # -- training ---------------------------------------------------------------------------

    def _targets(self, labels: Mapping[str, Sequence[float]], n: int) -> np.ndarray:
        missing = [k for k in LABELS if k not in labels]
        if missing:
            raise ApogeeNetError(f"training labels lack {missing} (need {list(LABELS)})")
        cols = []
        for name in LABELS:
            v = np.asarray(labels[name], dtype=float)
            if v.shape != (n,):
                raise ApogeeNetError(f"training label {name!r} has shape {v.shape}, expected ({n},)")
            bad = np.flatnonzero(~np.isfinite(v) | ((v <= 0) if name == "teff" else False))
            if bad.size:
                raise ApogeeNetError(f"training label {name!r} is not finite/valid for spectra {bad[:10].tolist()}")
            cols.append(np.log10(v) if name == "teff" else v)
        return np.column_stack(cols)

    def train(
        self,
        flux: np.ndarray,
        ivar: np.ndarray,
        labels: Mapping[str, Sequence[float]],
        *,
        seed: int = 0,
        epochs: int = 30,
        batch_size: int = 64,
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-4,
        validation_fraction: float = 0.1,
        patience: int = 6,
        augmentation: Augmentation | None = Augmentation(),
        pixel_flags: np.ndarray | None = None,
        max_seconds: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> ApogeeNet:
        """Fit the network to (n, 8575) apStar-grid spectra with labels ``teff``, ``logg``,
        ``fe_h`` (arrays of n). Returns ``self``.

        ``augmentation`` draws fresh noise/throughput/masks every epoch (pass noiseless flux);
        ``None`` uses the flux as given. The learning rate decays by cosine over ``epochs``;
        training stops early when the validation loss has not improved for ``patience`` epochs
        (or after ``max_seconds``) and the best weights are kept. Then the error floor is fitted
        on the validation split.
        """
        t_start = time.perf_counter()
        flux, ivar, pixel_flags = _check_arrays(flux, ivar, pixel_flags)
        n = flux.shape[0]
        if epochs < 1 or batch_size < 1:
            raise ApogeeNetError(f"epochs={epochs} and batch_size={batch_size} must be >= 1")
        if not 0.0 < validation_fraction < 1.0:
            raise ApogeeNetError(f"validation_fraction={validation_fraction} must be in (0, 1)")
        if n < MIN_TRAINING_SPECTRA:
            raise ApogeeNetError(f"{n} training spectra are too few to train APOGEENet "
                                 f"(need at least {MIN_TRAINING_SPECTRA})")
        y_raw = self._targets(labels, n)
        flat_labels = [name for name, sd in zip(LABELS, y_raw.std(axis=0), strict=True) if not sd > 1e-6]
        if flat_labels:
            raise ApogeeNetError(f"training labels {flat_labels} do not vary across the {n} spectra: "
                                 "the network cannot learn them")
        good, _ = usable_pixels(flux, ivar, pixel_flags)
        frac = good[:, _CHIP_INDEX].mean(axis=1)
        unusable = np.flatnonzero(frac < self.min_good_fraction)
        if unusable.size:
            raise ApogeeNetError(f"training spectra {unusable[:10].tolist()} have fewer than "
                                 f"{self.min_good_fraction:.0%} usable chip pixels")
        n_val = max(1, round(validation_fraction * n))
        if n - n_val < 2:
            raise ApogeeNetError(f"{n} training spectra are too few (need at least {n_val + 2})")
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x616E6574]))
        self.net = _Network(self.net.n_in, self.net.blocks, self.net.hidden, len(LABELS), rng)
        order = rng.permutation(n)
        val_idx, tr_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        self.label_mean = y_raw[tr_idx].mean(axis=0)
        self.label_std = np.maximum(y_raw[tr_idx].std(axis=0), 1e-6)
        y = ((y_raw - self.label_mean) / self.label_std).astype(np.float32)
        trained = {k: np.asarray(labels[k], dtype=float)[tr_idx] for k in LABELS}
        self.label_range = {k: (float(v.min()), float(v.max())) for k, v in trained.items()}

        def inputs(idx: np.ndarray, r: np.random.Generator) -> np.ndarray:
            if augmentation is None:
                return self._inputs(flux[idx], good[idx])
            f, g, _ = augment(flux[idx], good[idx], r, augmentation)
            return self._inputs(f, g)

        # Inputs are centred on the mean pre-processed training spectrum (from a first augmented
        # pass). Not rescaled: log-flux is O(0.1), and scaling it up to unit variance made the
        # first layer's effective step size 10x larger and training worse (measured).
        self.input_mean = np.zeros(self.net.n_in, dtype=np.float32)
        x_first = inputs(tr_idx, rng)
        self.input_mean = x_first.mean(axis=0)
        x_first = x_first - self.input_mean
        val_rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x76616C]))
        x_val = inputs(val_idx, val_rng)
        y_val = y[val_idx]
        opt = _Adam(self.net.params, learning_rate, weight_decay)
        report = TrainingReport(n_train=tr_idx.size, n_val=val_idx.size)
        best = (math.inf, {k: v.copy() for k, v in self.net.params.items()}, 0)
        steps_per_epoch = math.ceil(tr_idx.size / batch_size)
        total_steps = epochs * steps_per_epoch
        step = 0
        for epoch in range(1, epochs + 1):
            x_tr = x_first if epoch == 1 else inputs(tr_idx, rng)
            perm = rng.permutation(tr_idx.size)
            losses = []
            for s in range(0, perm.size, batch_size):
                bi = perm[s: s + batch_size]
                out, cache = self.net.forward(x_tr[bi], keep=True)
                diff = out - y[tr_idx[bi]]
                losses.append(float(np.mean(diff**2)))
                grads = self.net.backward((2.0 / diff.size) * diff, cache)
                lr = learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
                opt.step(self.net.params, grads, lr)
                step += 1
            val = float(np.mean((self.net.predict(x_val) - y_val) ** 2))
            report.train_loss.append(float(np.mean(losses)))
            report.val_loss.append(val)
            report.epochs_run = epoch
            if val < best[0]:
                best = (val, {k: v.copy() for k, v in self.net.params.items()}, epoch)
            if log is not None:
                log(f"epoch {epoch}: train {report.train_loss[-1]:.4f} val {val:.4f} "
                    f"({time.perf_counter() - t_start:.0f} s)")
            if epoch - best[2] >= patience:
                break
            if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
                break
        self.net.params = best[1]
        report.best_epoch = best[2]
        self.trained = True
        self.report = report
        self._fit_error_floor(flux[val_idx], ivar[val_idx], good[val_idx], y_raw[val_idx], val_rng, augmentation)
        report.seconds = time.perf_counter() - t_start
        return self

    def _fit_error_floor(self, flux: np.ndarray, ivar: np.ndarray, good: np.ndarray, y_raw: np.ndarray,
                         rng: np.random.Generator, augmentation: Augmentation | None) -> None:
        """Error floors (rows: predicted Teff below / above :data:`HOT_TEFF`; columns: outputs)
        such that residual / √(σ_MC² + floor²) has unit robust spread on the validation split
        (observed as the augmentation would, noise included). Hot stars are a separate regime:
        their few weak lines leave them several times less precise than cool stars, and one
        floor for both would overstate the cool stars' errors. A regime with fewer than
        :data:`MIN_FLOOR_STARS` validation stars takes the floor of all stars together."""
        self.error_floor = np.zeros((2, len(LABELS)))
        f, g, iv = flux, good, np.where(good, ivar, 0.0)
        if augmentation is not None:
            f, g, sigma = augment(flux, good, rng, augmentation)
            if sigma is not None:
                iv = np.where(g, 1.0 / np.maximum(sigma, 1e-30) ** 2, 0.0)
        value, std = self._mc(f, iv, g, 10, rng)
        resid = value - y_raw
        self.report.validation = _residual_stats(value, y_raw)
        hot = value[:, 0] >= math.log10(HOT_TEFF)
        floor = np.zeros((2, len(LABELS)))
        for j in range(len(LABELS)):
            overall = _pull_floor(resid[:, j], std[:, j])
            for row, sel in enumerate((~hot, hot)):
                floor[row, j] = (_pull_floor(resid[sel, j], std[sel, j]) if sel.sum() >= MIN_FLOOR_STARS
                                 else overall)
        self.error_floor = floor

    # -- prediction -------------------------------------------------------------------------

    def _mc(self, flux: np.ndarray, ivar: np.ndarray, good: np.ndarray, n_draws: int,
            rng: np.random.Generator, chunk: int = 64, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Labels from the direct pass and their standard deviation over ``n_draws`` noisy copies
        of the input (NaN std for ``n_draws`` < 2), in output units (log10 Teff, logg, [Fe/H]).

        The value is the direct pass, not the mean of the copies: each copy carries the data's
        noise twice. The noise is drawn on the binned log-flux input with the per-bin σ that
        the pixel σ propagates to (:func:`input_sigma`), so the costly pre-processing (sorting
        for the median and the clip levels) runs once per spectrum, not once per copy.

        With ``seed``, each spectrum's noise comes from its own stream (``seed`` and a hash of its
        input), so its uncertainty does not depend on which other spectra share the call.
        """
        n = flux.shape[0]
        value = np.full((n, len(LABELS)), np.nan)
        std = np.full((n, len(LABELS)), np.nan)
        for s in range(0, n, chunk):
            f, iv, g = flux[s: s + chunk], ivar[s: s + chunk], good[s: s + chunk]
            m = f.shape[0]
            x, level = preprocess(f, g, self.bin_factor)
            x -= self.input_mean
            value[s: s + m] = self._destandardise(self.net.predict(x))
            if n_draws < 2:
                continue
            sx = input_sigma(f, iv, g, level, self.bin_factor)
            if seed is None:
                draws = rng.standard_normal((n_draws, m, x.shape[1]), dtype=np.float32)
            else:
                draws = np.stack([
                    np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(np.ascontiguousarray(row).tobytes())])
                    .standard_normal((n_draws, x.shape[1]), dtype=np.float32) for row in x], axis=1)
            noisy = x[None] + sx[None] * draws
            # small batches keep each layer's activations in cache: 256 rows were 1.6x slower
            out = self._destandardise(self.net.predict(noisy.reshape(n_draws * m, -1), batch=8))
            std[s: s + m] = out.reshape(n_draws, m, len(LABELS)).std(axis=0, ddof=1)
        return value, std

    def _inputs(self, flux: np.ndarray, good: np.ndarray) -> np.ndarray:
        """Pre-processed, standardised network inputs."""
        x, _ = preprocess(flux, good, self.bin_factor)
        return x - self.input_mean

    def _destandardise(self, out: np.ndarray) -> np.ndarray:
        return out.astype(float) * self.label_std + self.label_mean

    def predict(self, flux: np.ndarray, ivar: np.ndarray, pixel_flags: np.ndarray | None = None, *,
                n_draws: int = 20, seed: int = 0) -> ApogeeNetResult:
        """Labels for (n, 8575) apStar-grid rows (a single row may be 1-D).

        The labels come from the direct forward pass; ``n_draws`` noisy copies give the
        Monte-Carlo σ, to which the error floor is added in quadrature (``n_draws`` < 2: the
        floor alone, NaN raw σ). Per-spectrum problems
        never raise: they set :class:`ApogeeNetFlag` bits (and NaN labels for fatal ones).
        Raises :class:`ApogeeNetError` only for an untrained model or arrays of the wrong shape.
        """
        if not self.trained:
            raise ApogeeNetError("this ApogeeNet has not been trained (call train() or ApogeeNet.read())")
        if n_draws < 0:
            raise ApogeeNetError(f"n_draws={n_draws} must be >= 0")
        flux, ivar, pixel_flags = _check_arrays(flux, ivar, pixel_flags)
        n = flux.shape[0]
        flags = np.zeros(n, dtype=np.int64)
        good, odd = usable_pixels(flux, ivar, pixel_flags)
        flags[odd] |= ApogeeNetFlag.NON_FINITE_INPUT
        frac = good[:, _CHIP_INDEX].mean(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN is the answer
            level = _masked_median(flux, good)
            snr = _masked_median(flux * np.sqrt(np.where(good, ivar, 0.0)), good)
        flags[~(level > 0)] |= ApogeeNetFlag.NO_FLUX
        flags[(frac < self.min_good_fraction) & (frac > 0)] |= ApogeeNetFlag.MOSTLY_MASKED
        flags[frac == 0] |= ApogeeNetFlag.NO_FLUX
        run = (flags & FATAL_FLAGS) == 0
        mean = np.full((n, len(LABELS)), np.nan)
        std = np.full((n, len(LABELS)), np.nan)
        if run.any():
            rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x6D63]))
            mean[run], std[run] = self._mc(flux[run], np.where(good[run], ivar[run], 0.0), good[run], n_draws, rng,
                                           seed=int(seed))
        with np.errstate(invalid="ignore"):
            floor = self.error_floor[(mean[:, 0] >= math.log10(HOT_TEFF)).astype(np.intp)]
        total = np.sqrt(np.where(np.isfinite(std), std, 0.0) ** 2 + floor**2)
        total[~np.isfinite(mean)] = np.nan
        teff = 10.0 ** mean[:, 0]
        u_teff = teff * math.log(10.0) * total[:, 0]
        raw_u_teff = teff * math.log(10.0) * std[:, 0]
        values = {"teff": teff, "logg": mean[:, 1], "fe_h": mean[:, 2]}
        for bit, name in ((ApogeeNetFlag.TEFF_OUT_OF_RANGE, "teff"), (ApogeeNetFlag.LOGG_OUT_OF_RANGE, "logg"),
                          (ApogeeNetFlag.FE_H_OUT_OF_RANGE, "fe_h")):
            lo, hi = self.label_range.get(name, (-math.inf, math.inf))
            v = values[name]
            flags[np.isfinite(v) & ((v < lo) | (v > hi))] |= bit
        lo_t, hi_t = FE_H_RELIABLE_TEFF
        flags[np.isfinite(teff) & ((teff > hi_t) | (teff < lo_t))] |= ApogeeNetFlag.FE_H_UNRELIABLE
        return ApogeeNetResult(teff=teff, u_teff=u_teff, logg=mean[:, 1], u_logg=total[:, 1], fe_h=mean[:, 2],
                               u_fe_h=total[:, 2], bitmask_flag=flags, snr=snr, raw_u_teff=raw_u_teff,
                               raw_u_logg=std[:, 1], raw_u_fe_h=std[:, 2])

    def summary(self) -> dict[str, Any]:
        """Small JSON-able facts about the model: architecture and sizes, training set sizes and
        time, epochs, held-out (validation split) errors per label, error floors."""
        if not self.trained:
            raise ApogeeNetError("this ApogeeNet has not been trained: nothing to summarise")
        rep = self.report
        floor = {f"{regime}_{name}": round(float(v), 5)
                 for regime, row in zip(("cool", "hot"), self.error_floor, strict=True)
                 for name, v in zip(("log10_teff", "logg", "fe_h"), row, strict=True)}
        return {
            "format": FILE_FORMAT,
            "blocks": [list(b) for b in self.net.blocks],
            "hidden": self.net.hidden,
            "bin_factor": self.bin_factor,
            "n_inputs": self.net.n_in,
            "n_parameters": self.net.n_parameters(),
            "n_train": int(rep.n_train),
            "n_validation": int(rep.n_val),
            "epochs_run": int(rep.epochs_run),
            "best_epoch": int(rep.best_epoch),
            "training_seconds": round(float(rep.seconds), 2),
            "final_val_loss": float(rep.val_loss[rep.best_epoch - 1]) if rep.best_epoch else None,
            "validation": {k: {s: round(v, 5) for s, v in d.items()} for k, d in rep.validation.items()},
            "error_floor": floor,
            "label_range": {k: [float(v[0]), float(v[1])] for k, v in self.label_range.items()},
        }

    # -- persistence ------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-able values."""
        return {"format": FILE_FORMAT, "blocks": [list(b) for b in self.net.blocks], "hidden": self.net.hidden,
                "bin_factor": self.bin_factor, "min_good_fraction": self.min_good_fraction,
                "crop": list(CROP), "labels": list(LABELS), "label_mean": self.label_mean.tolist(),
                "label_std": self.label_std.tolist(),
                "label_range": {k: list(v) for k, v in self.label_range.items()},
                "error_floor": self.error_floor.tolist(), "report": self.report.as_dict()}

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the model as one ``.npz`` at exactly ``path`` (atomically) and return the path."""
        if not self.trained:
            raise ApogeeNetError(f"refusing to write an untrained ApogeeNet to {path}")
        arrays = {f"param_{k}": v for k, v in self.net.params.items()}
        arrays["input_mean"] = self.input_mean.astype(np.float32)
        arrays["config"] = np.array(json.dumps(self.config()))
        return write_arrays(path, arrays)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ApogeeNet:
        """Load a model written by :meth:`write`; :class:`ApogeeNetError` names the file on problems."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                config = json.loads(str(data["config"]))
                params = {k[len("param_"):]: np.asarray(data[k], dtype=np.float32)
                          for k in data.files if k.startswith("param_")}
                input_mean = np.asarray(data["input_mean"], dtype=np.float32)
        except FileNotFoundError as exc:
            raise ApogeeNetError(f"{path}: no such APOGEENet model file") from exc
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ApogeeNetError(f"{path}: not an APOGEENet model file ({exc})") from exc
        if config.get("format") != FILE_FORMAT:
            raise ApogeeNetError(f"{path}: format {config.get('format')!r}, expected {FILE_FORMAT!r}")
        if tuple(config.get("crop", ())) != CROP or tuple(config.get("labels", ())) != LABELS:
            raise ApogeeNetError(f"{path}: crop/labels {config.get('crop')}/{config.get('labels')} do not match "
                                 f"this code ({list(CROP)}/{list(LABELS)})")
        model = cls(tuple(tuple(b) for b in config["blocks"]), config["hidden"], config["bin_factor"],
                    min_good_fraction=config["min_good_fraction"])
        expected = {k: v.shape for k, v in _Network(model.net.n_in, model.net.blocks, model.net.hidden,
                                                     len(LABELS), np.random.default_rng(0)).params.items()}
        shapes = {k: v.shape for k, v in params.items()}
        if shapes != expected:
            raise ApogeeNetError(f"{path}: weight arrays {shapes} do not match the architecture {expected}")
        if input_mean.shape != (model.net.n_in,):
            raise ApogeeNetError(f"{path}: input_mean has shape {input_mean.shape}, expected ({model.net.n_in},)")
        model.net.params = params
        model.input_mean = input_mean
        model.label_mean = np.asarray(config["label_mean"], dtype=float)
        model.label_std = np.asarray(config["label_std"], dtype=float)
        model.label_range = {k: (float(v[0]), float(v[1])) for k, v in config["label_range"].items()}
        model.error_floor = np.asarray(config["error_floor"], dtype=float)
        if model.error_floor.shape != (2, len(LABELS)):
            raise ApogeeNetError(f"{path}: error_floor has shape {model.error_floor.shape}, "
                                 f"expected (2, {len(LABELS)})")
        report = config.get("report", {})
        model.report = TrainingReport(**{k: report[k] for k in TrainingReport().__dict__ if k in report})
        model.trained = True
        return model


# ----------------------------------------------------------------------------- training data

#: Share of each generator population in the default training set. The survey mix has only
#: 5 % hot and 5 % YSO-like stars; APOGEENet's niche needs more of both, and hot stars, whose
#: few shallow lines change by < 1 % over thousands of kelvin, most (with 12 % hot stars a
#: 3000-spectrum network predicted ~14,000 K for every hot star: measured).
DEFAULT_MIX: dict[str, float] = {"giants": 0.30, "dwarfs": 0.22, "hot": 0.22, "yso": 0.12, "uniform": 0.14}
#: Default training size (:func:`train_model`): 2-3 minutes on one core, generation included
#: (measured 170 s wall, ~135 s CPU, on a shared loaded core).
DEFAULT_TRAINING: dict[str, Any] = {"n_spectra": 3000, "epochs": 25}
#: Full-size settings (bench/apogeenet_train.py; 17 minutes on one core, early stop at epoch 49).
#: Measured robust σ at S/N ≥ 50 on release-like raw spectra (ΔTeff/Teff, logg, [Fe/H]):
#: giants 0.8 % / 0.07 / 0.035, dwarfs 0.9 % / 0.08 / 0.020, YSO-like 1.2 % / 0.06 / 0.025,
#: hot stars 6.5 % / 0.12 / 0.19 (their [Fe/H] is flagged FE_H_UNRELIABLE).
FULL_TRAINING: dict[str, Any] = {"n_spectra": 12000, "epochs": 60}


def make_training_spectra(n: int, seed: int, *, mix: Mapping[str, float] | None = None,
                          settings: Any = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Noiseless apStar-like training spectra: (flux (n, 8575), ivar, labels).

    Drawn from the generator's populations in proportions ``mix`` (default :data:`DEFAULT_MIX`)
    with :data:`~astra_dagster.spectra.synth.TRAINING_SETTINGS` but hidden labels (vsini,
    vmacro, vmicro, [C/Fe], [N/Fe]) scattered: with them on their relations every hot star
    would spin at 120 km/s and the network would never see another. Multiplied by the star's
    continuum (as the raw apStar flux has it); throughput and noise are added per epoch by
    :meth:`ApogeeNet.train`. ``ivar`` is 1 on the chips, 0 in the gaps. ``labels`` holds every
    generator label (teff, logg, fe_h, alpha_m and the hidden ones) plus ``kind``.
    """
    from astra_dagster.spectra import synth

    if n < 1:
        raise ApogeeNetError(f"training set size must be >= 1, got {n}")
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = [k for k in mix if k not in synth.POPULATIONS]
    if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ApogeeNetError(f"mix {mix} must give non-negative shares of {synth.POPULATIONS}")
    total = sum(mix.values())
    names = list(mix)
    counts = [int(n * mix[k] / total) for k in names]
    counts[int(np.argmax([mix[k] for k in names]))] += n - sum(counts)
    if settings is None:
        settings = dataclasses.replace(synth.TRAINING_SETTINGS, name="training-varied", vary_hidden=True)
    fluxes, ivars, labels = [], [], []
    for i, (pop, count) in enumerate(zip(names, counts, strict=True)):
        if count == 0:
            continue
        ts = synth.make_training_set(count, int(seed) * 16 + i, settings=settings, population=pop)
        cont = np.array([synth.continuum({k: ts.labels[k][j] for k in synth.MAIN_LABELS}, ts.wavelength)
                         for j in range(count)])
        fluxes.append((ts.flux * cont).astype(np.float32))
        ivars.append((ts.ivar > 0).astype(np.float32))
        labels.append({**ts.labels, "kind": np.asarray(ts.kind)})
    flux = np.concatenate(fluxes)
    ivar = np.concatenate(ivars)
    merged = {k: np.concatenate([lab[k] for lab in labels]) for k in labels[0]}
    return flux, ivar, merged


def train_default(seed: int = 0, *, n_spectra: int | None = None, epochs: int | None = None,
                  log: Callable[[str], None] | None = None, **kwargs: Any) -> ApogeeNet:
    """Generate a training set (:func:`make_training_spectra`) and train a default-size network.

    ``n_spectra`` and ``epochs`` default to :data:`DEFAULT_TRAINING`; ``kwargs`` go to
    :meth:`ApogeeNet.train` (or, for ``blocks``, ``hidden``, ``bin_factor``, to the constructor).
    """
    n_spectra = DEFAULT_TRAINING["n_spectra"] if n_spectra is None else n_spectra
    epochs = DEFAULT_TRAINING["epochs"] if epochs is None else epochs
    arch = {k: kwargs.pop(k) for k in ("blocks", "hidden", "bin_factor") if k in kwargs}
    flux, ivar, labels = make_training_spectra(n_spectra, seed)
    return ApogeeNet(**arch).train(flux, ivar, labels, seed=seed, epochs=epochs, log=log, **kwargs)


def train_model(*, n_train: int = DEFAULT_TRAINING["n_spectra"], seed: int = 0,
                epochs: int = DEFAULT_TRAINING["epochs"], batch_size: int = 64, learning_rate: float = 2e-3,
                weight_decay: float = 1e-4, patience: int = 6, max_seconds: float = 0.0,
                hidden: int = DEFAULT_HIDDEN, blocks: str = "", bin_factor: int = 4) -> ApogeeNet:
    """Train APOGEENet on ``n_train`` generator spectra drawn with ``seed`` (the Dagster entry point).

    Defaults train in about two minutes on one core (:data:`DEFAULT_TRAINING`); the full-size
    settings are :data:`FULL_TRAINING`. Every option is a plain number or string:
    ``max_seconds`` (0 = no limit) stops training early; ``blocks`` is the conv stack as
    ``"7x8,5x16,..."`` (kernel x channels; empty = :data:`DEFAULT_BLOCKS`). Raises
    :class:`ApogeeNetError` for a training set that is too small or unusable.
    """
    if n_train < MIN_TRAINING_SPECTRA:
        raise ApogeeNetError(f"n_train={n_train} is too small to train APOGEENet "
                             f"(need at least {MIN_TRAINING_SPECTRA})")
    arch: dict[str, Any] = {"hidden": int(hidden), "bin_factor": int(bin_factor)}
    if blocks.strip():
        try:
            arch["blocks"] = tuple(tuple(int(v) for v in part.lower().split("x")) for part in blocks.split(","))
        except ValueError as exc:
            raise ApogeeNetError(f"blocks={blocks!r}: expected 'kernel x channels' pairs like '7x8,5x16'") from exc
        if any(len(b) != 2 for b in arch["blocks"]):
            raise ApogeeNetError(f"blocks={blocks!r}: expected 'kernel x channels' pairs like '7x8,5x16'")
    return train_default(seed, n_spectra=int(n_train), epochs=int(epochs), batch_size=int(batch_size),
                         learning_rate=float(learning_rate), weight_decay=float(weight_decay),
                         patience=int(patience), max_seconds=float(max_seconds) or None, **arch)


@functools.lru_cache(maxsize=1)
def _apstar_grid() -> np.ndarray:
    from astra_dagster.spectra.spectrum import apstar_wavelength

    return apstar_wavelength()


def _is_apstar_grid(wavelength: np.ndarray) -> bool:
    grid = _apstar_grid()
    return wavelength.shape == grid.shape and bool(np.allclose(wavelength, grid, rtol=1e-7, atol=0.0))


#: Columns of ``astra.apogeenet`` that :func:`fit_spectra` fills, in table order.
RESULT_COLUMNS = ("snr", "teff", "u_teff", "logg", "u_logg", "fe_h", "u_fe_h", "bitmask_flag")


def fit_spectra(model: ApogeeNet, spectra: Sequence[Spectrum], *, n_draws: int = 20,
                seed: int = 0) -> list[dict[str, Any]]:
    """One dict per spectrum with exactly the ``astra.apogeenet`` columns (:data:`RESULT_COLUMNS`).

    Each spectrum must be a rest-frame apStar row (8575-pixel grid): raw flux with continuum,
    ivar, APOGEE pixel flags. ``snr`` is ``spectrum.meta["snr"]`` when given, else the median
    flux·√ivar over usable pixels. Labels the network cannot give are None, with the reason in
    ``bitmask_flag`` (:class:`ApogeeNetFlag`); a bad spectrum never raises. Raises
    :class:`ApogeeNetError` for an untrained model or a spectrum not on the apStar grid.
    """
    if not isinstance(model, ApogeeNet):
        raise ApogeeNetError(f"fit_spectra needs an ApogeeNet model, got {type(model).__name__}")
    spectra = list(spectra)
    if not spectra:
        return []
    for i, spec in enumerate(spectra):
        if not _is_apstar_grid(np.asarray(spec.wavelength)):
            where = spec.meta.get("path", f"spectrum {i}")
            raise ApogeeNetError(f"{where}: APOGEENet needs rest-frame apStar spectra on the {APSTAR_NPIX}-pixel "
                                 f"grid, got {np.asarray(spec.wavelength).shape[0]} pixels "
                                 f"(frame {spec.meta.get('frame', '?')!r})")
    flux = np.stack([s.flux for s in spectra])
    ivar = np.stack([s.ivar for s in spectra])
    flags = np.stack([s.pixel_flags for s in spectra])
    result = model.predict(flux, ivar, flags, n_draws=n_draws, seed=seed)
    rows = []
    for spec, row in zip(spectra, result.rows(), strict=True):
        meta_snr = spec.meta.get("snr")
        try:
            meta_snr = float(meta_snr) if meta_snr is not None else None
        except (TypeError, ValueError):
            meta_snr = None
        if meta_snr is not None and math.isfinite(meta_snr):
            row["snr"] = meta_snr
        rows.append({k: row[k] for k in RESULT_COLUMNS})
    return rows
