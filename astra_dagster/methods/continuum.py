"""Pseudo-continuum normalisation shared by every label method (The Cannon, The Payne, FERRE,
APOGEENet): one rule, applied identically to training and test spectra.

Input is a rest-frame spectrum on the apStar grid (methods.md §1.1: 8575 log-linear pixels,
``10**(4.179 + 6e-6 i)`` Å). The steps:

1. **Pixel mask.** A pixel is usable where flux and ivar are finite, ivar > 0 and none of the
   ``mask`` bits of ``APOGEE_PIXMASK`` is set (default :data:`~astra_dagster.spectra.bitmask.BAD_PIXELS`,
   bits 0-7 and 14, methods.md §1.4). Pixels outside the three detector chips are never usable.
2. **Continuum pixels.** A fixed set, chosen by a deterministic *rule* that is evaluated (and
   cached) at run time, never read from a data file: a panel of reference stars
   (:data:`REFERENCE_STARS`: giants, dwarfs, metal-poor, M-type and one A-type star) is rendered
   noiselessly with the project's generator on the apStar grid; each pixel is scored by its
   *worst* depth over the panel (``1 - min flux``); every chip is cut into
   :data:`N_SEGMENTS` equal pixel segments and the :data:`SEGMENT_FRACTION` best-scoring pixels
   of each segment are kept (so the fit is anchored across the whole chip, including its ends).
   No pixel is truly continuum in a cool star's H band, hence "pseudo": what matters is that the
   same pixels and the same fit are used for the training spectra and the data.
3. **Fit.** Per chip, a Chebyshev polynomial of degree :data:`DEGREE` in the chip's scaled
   log-wavelength, fitted by ivar-weighted least squares to the usable continuum pixels, with
   one round of clipping of pixels more than :data:`CLIP_SIGMA` robust standard deviations from
   the first fit (unflagged sky/telluric residuals, cosmic rays).
4. **Output.** ``flux / continuum`` and ``ivar * continuum**2``. Pixels that are not usable
   get ivar = 0; their flux is the normalised value where that is finite, else 1.0 (so
   networks see no NaN).

**A chip with too few usable continuum pixels** (fewer than :data:`MIN_FRACTION` of its
continuum pixels, or fewer than ``DEGREE + 2`` of its segments holding any) is not fitted:
the whole chip gets flux 1.0 and ivar 0, and bit ``1 << chip`` is set in the per-spectrum
continuum flag (:data:`CHIP_FLAGS`: blue 1, green 2, red 4). A chip whose fitted continuum is
not positive everywhere (a nonsense spectrum) is treated the same way. The caller sees the flag
in ``ContinuumFit.flags``, in ``normalize_arrays(..., return_flags=True)`` and in
``Spectrum.meta["continuum_flags"]``; it decides whether two chips are enough.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, overload

import numpy as np

from astra_dagster.spectra.bitmask import BAD_PIXELS
from astra_dagster.spectra.spectrum import APSTAR_CDELT1, APSTAR_CRVAL1, APSTAR_NPIX, Spectrum, apstar_wavelength

#: Detector chips on the apStar grid, inclusive pixel ranges (blue, green, red; methods.md §1.1).
CHIPS: tuple[tuple[int, int], ...] = ((201, 3319), (3537, 6125), (6295, 8377))
CHIP_NAMES: tuple[str, ...] = ("blue", "green", "red")
#: Continuum flag bit per chip: set when that chip could not be normalised.
CHIP_FLAGS: dict[str, int] = {name: 1 << i for i, name in enumerate(CHIP_NAMES)}

#: Degree of the per-chip Chebyshev polynomial.
DEGREE = 3
#: Each chip is cut into this many equal segments for the continuum-pixel selection.
N_SEGMENTS = 10
#: Fraction of each segment's pixels kept as continuum pixels.
SEGMENT_FRACTION = 0.08
#: A chip needs at least this fraction of its continuum pixels usable to be fitted.
MIN_FRACTION = 0.25
#: Clip continuum pixels further than this many robust σ from the first fit.
CLIP_SIGMA = 4.0

#: The reference panel of the selection rule: (teff, logg, fe_h, alpha_m).
REFERENCE_STARS: tuple[tuple[float, float, float, float], ...] = (
    (3600.0, 0.8, -0.2, 0.05), (4000.0, 1.5, -0.3, 0.10), (4500.0, 2.4, 0.0, 0.0),
    (4800.0, 2.8, -1.0, 0.30), (5100.0, 3.2, 0.3, 0.0), (4300.0, 1.8, -2.0, 0.35),
    (3500.0, 4.9, 0.0, 0.0), (3900.0, 4.7, 0.3, 0.0), (5000.0, 4.5, -0.5, 0.20),
    (5800.0, 4.4, 0.0, 0.0), (6400.0, 4.2, -0.3, 0.10), (9500.0, 4.0, 0.0, 0.0),
)


@lru_cache(maxsize=1)
def _reference_panel() -> np.ndarray:
    """Noiseless reference spectra (n_ref, 8575) from the generator (≈0.1 s, once per process)."""
    from astra_dagster.spectra import synth  # generator only needed to evaluate the rule

    wave = apstar_wavelength()
    return np.array([
        synth.synthesize({"teff": t, "logg": g, "fe_h": m, "alpha_m": a}, wave, synth.TRAINING_SETTINGS)
        for t, g, m, a in REFERENCE_STARS
    ])


@lru_cache(maxsize=1)
def continuum_pixels() -> np.ndarray:
    """Boolean mask (8575,) of the continuum pixels on the apStar grid (the rule in the module
    docstring, evaluated once per process and cached)."""
    depth = 1.0 - _reference_panel().min(axis=0)
    chosen = np.zeros(APSTAR_NPIX, dtype=bool)
    for lo, hi in CHIPS:
        for seg in np.array_split(np.arange(lo, hi + 1), N_SEGMENTS):
            k = max(1, round(SEGMENT_FRACTION * seg.size))
            # stable sort: ties resolved by pixel index, so the rule is deterministic
            chosen[seg[np.argsort(depth[seg], kind="stable")[:k]]] = True
    chosen.setflags(write=False)
    return chosen


def continuum_fingerprint() -> str:
    """Short hash of the normalisation (continuum pixels and fit settings). A model records it
    at training time so that data normalised differently can be refused."""
    h = hashlib.sha256()
    h.update(np.packbits(continuum_pixels()).tobytes())
    h.update(repr((CHIPS, DEGREE, N_SEGMENTS, SEGMENT_FRACTION, MIN_FRACTION, CLIP_SIGMA)).encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def _chip_bases() -> tuple[np.ndarray, ...]:
    """Chebyshev basis (npix_chip, DEGREE + 1) per chip in scaled log-wavelength (x ∈ [-1, 1])."""
    bases = []
    for lo, hi in CHIPS:
        x = np.linspace(-1.0, 1.0, hi - lo + 1)  # the apStar grid is linear in log λ
        basis = np.polynomial.chebyshev.chebvander(x, DEGREE)
        basis.setflags(write=False)
        bases.append(basis)
    return tuple(bases)


def chip_index() -> np.ndarray:
    """(8575,) int array: chip number 0/1/2 of each apStar pixel, -1 in the gaps and at the ends."""
    out = np.full(APSTAR_NPIX, -1, dtype=np.int64)
    for i, (lo, hi) in enumerate(CHIPS):
        out[lo:hi + 1] = i
    return out


def check_apstar_grid(wavelength: np.ndarray, where: str = "spectrum") -> None:
    """Raise ValueError unless ``wavelength`` is the rest-frame apStar grid."""
    wave = np.asarray(wavelength, dtype=float)
    if wave.shape != (APSTAR_NPIX,):
        raise ValueError(f"{where}: continuum normalisation needs the {APSTAR_NPIX}-pixel apStar grid, "
                         f"got wavelength shape {wave.shape}")
    expected = 10.0 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * np.arange(APSTAR_NPIX))
    # half a pixel (3e-6 in log10) is the largest offset that still maps to the same pixel
    if not np.all(np.abs(np.log10(np.where(wave > 0, wave, 1.0)) - np.log10(expected)) < 3e-6):
        raise ValueError(f"{where}: wavelength is not the rest-frame apStar grid "
                         f"(CRVAL1={APSTAR_CRVAL1}, CDELT1={APSTAR_CDELT1}); shift/resample to the rest frame first")


@dataclass
class ContinuumFit:
    """Result of :func:`fit_continuum` for a batch of n spectra.

    ``continuum`` (n, 8575): the fitted pseudo-continuum (NaN where not defined: gaps, failed
    chips). ``usable`` (n, 8575): the pixel mask of step 1. ``flags`` (n,): OR of
    :data:`CHIP_FLAGS` of the chips that could not be normalised. ``n_continuum`` (n, 3): usable
    continuum pixels per chip after clipping.
    """

    continuum: np.ndarray
    usable: np.ndarray
    flags: np.ndarray
    n_continuum: np.ndarray

    def apply(self, flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (flux, ivar): bad pixels, gaps and failed chips get ivar 0; flux is 1.0
        wherever the normalised value is not finite."""
        flux = np.atleast_2d(np.asarray(flux, dtype=float))
        ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
        ok = np.isfinite(self.continuum)
        cont = np.where(ok, self.continuum, 1.0)
        with np.errstate(invalid="ignore", over="ignore"):
            norm_flux = flux / cont
            norm_ivar = np.where(self.usable & ok, ivar * cont**2, 0.0)
        norm_flux = np.where(ok & np.isfinite(norm_flux), norm_flux, 1.0)
        norm_ivar = np.where(np.isfinite(norm_ivar), norm_ivar, 0.0)
        return norm_flux, norm_ivar


def usable_pixels(flux: np.ndarray, ivar: np.ndarray, pixel_flags: np.ndarray | None,
                  mask: int = BAD_PIXELS) -> np.ndarray:
    """Step 1: finite flux and ivar, ivar > 0, no ``mask`` bit set, inside a detector chip."""
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    ok = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0) & (chip_index() >= 0)[None, :]
    if pixel_flags is not None:
        ok &= (np.atleast_2d(np.asarray(pixel_flags)).astype(np.int64) & int(mask)) == 0
    return ok


def _weighted_fit(basis: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Batched weighted least squares: coefficients (n, d) minimising Σ w (y - basis c)²."""
    a = np.einsum("np,pi,pj->nij", w, basis, basis)
    b = (w * y) @ basis
    # a tiny ridge keeps the solve finite if a chip's weights are degenerate (flagged anyway)
    ridge = 1e-12 * np.trace(a, axis1=1, axis2=2) + 1e-30
    a = a + ridge[:, None, None] * np.eye(basis.shape[1])
    return np.linalg.solve(a, b[..., None])[..., 0]


def fit_continuum(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    pixel_flags: np.ndarray | None = None,
    *,
    mask: int = BAD_PIXELS,
) -> ContinuumFit:
    """Fit the per-chip pseudo-continuum of a batch of rest-frame apStar-grid spectra.

    ``flux``, ``ivar`` (and ``pixel_flags``, APOGEE_PIXMASK bits; None = no flags) have shape
    (n, 8575) or (8575,). See the module docstring for the rule and for failed chips.
    """
    check_apstar_grid(wavelength)
    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    if flux.shape != ivar.shape or flux.shape[-1] != APSTAR_NPIX or flux.ndim != 2:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must both be (n, {APSTAR_NPIX})")
    if pixel_flags is not None and np.atleast_2d(pixel_flags).shape != flux.shape:
        raise ValueError(f"pixel_flags {np.shape(pixel_flags)} does not match flux {flux.shape}")
    usable = usable_pixels(flux, ivar, pixel_flags, mask)
    n = flux.shape[0]
    cont_px = continuum_pixels()
    continuum = np.full(flux.shape, np.nan)
    flags = np.zeros(n, dtype=np.int64)
    n_cont = np.zeros((n, len(CHIPS)), dtype=np.int64)
    safe_flux = np.where(usable, flux, 0.0)
    for c, ((lo, hi), basis) in enumerate(zip(CHIPS, _chip_bases(), strict=True)):
        sel = np.flatnonzero(cont_px[lo:hi + 1])
        y = safe_flux[:, lo:hi + 1][:, sel]
        w = np.where(usable[:, lo:hi + 1][:, sel], ivar[:, lo:hi + 1][:, sel], 0.0)
        # Normalise the weights per spectrum: only relative weights matter, and it keeps the
        # normal equations well scaled for any flux unit.
        scale = np.max(w, axis=1, keepdims=True)
        w = w / np.where(scale > 0, scale, 1.0)
        b = basis[sel]
        coef = _weighted_fit(b, y, w)
        resid = (y - coef @ b.T) * np.sqrt(w)
        good = w > 0
        # robust σ of the weighted residuals per spectrum, from the usable pixels only
        masked = np.where(good, np.abs(resid), np.nan)
        with warnings.catch_warnings():  # all-NaN rows (no usable pixel) are expected here
            warnings.simplefilter("ignore", RuntimeWarning)
            robust = 1.4826 * np.nan_to_num(np.nanmedian(masked, axis=1))
        keep = good & (np.abs(resid) <= CLIP_SIGMA * np.maximum(robust, 1e-300)[:, None])
        w = np.where(keep, w, 0.0)
        coef = _weighted_fit(b, y, w)
        n_keep = keep.sum(axis=1)
        seg_id = np.minimum((sel * N_SEGMENTS) // (hi - lo + 1), N_SEGMENTS - 1)
        seg_hit = np.zeros((n, N_SEGMENTS), dtype=bool)
        for s in range(N_SEGMENTS):
            seg_hit[:, s] = keep[:, seg_id == s].any(axis=1)
        model = coef @ basis.T
        failed = (n_keep < MIN_FRACTION * sel.size) | (seg_hit.sum(axis=1) < DEGREE + 2)
        failed |= ~np.all(np.isfinite(model) & (model > 0), axis=1)
        continuum[:, lo:hi + 1] = np.where(failed[:, None], np.nan, model)
        flags |= np.where(failed, CHIP_FLAGS[CHIP_NAMES[c]], 0)
        n_cont[:, c] = n_keep
    return ContinuumFit(continuum=continuum, usable=usable, flags=flags, n_continuum=n_cont)


@overload
def normalize_arrays(wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray,
                     pixel_flags: np.ndarray | None = ..., *, mask: int = ...,
                     return_flags: Literal[False] = ...) -> tuple[np.ndarray, np.ndarray]: ...


@overload
def normalize_arrays(wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray,
                     pixel_flags: np.ndarray | None = ..., *, mask: int = ...,
                     return_flags: Literal[True]) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def normalize_arrays(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    pixel_flags: np.ndarray | None = None,
    *,
    mask: int = BAD_PIXELS,
    return_flags: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continuum-normalise a batch (n, 8575) of rest-frame apStar-grid spectra.

    Returns normalised ``(flux, ivar)`` of shape (n, 8575) (a 1-D input gives (1, 8575)); with
    ``return_flags=True`` also the (n,) continuum flags (:data:`CHIP_FLAGS` of failed chips,
    whose pixels have ivar 0).
    """
    fit = fit_continuum(wavelength, flux, ivar, pixel_flags, mask=mask)
    norm_flux, norm_ivar = fit.apply(flux, ivar)
    if return_flags:
        return norm_flux, norm_ivar, fit.flags
    return norm_flux, norm_ivar


def normalize(spectrum: Spectrum, *, mask: int = BAD_PIXELS) -> Spectrum:
    """A continuum-normalised copy of a rest-frame apStar-grid spectrum.

    ``meta`` is copied and gains ``continuum_flags`` (int, :data:`CHIP_FLAGS` of chips that
    could not be normalised), ``continuum_fingerprint`` and ``normalized=True``. Raises
    ValueError (naming the spectrum's path) for an observed-frame or non-apStar grid.
    """
    where = str(spectrum.meta.get("path") or "spectrum")
    if spectrum.meta.get("frame", "rest") != "rest":
        raise ValueError(f"{where}: continuum normalisation needs a rest-frame spectrum, "
                         f"got frame={spectrum.meta.get('frame')!r}")
    check_apstar_grid(spectrum.wavelength, where)
    fit = fit_continuum(spectrum.wavelength, spectrum.flux, spectrum.ivar, spectrum.pixel_flags, mask=mask)
    flux, ivar = fit.apply(spectrum.flux, spectrum.ivar)
    meta = dict(spectrum.meta, continuum_flags=int(fit.flags[0]), continuum_fingerprint=continuum_fingerprint(),
                normalized=True)
    return Spectrum(spectrum.wavelength.copy(), flux[0], ivar[0], spectrum.pixel_flags.copy(), meta)


def failed_chips(flags: int) -> Sequence[str]:
    """Names of the chips whose bit is set in a continuum flag value."""
    return [name for name, bit in CHIP_FLAGS.items() if int(flags) & bit]
