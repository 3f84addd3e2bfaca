"""Doppler-style radial velocities and coarse stellar labels (numpy/scipy only).

The flow follows Doppler's ``fit_cannon`` (reference/methods.md §2.1) with a Cannon emulator
(:mod:`astra_dagster.methods.doppler.emulator`) as the template family:

1. **prep** — mask bad pixels with the Doppler mask, non-finite values and large positive
   outliers; normalise each chip by a polynomial through upper percentiles of the flux.
2. **coarse CCF** — χ²-based FFT cross-correlation over ±``vrange`` km/s against Doppler's
   coarse template set (of every emulator given: that is how template families compete). A
   peak at the edge of the range, or no significant peak, ends the fit with a flagged result.
3. **labels at fixed RV** — Levenberg–Marquardt over (Teff, logg, [Fe/H]) and a per-chip
   continuum polynomial, starting from the best coarse template.
4. **second CCF** against the best-label template (plus a 1 km/s χ²(v) scan for broad-lined,
   e.g. hot, stars).
5. **joint fit** of Teff, logg, [Fe/H], RV and the continuum with the analytic emulator
   Jacobian, then 5σ outlier rejection and a refit. Doubtful fits (labels on a range limit,
   no convergence, ambiguous CCF) are repeated from other templates; the lowest χ² wins.
6. **rotation** — the extra rotational broadening that best fits the line shapes (depths
   free); when it is significant the joint fit is repeated with broadened templates.
7. **fine RV** — χ²(v) on a fine grid around the solution at fixed labels (continuum re-solved
   at every v), minimum from a parabola.

Uncertainties come from the inverse of JᵀWJ at the solution, inflated by √χ²_red when the
model does not describe the data to the noise level, plus (in quadrature) the templates'
calibrated systematic floors (:func:`error_floors`). Velocities: ``vrel`` is the shift of the
spectrum relative to the template (observed frame for visits, the residual shift for
rest-frame rows); ``vhelio = vrel + bc`` (APOGEE convention, barycentric despite the name).
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import fft as sp_fft
from scipy import sparse
from scipy.ndimage import median_filter

from astra_dagster.methods.doppler.emulator import Emulator
from astra_dagster.spectra.bitmask import DOPPLER_BAD_PIXELS
from astra_dagster.spectra.spectrum import C_KMS, Spectrum

#: Fewest usable pixels for a fit; fewer gives a flagged NaN result.
MIN_GOOD_PIXELS = 500
#: A chip with fewer usable pixels than this is left out (and flagged).
MIN_CHIP_PIXELS = 100
#: Order of the per-chip continuum polynomial fitted jointly with the labels.
CONTINUUM_ORDER = 3
#: Residuals beyond this many σ are masked after the first joint fit.
CLIP_SIGMA = 5.0
#: Reduced χ² above this is flagged.
HIGH_CHISQ = 10.0
#: CCF peak significance (√Δχ² against a flat spectrum) below which the result is flagged
#: WEAK_CCF, and below which nothing is measured (NO_SIGNAL; pure noise reaches ~4).
_WEAK_CCF = 12.0
_NO_SIGNAL = 6.0
#: Coarse templates within this CCF χ² of the best one that place the star at a different
#: velocity are fitted too (at most _MAX_TEMPLATE_FITS fits per spectrum).
_AMBIGUOUS_DCHI2 = 100.0
_MAX_TEMPLATE_FITS = 3
#: APOGEE chip boundaries (Å, vacuum): the middles of the two detector gaps.
APOGEE_CHIP_EDGES = (15833.0, 16454.0)

#: Observatory locations (lon °, lat °, height m) given explicitly so astropy needs no site
#: registry download.
SITES: dict[str, tuple[float, float, float]] = {
    "apo": (-105.8203, 32.7803, 2788.0),
    "lco": (-70.6926, -29.0146, 2380.0),
}


class DopplerError(RuntimeError):
    """The input cannot be fitted at all (wrong templates, malformed spectrum, ...)."""


class DopplerFlag(enum.IntFlag):
    """Bits of :attr:`VisitRV.flags`; ``FATAL`` bits mean the RV could not be measured."""

    LOW_GOOD_PIXELS = 1 << 0      # fewer than MIN_GOOD_PIXELS usable pixels: nothing measured
    CHIP_MASKED = 1 << 1          # at least one chip had no usable pixels and was left out
    CCF_EDGE = 1 << 2             # the correlation peak is at the edge of the search range
    NONFINITE_INPUT = 1 << 3      # NaN/inf flux or ivar were present (masked)
    LABEL_AT_EDGE = 1 << 4        # a label sits at its template range limit
    NOT_CONVERGED = 1 << 5        # the joint fit hit its iteration limit
    HIGH_CHISQ = 1 << 6           # reduced χ² > HIGH_CHISQ
    BC_COMPUTED = 1 << 7          # bc was computed with astropy (no bc in the metadata)
    NO_BC = 1 << 8                # bc unknown: vhelio is NaN
    REST_FRAME = 1 << 9           # rest-frame input: vrel is the residual shift, bc = 0
    WEAK_CCF = 1 << 10            # the correlation peak is not significant
    FIT_FAILED = 1 << 11          # the least-squares problem was singular: nothing measured
    RV_SCAN_EDGE = 1 << 12        # fine χ²(v) scan minimum at its edge (v from the joint fit)
    NO_SIGNAL = 1 << 13           # no significant correlation peak (noise only): nothing measured
    NO_GOOD_VISITS = 1 << 14      # fit_star: no visit gave a velocity


#: Flags that leave the velocity unmeasured (NaN).
FATAL_FLAGS = (DopplerFlag.LOW_GOOD_PIXELS | DopplerFlag.CCF_EDGE | DopplerFlag.FIT_FAILED
               | DopplerFlag.NO_SIGNAL | DopplerFlag.NO_GOOD_VISITS)


def flag_names(flags: int) -> list[str]:
    """Names of the bits set in ``flags``."""
    return [f.name for f in DopplerFlag if flags & f and f.name]


@dataclass
class VisitRV:
    """Result for one spectrum. NaN marks what could not be measured (see ``flags``)."""

    vrel: float
    u_vrel: float
    teff: float
    u_teff: float
    logg: float
    u_logg: float
    fe_h: float
    u_fe_h: float
    chisq: float
    bc: float
    vhelio: float
    flags: int
    snr: float
    template: str = ""
    n_pixels: int = 0
    ccf_vrel: float = math.nan
    vsini: float = 0.0
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the velocity was measured."""
        return not (self.flags & FATAL_FLAGS)

    @property
    def flag_names(self) -> list[str]:
        return flag_names(self.flags)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["flag_names"] = self.flag_names
        return out


@dataclass
class StarRV:
    """Joint fit over the visits of one star: common labels, one velocity per visit."""

    visits: list[VisitRV]
    vhelio: float
    u_vhelio: float
    vscatter: float
    teff: float
    u_teff: float
    logg: float
    u_logg: float
    fe_h: float
    u_fe_h: float
    chisq: float
    n_visits: int
    n_good_visits: int
    flags: int
    template: str = ""
    vsini: float = 0.0
    message: str = ""

    @property
    def flag_names(self) -> list[str]:
        return flag_names(self.flags)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["visits"] = [v.to_dict() for v in self.visits]
        out["flag_names"] = self.flag_names
        return out


# ---------------------------------------------------------------------------------------------
# Barycentric correction
# ---------------------------------------------------------------------------------------------

def _site_for(telescope: str | None) -> tuple[float, float, float]:
    name = (telescope or "").lower()
    if name.startswith("lco") or "lco" in name:
        return SITES["lco"]
    if name.startswith("apo") or "apo" in name or name == "":
        return SITES["apo"]
    raise DopplerError(f"unknown telescope {telescope!r}: expected an apo* or lco* name")


def barycentric_correction(ra: float, dec: float, jd: float, telescope: str | None = "apo25m") -> float:
    """Barycentric velocity correction (km/s) for a star seen from APO or LCO at ``jd`` (UTC).

    Uses astropy offline: explicit site coordinates and no IERS download (the bundled IERS-B
    table; beyond it astropy's predictions, good to m/s).
    """
    from astropy import units as u
    from astropy.coordinates import EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    if not all(np.isfinite([ra, dec, jd])):
        raise DopplerError(f"barycentric correction needs finite ra/dec/jd, got {ra}, {dec}, {jd}")
    lon, lat, height = _site_for(telescope)
    iers.conf.auto_download = False
    location = EarthLocation.from_geodetic(lon=lon * u.deg, lat=lat * u.deg, height=height * u.m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # IERS-range warnings: offline by design, m/s level
        corr = SkyCoord(ra * u.deg, dec * u.deg).radial_velocity_correction(
            "barycentric", obstime=Time(jd, format="jd", scale="utc"), location=location
        )
    return float(corr.to(u.km / u.s).value)


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
        raise DopplerError(
            f"{source}: wavelengths {wave[0]:.1f}-{wave[-1]:.1f} Å are outside the templates' "
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


# ---------------------------------------------------------------------------------------------
# Cross-correlation
# ---------------------------------------------------------------------------------------------

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
         only: tuple[Emulator, np.ndarray] | None = None) -> list[_CCFResult]:
    """The best velocity of every coarse template by χ² of a scaled template within ±vrange.

    χ²(L) = Σw (d − β)² − max(0, cov(d, t_L))² / var(t_L) for line depth d = 1 − f (a scaled
    template plus a constant), for every lag L at once with three FFT correlations per template;
    each minimum is refined with a parabola. Returns one result per template, lowest χ² first.
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
            depth = 1.0 - emulator.flux(labels)[:, ::_CCF_STRIDE]
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


# ---------------------------------------------------------------------------------------------
# Model of one prepared spectrum and the least-squares machinery
# ---------------------------------------------------------------------------------------------

_OFFSETS = np.arange(-1, 3)


def _cubic_weights(t: np.ndarray, derivative: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Catmull-Rom interpolation weights (n, 4) for offsets -1..2, and their t-derivatives."""
    w = np.empty((t.size, 4))
    t2 = t * t
    w[:, 0] = 0.5 * t * (t * (2.0 - t) - 1.0)
    w[:, 1] = 0.5 * (t2 * (3.0 * t - 5.0) + 2.0)
    w[:, 2] = 0.5 * t * (t * (4.0 - 3.0 * t) + 1.0)
    w[:, 3] = 0.5 * t2 * (t - 1.0)
    if not derivative:
        return w, None
    dw = np.empty((t.size, 4))
    dw[:, 0] = 0.5 * (t * (4.0 - 3.0 * t) - 1.0)
    dw[:, 1] = 0.5 * t * (9.0 * t - 10.0)
    dw[:, 2] = 0.5 * (t * (8.0 - 9.0 * t) + 1.0)
    dw[:, 3] = 0.5 * t * (3.0 * t - 2.0)
    return w, dw


def _interpolator(k: np.ndarray, weights: np.ndarray, n_grid: int) -> sparse.csr_matrix:
    """Sparse (n_pixels, n_grid) matrix applying 4-point weights around grid index k."""
    n = k.size
    cols = (k[:, None] + _OFFSETS).ravel()
    indptr = np.arange(0, 4 * n + 1, 4)
    return sparse.csr_matrix((weights.ravel(), cols, indptr), shape=(n, n_grid))


class _VisitModel:
    """Template × continuum for one prepared spectrum and one emulator.

    Parameters: ``[teff, logg, fe_h, v, a_0 .. a_{n_cont-1}]``.
    """

    def __init__(self, prep: _Prepared, emulator: Emulator, v: float = 0.0, vsini: float = 0.0):
        self.em = emulator
        # Extra rotational broadening applied to every template spectrum (0: none).
        self.vsini = float(vsini)
        self._kernel = emulator.rotation_kernel(vsini) if vsini > 0 else None
        self._half = 0 if self._kernel is None else self._kernel.size // 2
        self._kernel_fft: dict[int, np.ndarray] = {}
        self.x = prep.ln_wave
        self.f = prep.flux
        self.basis = prep.basis
        chip = prep.chip
        self.ivar = prep.ivar
        self.rejected = np.zeros(self.x.size, dtype=bool)
        self.set_weights(v)
        # Pixels are sorted by wavelength, so each chip is one contiguous block of rows and
        # the continuum part of the Jacobian is block-diagonal.
        n_b = CONTINUUM_ORDER + 1
        edges = np.searchsorted(chip, np.arange(prep.n_chips + 1))
        self.blocks = [(int(edges[k]), int(edges[k + 1]), 4 + n_b * k, 4 + n_b * (k + 1))
                       for k in range(prep.n_chips)]
        self.n_cont = n_b * prep.n_chips
        self.n_params = 4 + self.n_cont
        self._jac = np.zeros((self.x.size, self.n_params))

    def set_weights(self, v: float) -> None:
        """Pixel weights 1/(σ² + s²) with the emulator's model variance s² taken where each
        pixel lands for velocity ``v``: s² is large at the lines the emulator gets wrong, and
        weights misaligned with the lines would bias the velocity."""
        ivar = self.ivar
        if self.em.s2 is not None:
            u = (self.x - math.log1p(v / C_KMS) - self.em.ln_start) / self.em.ln_step
            i = np.clip(np.rint(u).astype(np.int64), 0, self.em.n_pixels - 1)
            ivar = ivar / (1.0 + ivar * self.em.s2[i])
        self.sw = np.where(self.rejected, 0.0, np.sqrt(ivar))

    @property
    def n_used(self) -> int:
        """Pixels with weight (rejected outliers have none)."""
        return int(np.count_nonzero(self.sw))

    def reject(self, bad: np.ndarray) -> None:
        """Give no weight to the ``bad`` pixels from now on."""
        self.rejected |= bad
        self.sw = np.where(self.rejected, 0.0, self.sw)

    def continuum(self, coef: np.ndarray) -> np.ndarray:
        cont = np.empty(self.x.size)
        for r0, r1, c0, c1 in self.blocks:
            cont[r0:r1] = self.basis[r0:r1] @ coef[c0 - 4:c1 - 4]
        return cont

    def _emulate(self, lo: int, hi: int, mat: np.ndarray) -> np.ndarray:
        """``theta[lo:hi] @ mat``, broadened by the rotation kernel when ``vsini`` > 0 (the
        product is taken on a wider range, then convolved and cut back to [lo, hi))."""
        em = self.em
        h = self._half
        if h == 0:
            return em.theta[lo:hi] @ mat
        if lo - h < 0 or hi + h > em.n_pixels:
            raise DopplerError(f"rotational broadening of {self.vsini:g} km/s runs off the template {em.name}")
        g = em.theta[lo - h:hi + h] @ mat
        n_fft = sp_fft.next_fast_len(g.shape[0])
        kf = self._kernel_fft.get(n_fft)
        if kf is None:
            assert self._kernel is not None
            kf = self._kernel_fft[n_fft] = sp_fft.rfft(self._kernel, n_fft)
        spec = sp_fft.rfft(g, n_fft, axis=0)
        spec *= kf if g.ndim == 1 else kf[:, None]
        return sp_fft.irfft(spec, n_fft, axis=0)[2 * h:2 * h + (hi - lo)]

    def _positions(self, v: float) -> tuple[np.ndarray, np.ndarray, int, int]:
        em = self.em
        u = (self.x - math.log1p(v / C_KMS) - em.ln_start) / em.ln_step
        i0 = np.floor(u).astype(np.int64)
        lo = int(i0[0]) - 1  # pixels are sorted, so the extremes are at the ends
        hi = int(i0[-1]) + 3
        if lo < 0 or hi > em.n_pixels:
            raise DopplerError(f"velocity {v:.1f} km/s shifts the spectrum off the template {em.name}")
        return i0 - lo, u - i0, lo, hi

    def template(self, labels: np.ndarray, v: float, jacobian: bool = True,
                 grid_flux: tuple[int, np.ndarray] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Template flux at the pixels, d/dlabels (n, 3) and d/dv (n,).

        ``grid_flux`` = (first pixel, emulator flux on the grid) reuses one evaluation of the
        emulator for several velocities at fixed labels (flux only).
        """
        em = self.em
        k, t, lo, hi = self._positions(v)
        if grid_flux is not None:
            start, g = grid_flux
            k = k + (lo - start)
            if k[0] < 1 or k[-1] + 2 >= g.shape[0]:
                raise DopplerError(f"velocity {v:.1f} km/s is outside the precomputed template range")
        elif jacobian:
            vec, dvec = em.label_vector_and_derivatives(labels)
            g = self._emulate(lo, hi, np.column_stack([vec, dvec]))
        else:
            g = self._emulate(lo, hi, em.label_vector(labels))
        w, dw = _cubic_weights(t, derivative=g.ndim == 2)
        vals = _interpolator(k, w, g.shape[0]) @ g
        if g.ndim == 1:
            return vals, None, None
        assert dw is not None
        dflux_du = _interpolator(k, dw, g.shape[0]) @ g[:, 0]
        dflux_dv = dflux_du * (-1.0 / em.ln_step) / (C_KMS + v)
        return vals[:, 0], vals[:, 1:], dflux_dv

    def grid_flux(self, labels: np.ndarray, vmin: float, vmax: float) -> tuple[int, np.ndarray]:
        """Emulator flux on the grid pixels needed for velocities vmin..vmax."""
        _, _, lo1, hi1 = self._positions(vmax)
        _, _, lo0, hi0 = self._positions(vmin)
        lo, hi = min(lo0, lo1), max(hi0, hi1)
        return lo, self._emulate(lo, hi, self.em.label_vector(labels))

    def residuals(self, p: np.ndarray, jacobian: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Weighted residuals sw·(f − model) and the weighted model Jacobian (n, n_params)."""
        flux, dlab, dv = self.template(p[:3], float(p[3]), jacobian)
        return self._assemble(p, flux, dlab, dv, jacobian)

    def _assemble(self, p: np.ndarray, flux: np.ndarray, dlab: np.ndarray | None,
                  dv: np.ndarray | None, jacobian: bool) -> tuple[np.ndarray, np.ndarray | None]:
        cont = self.continuum(p[4:])
        r = self.sw * (self.f - flux * cont)
        if not jacobian:
            return r, None
        # One buffer per model: the optimiser never needs two Jacobians at once, and the
        # off-block zeros of the continuum part stay zero.
        jac = self._jac
        scw = self.sw * cont
        np.multiply(dlab, scw[:, None], out=jac[:, :3])
        jac[:, 3] = 0.0 if dv is None else dv * scw
        fsw = flux * self.sw
        for r0, r1, c0, c1 in self.blocks:
            np.multiply(self.basis[r0:r1], fsw[r0:r1, None], out=jac[r0:r1, c0:c1])
        return r, jac

    def at_fixed_velocity(self, v: float) -> Any:
        """Residual function for fixed v: the emulator basis is interpolated to the pixels once,
        so each evaluation is one (n_pix × n_terms) product. Its Jacobian has a zero v column."""
        k, t, lo, hi = self._positions(v)
        w, _ = _cubic_weights(t, derivative=False)
        theta = self.em.theta[lo:hi] if self._half == 0 else self._emulate(lo, hi, np.eye(self.em.theta.shape[1]))
        basis = _interpolator(k, w, hi - lo) @ theta

        def fun(p: np.ndarray, jacobian: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
            if jacobian:
                vec, dvec = self.em.label_vector_and_derivatives(p[:3])
                vals = basis @ np.column_stack([vec, dvec])
                return self._assemble(p, vals[:, 0], vals[:, 1:], None, True)
            return self._assemble(p, basis @ self.em.label_vector(p[:3]), None, None, False)

        return fun

    def solve_continuum(self, labels: np.ndarray, v: float,
                        grid_flux: tuple[int, np.ndarray] | None = None) -> tuple[np.ndarray, float]:
        """Best continuum coefficients for fixed labels and velocity, and the χ²."""
        flux, _, _ = self.template(labels, v, jacobian=False, grid_flux=grid_flux)
        fsw = flux * self.sw
        b = self.f * self.sw
        coef = np.zeros(self.n_cont)
        chi2 = 0.0
        for r0, r1, c0, c1 in self.blocks:
            a_mat = self.basis[r0:r1] * fsw[r0:r1, None]
            gram = a_mat.T @ a_mat
            gram[np.diag_indices_from(gram)] += 1e-12 * np.trace(gram)
            c = np.linalg.solve(gram, a_mat.T @ b[r0:r1])
            coef[c0 - 4:c1 - 4] = c
            res = b[r0:r1] - a_mat @ c
            chi2 += float(res @ res)
        return coef, chi2


@dataclass
class _LMResult:
    p: np.ndarray
    chi2: float
    cov: np.ndarray          # covariance of the free parameters (full size, NaN for fixed)
    n_iter: int
    converged: bool
    residuals: np.ndarray = field(repr=False)


def _normal_equations(resfun: Any) -> Any:
    """Wrap ``resfun(p, jacobian) -> (r, J)`` as ``fun(p, normal) -> (χ², JᵀJ, Jᵀr, r)``."""

    def fun(p: np.ndarray, normal: bool = True) -> tuple[float, Any, Any, np.ndarray]:
        r, jac = resfun(p, normal)
        if not normal:
            return float(r @ r), None, None, r
        return float(r @ r), jac.T @ jac, jac.T @ r, r

    return fun


def _levenberg_marquardt(
    resfun: Any, p0: np.ndarray, free: np.ndarray, lower: np.ndarray, upper: np.ndarray,
    max_iter: int = 30,
) -> _LMResult:
    """Bounded Levenberg–Marquardt for weighted residuals ``resfun(p, jacobian) -> (r, J)``."""
    return _lm_normal(_normal_equations(resfun), p0, free, lower, upper, max_iter)


def _lm_normal(
    fun: Any, p0: np.ndarray, free: np.ndarray, lower: np.ndarray, upper: np.ndarray,
    max_iter: int = 30,
) -> _LMResult:
    """Bounded Levenberg–Marquardt with Jacobi scaling on the normal equations.

    ``fun(p, normal)`` returns (χ², JᵀJ, Jᵀr, r), the matrices only when ``normal`` is true
    (trial steps need χ² alone). Steps are clipped to [lower, upper]; the iteration stops when
    a step lowers χ² by less than 0.01 (the solution then moves by ≪ 1σ).
    """
    p = np.clip(p0.astype(float), lower, upper)
    chi2, a_full, g_full, r = fun(p, True)
    lam = 1e-3
    converged = False
    n_iter = 0
    idx = np.flatnonzero(free)
    all_free = idx.size == p.size
    for n_iter in range(1, max_iter + 1):  # noqa: B007
        a, g = (a_full, g_full) if all_free else (a_full[np.ix_(idx, idx)], g_full[idx])
        d = np.sqrt(np.maximum(np.diag(a), 1e-300))
        a_s = a / np.outer(d, d)
        g_s = g / d
        improved = False
        gain = 0.0
        at_lower = p[idx] <= lower[idx]
        at_upper = p[idx] >= upper[idx]
        for _ in range(12):
            # Active set: a parameter on its bound whose step points outward stays put, and
            # the step of the others is solved without it (otherwise the clipped step is not
            # downhill and the damping only grows).
            use = np.ones(idx.size, dtype=bool)
            try:
                for _pass in range(3):
                    sub = np.flatnonzero(use)
                    step_sub = np.linalg.solve(a_s[np.ix_(sub, sub)] + lam * np.eye(sub.size), g_s[sub])
                    out = (at_lower[sub] & (step_sub < 0)) | (at_upper[sub] & (step_sub > 0))
                    if not np.any(out):
                        break
                    use[sub[out]] = False
            except np.linalg.LinAlgError:
                lam *= 10
                continue
            step = np.zeros(idx.size)
            step[sub] = step_sub / d[sub]
            trial = p.copy()
            trial[idx] += step
            trial = np.clip(trial, lower, upper)
            chi2_t, _, _, r_t = fun(trial, False)
            if np.isfinite(chi2_t) and chi2_t <= chi2:
                p, r = trial, r_t
                gain = chi2 - chi2_t
                chi2 = chi2_t
                lam = max(lam / 5, 1e-7)
                improved = True
                break
            lam *= 10
        if not improved:
            converged = True  # no downhill step at any damping: at the minimum
            break
        chi2, a_full, g_full, r = fun(p, True)
        if gain < 1e-2:
            converged = True
            break
    a = a_full if all_free else a_full[np.ix_(idx, idx)]
    cov = np.full((p.size, p.size), np.nan)
    try:
        d = np.sqrt(np.maximum(np.diag(a), 1e-300))
        inv = np.linalg.inv(a / np.outer(d, d)) / np.outer(d, d)
        cov[np.ix_(idx, idx)] = inv
    except np.linalg.LinAlgError:
        pass
    return _LMResult(p, chi2, cov, n_iter, converged, r)


def _bounds(emulator: Emulator, n_params: int, v0: float, vrange: float) -> tuple[np.ndarray, np.ndarray]:
    lower = np.full(n_params, -np.inf)
    upper = np.full(n_params, np.inf)
    lower[:3], upper[:3] = emulator.ranges[:, 0], emulator.ranges[:, 1]
    lower[3], upper[3] = -vrange, vrange
    return lower, upper


def _fit_candidate(prep: _Prepared, emulators: list[Emulator], ccf: _CCFResult, vrange: float
                   ) -> tuple[_VisitModel, _LMResult, np.ndarray]:
    """From one CCF candidate to a converged joint fit.

    Labels (with the continuum) at the CCF velocity; a second CCF with those labels; then the
    joint fit of all labels, v and the continuum, 5σ clipping and a refit. Broad-lined spectra
    (CCF error > 1 km/s, e.g. hot stars whose Brackett lines dominate the correlation) keep
    [Fe/H] at the template's value in the first step, so that the weak narrow lines stay in the
    template, and get a χ²(v) scan at 1 km/s steps across the CCF uncertainty, where the narrow
    lines decide, before the joint fit.
    Returns the model, the fit and the free-parameter mask.
    """
    emulator = ccf.emulator
    model = _VisitModel(prep, emulator, ccf.vrel)
    labels0 = emulator.clip(ccf.labels)
    coef, _ = model.solve_continuum(labels0, ccf.vrel)
    p0 = np.concatenate([labels0, [ccf.vrel], coef])
    lower, upper = _bounds(emulator, model.n_params, ccf.vrel, vrange)
    free = np.ones(model.n_params, dtype=bool)
    free[3] = False
    broad = ccf.sigma_v > 1.0
    if broad:
        free[2] = False
    stage = _levenberg_marquardt(model.at_fixed_velocity(ccf.vrel), p0, free, lower, upper, max_iter=4)
    ccf2 = _ccf(prep, emulators, vrange, only=(emulator, stage.p[:3]))[0]
    p0 = stage.p.copy()
    p0[3] = ccf2.vrel if not ccf2.edge else ccf.vrel
    if not ccf2.edge and (broad or ccf2.sigma_v > 1.0):
        half = min(max(3.0 * ccf2.sigma_v, 5.0), 40.0)
        vs = np.clip(p0[3] + np.arange(-half, half + 0.5, 1.0), -vrange, vrange)
        grid = model.grid_flux(p0[:3], float(vs[0]), float(vs[-1]))
        chi2 = [model.solve_continuum(p0[:3], float(v), grid)[1] for v in vs]
        p0[3] = float(vs[int(np.argmin(chi2))])
    free[:] = True
    model.set_weights(float(p0[3]))
    res = _levenberg_marquardt(model.residuals, p0, free, lower, upper)
    # Reject > CLIP_SIGMA residuals (sky residuals, bad pixels the mask missed) and refit, with
    # the weights following the star's final position.
    bad = np.abs(res.residuals) > CLIP_SIGMA
    # s² weights misplaced by δv bias v by ~2 % of δv (measured): refit when δv > 0.5 km/s.
    moved = abs(res.p[3] - p0[3]) > 0.5 and model.em.s2 is not None
    if (np.any(bad) and (~bad).sum() >= MIN_GOOD_PIXELS) or moved:
        if (~bad).sum() >= MIN_GOOD_PIXELS:
            model.reject(bad)
        model.set_weights(float(res.p[3]))
        res = _levenberg_marquardt(model.residuals, res.p, free, lower, upper)
    return model, res, free


def _at_label_edge(emulator: Emulator, labels: np.ndarray) -> bool:
    """True when any label is within 0.1 % of its range limit."""
    lo, hi = emulator.ranges[:, 0], emulator.ranges[:, 1]
    tol = 1e-3 * (hi - lo)
    return bool(np.any((labels <= lo + tol) | (labels >= hi - tol)))


def _doubtful(res: _LMResult, emulator: Emulator, ccf: _CCFResult) -> bool:
    """A fit worth checking against another template family."""
    return _at_label_edge(emulator, res.p[:3]) or not res.converged or ccf.significance < _WEAK_CCF


#: Extra rotational broadening tried on the templates (km/s), in order; the search stops at the
#: first value that does not lower χ² by more than _BROADENING_DCHI2, then a parabola through
#: the neighbouring values refines it.
_VSINI_STEPS = (6.0, 9.0, 13.0, 18.0, 25.0, 35.0, 50.0, 70.0, 100.0, 140.0, 200.0, 280.0)
_BROADENING_DCHI2 = 25.0
#: Smaller extra broadening is not applied: below ~2 LSF pixels it is degenerate with the
#: templates' macroturbulence and label mismatch and did not improve velocities (measured).
_MIN_VSINI = 12.0


class _FreeDepthChi2:
    """χ² of ``continuum × (1 + β (T - 1))`` with the per-chip continuum polynomials and the
    line-depth scale β solved linearly, for many templates T: compares line *shapes* whatever
    the depths. The continuum part of the normal equations is the same for every T, so it is
    factored once and β comes from a Schur complement."""

    def __init__(self, model: _VisitModel, cont: np.ndarray):
        self.model = model
        self.y = model.f * model.sw
        self.cw = cont * model.sw
        self.blocks = []
        yy = float(self.y @ self.y)
        for r0, r1, _, _ in model.blocks:
            b = model.basis[r0:r1] * model.sw[r0:r1, None]
            gram = b.T @ b
            gram[np.diag_indices_from(gram)] += 1e-12 * np.trace(gram) + 1e-300
            inv = np.linalg.inv(gram)
            by = b.T @ self.y[r0:r1]
            yy -= float(by @ inv @ by)
            self.blocks.append((r0, r1, b, inv, inv @ by))
        self.chi2_continuum_only = yy

    def __call__(self, labels: np.ndarray, v: float, grid: tuple[int, np.ndarray]) -> float:
        flux, _, _ = self.model.template(labels, v, jacobian=False, grid_flux=grid)
        t = (flux - 1.0) * self.cw
        num = float(t @ self.y)
        den = float(t @ t)
        for r0, r1, b, inv, coef_y in self.blocks:
            bt = b.T @ t[r0:r1]
            num -= float(bt @ coef_y)
            den -= float(bt @ inv @ bt)
        if den <= 0:
            return self.chi2_continuum_only
        return self.chi2_continuum_only - num * num / den


def _broadening(model: _VisitModel, p: np.ndarray) -> float:
    """Extra rotational broadening (km/s) that best fits the spectrum at fixed labels and
    velocity, or 0. Line depths are free in this comparison (a template whose lines are too
    deep must not be "fixed" by smearing them out). Each step convolves one template spectrum
    (not the emulator), so slow rotators pay one step."""
    em = model.em
    labels, v = p[:3], float(p[3])
    flux = em.flux(labels)
    chi2_of = _FreeDepthChi2(model, model.continuum(p[4:]))
    _, _, lo, hi = model._positions(v)
    values, chi2s = [0.0], [chi2_of(labels, v, (0, flux))]
    n_fft = sp_fft.next_fast_len(flux.size)
    spec = sp_fft.rfft(flux - 1.0, n_fft)
    for vsini in _VSINI_STEPS:
        kernel = em.rotation_kernel(vsini)
        h = kernel.size // 2
        if lo - h < 0 or hi + h > em.n_pixels:
            break
        conv = np.roll(sp_fft.irfft(spec * sp_fft.rfft(kernel, n_fft), n_fft), -h)[:flux.size] + 1.0
        values.append(vsini)
        chi2s.append(chi2_of(labels, v, (0, conv)))
        if chi2s[-1] > min(chi2s[:-1]) - _BROADENING_DCHI2:
            break
    i = int(np.argmin(chi2s))
    if i == 0:
        return 0.0
    if i + 1 < len(values):
        x = np.array(values[i - 1:i + 2])
        y = np.array(chi2s[i - 1:i + 2])
        coef = np.polyfit(x, y, 2)
        if coef[0] > 0:
            return float(np.clip(-coef[1] / (2 * coef[0]), x[0], x[2]))
    return float(values[i])


def _fine_rv(model: _VisitModel, p: np.ndarray, sigma_v: float) -> tuple[float, bool]:
    """χ²(v) at fixed labels on 5 velocities within ±2σ (continuum re-solved at each)."""
    half = 2.0 * max(sigma_v, 0.02)
    vs = p[3] + np.linspace(-half, half, 5)
    grid = model.grid_flux(p[:3], float(vs[0]), float(vs[-1]))
    chi2 = np.array([model.solve_continuum(p[:3], float(v), grid)[1] for v in vs])
    i = int(np.argmin(chi2))
    if i == 0 or i == vs.size - 1:
        return float(p[3]), True
    coef = np.polyfit(vs[i - 1:i + 2] - vs[i], chi2[i - 1:i + 2], 2)
    if coef[0] <= 0:
        return float(vs[i]), False
    return float(vs[i] - coef[1] / (2 * coef[0])), False


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _barycentric(spectrum: Spectrum, flags: int) -> tuple[float, int]:
    meta = spectrum.meta
    if str(meta.get("frame", "observed")) == "rest":
        return 0.0, flags | DopplerFlag.REST_FRAME
    bc = meta.get("bc")
    if bc is not None and np.isfinite(float(bc)):
        return float(bc), flags
    try:
        ra, dec, jd = (float(meta[k]) for k in ("ra", "dec", "jd"))
        return barycentric_correction(ra, dec, jd, meta.get("telescope")), flags | DopplerFlag.BC_COMPUTED
    except (KeyError, TypeError, ValueError, DopplerError):
        return math.nan, flags | DopplerFlag.NO_BC


def _failed(prep_or_none: _Prepared | None, spectrum: Spectrum, flags: int, bc: float,
            message: str, **extra: Any) -> VisitRV:
    nan = math.nan
    snr = prep_or_none.snr if prep_or_none is not None else nan
    return VisitRV(vrel=nan, u_vrel=nan, teff=nan, u_teff=nan, logg=nan, u_logg=nan, fe_h=nan,
                   u_fe_h=nan, chisq=nan, bc=bc, vhelio=nan, flags=int(flags), snr=snr,
                   message=message, **extra)


@dataclass
class _VisitFit:
    """Internal full state of a visit fit (used by :func:`fit_star`)."""

    result: VisitRV
    prep: _Prepared | None = None
    model: _VisitModel | None = None
    lm: _LMResult | None = None


def _fit_visit_state(spectrum: Spectrum, emulators: list[Emulator], vrange: float) -> _VisitFit:
    prep = _prepare(spectrum, emulators, vrange)
    bc, flags = _barycentric(spectrum, prep.flags)
    if flags & DopplerFlag.LOW_GOOD_PIXELS:
        return _VisitFit(_failed(prep, spectrum, flags, bc, prep.message), prep)

    candidates = _ccf(prep, emulators, vrange)
    ccf = candidates[0]
    if ccf.edge:
        flags |= DopplerFlag.CCF_EDGE
        msg = (f"{prep.source}: correlation peak at {ccf.vrel:.1f} km/s is at the edge of the "
               f"±{vrange:g} km/s search range")
        return _VisitFit(_failed(prep, spectrum, flags, bc, msg, template=ccf.emulator.name,
                                 n_pixels=prep.ln_wave.size), prep)
    if ccf.significance < _NO_SIGNAL:
        flags |= DopplerFlag.NO_SIGNAL
        msg = (f"{prep.source}: no significant correlation with any template "
               f"(peak significance {ccf.significance:.1f} < {_NO_SIGNAL:g})")
        return _VisitFit(_failed(prep, spectrum, flags, bc, msg, template=ccf.emulator.name,
                                 n_pixels=prep.ln_wave.size), prep)
    # Fit the best template. Then also fit (a) templates whose CCF is almost as good but puts
    # the star elsewhere (broad-lined hot stars can fool the coarse CCF), and (b) when the fit
    # is doubtful, the best template of every other family; keep the lowest reduced χ².
    fits: list[tuple[float, int, _VisitModel, _LMResult, np.ndarray, _CCFResult]] = []
    tried: list[_CCFResult] = []
    errors: list[str] = []

    def attempt(cand: _CCFResult) -> None:
        tried.append(cand)
        try:
            model, res, free = _fit_candidate(prep, emulators, cand, vrange)
        except DopplerError as exc:
            errors.append(str(exc))
            return
        dof = max(model.n_used - int(free.sum()), 1)
        fits.append((res.chi2 / dof, len(fits), model, res, free, cand))

    attempt(ccf)
    v_first = fits[0][3].p[3] if fits else ccf.vrel
    for cand in candidates[1:]:
        if len(tried) >= _MAX_TEMPLATE_FITS or cand.chi2 - ccf.chi2 > _AMBIGUOUS_DCHI2:
            break
        far = abs(cand.vrel - v_first) > max(3.0 * (cand.sigma_v + ccf.sigma_v), 3.0)
        if not cand.edge and far and all(abs(cand.vrel - t.vrel) > 3.0 for t in tried):
            attempt(cand)
    if not fits or _doubtful(fits[0][3], ccf.emulator, ccf):
        # Other families' best templates, and the next coarse template of the same family
        # (a different start in (Teff, logg) escapes a local minimum).
        for em in emulators:
            other = next((c for c in candidates if c.emulator is em and not c.edge), None)
            # Only families whose templates correlate about as well as the best one.
            if (other is not None and other.significance >= 0.5 * ccf.significance
                    and all(t.emulator is not em for t in tried)):
                attempt(other)
        settled = any(not _doubtful(f[3], f[5].emulator, f[5]) for f in fits)
        same = [c for c in candidates if c.emulator is ccf.emulator and not c.edge
                and all(c is not t for t in tried)]
        if same and not settled:
            attempt(same[0])
    if not fits:
        flags |= DopplerFlag.FIT_FAILED
        msg = f"{prep.source}: no template could be fitted ({'; '.join(errors)})"
        return _VisitFit(_failed(prep, spectrum, flags, bc, msg, template=ccf.emulator.name), prep)
    _, _, model, res, free, ccf = min(fits, key=lambda f: (f[0], f[1]))
    if ccf.significance < _WEAK_CCF:
        flags |= DopplerFlag.WEAK_CCF
    # Rotation: broader lines than the templates' bias the labels and, with the asymmetric
    # LSF, the velocity; find the broadening that lowers χ² and refit with it.
    vsini = _broadening(model, res.p)
    if vsini < _MIN_VSINI:
        vsini = 0.0
    else:
        try:
            broad = _VisitModel(prep, model.em, float(res.p[3]), vsini=vsini)
            broad.reject(model.rejected)
            lower, upper = _bounds(broad.em, broad.n_params, float(res.p[3]), vrange)
            res_b = _levenberg_marquardt(broad.residuals, res.p, free, lower, upper)
            if res_b.chi2 / max(broad.n_used, 1) < res.chi2 / max(model.n_used, 1):
                model, res = broad, res_b
            else:
                vsini = 0.0
        except DopplerError:
            vsini = 0.0
    emulator = model.em

    n = model.n_used
    dof = max(n - int(np.sum(free)), 1)
    chisq = res.chi2 / dof
    if not res.converged:
        flags |= DopplerFlag.NOT_CONVERGED
    if chisq > HIGH_CHISQ:
        flags |= DopplerFlag.HIGH_CHISQ
    if not np.all(np.isfinite(np.diag(res.cov)[:4])):
        flags |= DopplerFlag.FIT_FAILED
        return _VisitFit(_failed(prep, spectrum, flags, bc, f"{prep.source}: singular fit",
                                 template=emulator.name), prep)
    inflate = math.sqrt(max(chisq, 1.0))
    err = np.sqrt(np.diag(res.cov)[:4]) * inflate
    vrel, scan_edge = _fine_rv(model, res.p, float(err[3]))
    err = np.hypot(err, _floor_vector(model.em))
    if scan_edge:
        flags |= DopplerFlag.RV_SCAN_EDGE
    labels = res.p[:3]
    if _at_label_edge(emulator, labels):
        flags |= DopplerFlag.LABEL_AT_EDGE
    result = VisitRV(
        vrel=vrel, u_vrel=float(err[3]), teff=float(labels[0]), u_teff=float(err[0]),
        logg=float(labels[1]), u_logg=float(err[1]), fe_h=float(labels[2]), u_fe_h=float(err[2]),
        chisq=float(chisq), bc=bc, vhelio=vrel + bc, flags=int(flags), snr=prep.snr,
        template=emulator.name, n_pixels=int(n), ccf_vrel=float(ccf.vrel), vsini=vsini,
    )
    return _VisitFit(result, prep, model, res)


def fit_visit(spectrum: Spectrum, templates: Emulator | Sequence[Emulator], *,
              vrange: float = 1000.0) -> VisitRV:
    """Measure the radial velocity and coarse labels of one spectrum.

    ``templates`` is one emulator or a list of them (e.g. both Synspec families, or Synspec and
    generator-trained ones: the coarse CCF picks the family with the lower χ²). Problems with
    the data (too few good pixels, masked chips, a correlation peak at the edge of ±``vrange``,
    non-finite values) give a result with ``flags`` set and NaN for what could not be measured;
    input that cannot be fitted at all (not a Spectrum, wavelengths outside the templates,
    unsorted wavelengths) raises :class:`DopplerError`.
    """
    emulators = as_emulators(templates)
    if not (np.isfinite(vrange) and vrange > 0):
        raise DopplerError(f"vrange must be a positive number of km/s, got {vrange}")
    return _fit_visit_state(spectrum, emulators, vrange).result


#: Quantities with a calibrated error floor, in the order of the fit parameters.
FLOOR_NAMES: tuple[str, str, str, str] = ("teff", "logg", "fe_h", "vrel")


def error_floors(emulator: Emulator) -> dict[str, float]:
    """The emulator's systematic error floors (template mismatch), added in quadrature to the
    statistical errors: ``emulator.meta["error_floors"]``, 0 where uncalibrated."""
    stored = emulator.meta.get("error_floors") or {}
    out = {}
    for name in FLOOR_NAMES:
        value = stored.get(name)
        out[name] = float(value) if value is not None and np.isfinite(value) else 0.0
    return out


def _floor_vector(emulator: Emulator) -> np.ndarray:
    floors = error_floors(emulator)
    return np.array([floors[n] for n in FLOOR_NAMES])


def calibrate_error_floors(
    templates: Emulator | Sequence[Emulator],
    spectra: Sequence[tuple[Spectrum, float, Sequence[float]]], *, noise_free: bool = True,
) -> dict[str, float]:
    """Systematic error floors of a template set from spectra with known velocity and labels.

    ``spectra`` holds (spectrum, true vrel, true (Teff, logg, [Fe/H])). They should be
    renderings of stars the templates were not trained on, with hidden labels (rotation,
    macroturbulence, C, N, α) scattering as in real stars: what their errors show beyond noise
    is template mismatch. For noise-free spectra (the default) the floor is the robust σ
    (1.4826 MAD) of the errors; otherwise the median formal error is removed in quadrature.
    """
    emulators = as_emulators(templates)
    saved = [e.meta.pop("error_floors", None) for e in emulators]
    try:
        results = [(fit_visit(s, emulators), v, lab) for s, v, lab in spectra]
    finally:
        for e, value in zip(emulators, saved, strict=True):
            if value is not None:
                e.meta["error_floors"] = value
    good = [(r, v, lab) for r, v, lab in results if r.ok]
    if len(good) < 10:
        raise DopplerError(f"calibrate_error_floors: only {len(good)} of {len(results)} spectra gave a velocity")
    delta = {
        "teff": [r.teff - lab[0] for r, _, lab in good], "logg": [r.logg - lab[1] for r, _, lab in good],
        "fe_h": [r.fe_h - lab[2] for r, _, lab in good], "vrel": [r.vrel - v for r, v, _ in good],
    }
    formal = {"teff": [r.u_teff for r, _, _ in good], "logg": [r.u_logg for r, _, _ in good],
              "fe_h": [r.u_fe_h for r, _, _ in good], "vrel": [r.u_vrel for r, _, _ in good]}
    floors = {}
    for name in FLOOR_NAMES:
        d = np.asarray(delta[name])
        robust = 1.4826 * float(np.median(np.abs(d - np.median(d))))
        if noise_free:
            floors[name] = robust
        else:
            floors[name] = math.sqrt(max(robust**2 - float(np.median(formal[name])) ** 2, 0.0))
    return floors


# ---------------------------------------------------------------------------------------------
# Joint fit over the visits of one star
# ---------------------------------------------------------------------------------------------

def _joint_normal(models: list[_VisitModel]) -> Any:
    """Normal equations of the joint problem: common labels, per-visit v and continuum.

    Parameter layout: ``[teff, logg, fe_h, v_1 .. v_N, a_1 .., a_N ..]``; the matrix is built
    block by block so memory stays O(pixels of one visit).
    """
    n_vis = len(models)
    offsets = np.cumsum([3 + n_vis] + [m.n_cont for m in models])
    n_par = int(offsets[-1])

    def split(p: np.ndarray, i: int) -> np.ndarray:
        a0 = int(offsets[i])
        return np.concatenate([p[:3], p[3 + i:4 + i], p[a0:a0 + models[i].n_cont]])

    def fun(p: np.ndarray, normal: bool = True) -> tuple[float, Any, Any, np.ndarray]:
        chi2 = 0.0
        a_mat = np.zeros((n_par, n_par)) if normal else None
        g = np.zeros(n_par) if normal else None
        for i, model in enumerate(models):
            r, jac = model.residuals(split(p, i), normal)
            chi2 += float(r @ r)
            if not normal:
                continue
            assert a_mat is not None and g is not None and jac is not None
            a0 = int(offsets[i])
            cols = np.r_[0:3, 3 + i, a0:a0 + model.n_cont]
            a_mat[np.ix_(cols, cols)] += jac.T @ jac
            g[cols] += jac.T @ r
        return chi2, a_mat, g, np.empty(0)

    return fun, split, offsets


def _star_failed(visits: list[VisitRV], flags: int, message: str) -> StarRV:
    nan = math.nan
    return StarRV(visits=visits, vhelio=nan, u_vhelio=nan, vscatter=nan, teff=nan, u_teff=nan,
                  logg=nan, u_logg=nan, fe_h=nan, u_fe_h=nan, chisq=nan, n_visits=len(visits),
                  n_good_visits=0, flags=int(flags), message=message)


def fit_star(visits: Sequence[Spectrum], templates: Emulator | Sequence[Emulator], *,
             vrange: float = 1000.0) -> StarRV:
    """Joint fit of all visits of one star: common (Teff, logg, [Fe/H]), one RV per visit.

    Each visit is first fitted alone (:func:`fit_visit`); visits whose velocity could be
    measured then enter one least-squares problem with shared labels and per-visit velocity
    and continuum, started from the individual solutions, on the template family of the
    highest-S/N visit. The stellar ``vhelio`` is the inverse-variance weighted mean of the
    visits' ``vhelio``, ``vscatter`` their standard deviation (NaN with fewer than two).
    Visits that could not be measured keep their individual, flagged result.
    """
    emulators = as_emulators(templates)
    spectra = list(visits)
    if not spectra:
        raise DopplerError("fit_star needs at least one visit")
    if not (np.isfinite(vrange) and vrange > 0):
        raise DopplerError(f"vrange must be a positive number of km/s, got {vrange}")
    states = [_fit_visit_state(s, emulators, vrange) for s in spectra]
    results = [st.result for st in states]
    good = [i for i, st in enumerate(states) if st.result.ok and st.model is not None]
    all_flags = 0
    for r in results:
        all_flags |= r.flags
    if not good:
        return _star_failed(results, all_flags | DopplerFlag.NO_GOOD_VISITS, "no visit gave a velocity")

    ref = max(good, key=lambda i: (np.nan_to_num(results[i].snr), -i))
    ref_model = states[ref].model
    assert ref_model is not None
    emulator, vsini = ref_model.em, ref_model.vsini
    models = []
    for i in good:
        st = states[i]
        assert st.model is not None and st.prep is not None
        if st.model.em is emulator and st.model.vsini == vsini:
            models.append(st.model)
        else:  # the visit's own fit used another family or broadening: same pixels, same rejections
            other = _VisitModel(st.prep, emulator, results[i].vrel, vsini=vsini)
            other.reject(st.model.rejected)
            models.append(other)
    same = [i for i in good if results[i].template == emulator.name]
    w = np.array([1.0 / results[i].u_teff ** 2 for i in same])
    labels0 = np.array([[results[i].teff, results[i].logg, results[i].fe_h] for i in same])
    start = emulator.clip(np.average(labels0, axis=0, weights=w / w.sum()))

    fun, split, offsets = _joint_normal(models)
    p0 = np.zeros(int(offsets[-1]))
    p0[:3] = start
    lower = np.full(p0.size, -np.inf)
    upper = np.full(p0.size, np.inf)
    lower[:3], upper[:3] = emulator.ranges[:, 0], emulator.ranges[:, 1]
    for k, (i, model) in enumerate(zip(good, models, strict=True)):
        p0[3 + k] = results[i].vrel
        lower[3 + k], upper[3 + k] = -vrange, vrange
        coef, _ = model.solve_continuum(start, results[i].vrel)
        p0[int(offsets[k]):int(offsets[k]) + model.n_cont] = coef
    try:
        res = _lm_normal(fun, p0, np.ones(p0.size, dtype=bool), lower, upper)
    except DopplerError as exc:
        return _star_failed(results, all_flags | DopplerFlag.FIT_FAILED, f"joint fit failed: {exc}")
    n_pix = sum(m.n_used for m in models)
    chisq = res.chi2 / max(n_pix - p0.size, 1)
    var = np.diag(res.cov)
    if not np.all(np.isfinite(var[:3 + len(good)])):
        return _star_failed(results, all_flags | DopplerFlag.FIT_FAILED, "joint fit is singular")
    inflate = math.sqrt(max(chisq, 1.0))
    # Template mismatch does not average down over visits: the floors apply to the star too.
    u_labels = np.hypot(np.sqrt(var[:3]) * inflate, _floor_vector(emulator)[:3])
    star_flags = 0
    if not res.converged:
        star_flags |= DopplerFlag.NOT_CONVERGED
    if chisq > HIGH_CHISQ:
        star_flags |= DopplerFlag.HIGH_CHISQ
    if _at_label_edge(emulator, res.p[:3]):
        star_flags |= DopplerFlag.LABEL_AT_EDGE

    for k, (i, model) in enumerate(zip(good, models, strict=True)):
        p_i = split(res.p, k)
        r_i, _ = model.residuals(p_i, False)
        chisq_i = float(r_i @ r_i) / max(model.n_used - model.n_cont - 1, 1)
        u_v = float(math.sqrt(var[3 + k]) * math.sqrt(max(chisq_i, 1.0)))
        vrel, scan_edge = _fine_rv(model, p_i, u_v)
        u_v = math.hypot(u_v, error_floors(emulator)["vrel"])
        old = results[i]
        flags = (old.flags & ~int(DopplerFlag.LABEL_AT_EDGE | DopplerFlag.NOT_CONVERGED
                                  | DopplerFlag.HIGH_CHISQ | DopplerFlag.RV_SCAN_EDGE)) | star_flags
        if scan_edge:
            flags |= DopplerFlag.RV_SCAN_EDGE
        results[i] = VisitRV(
            vrel=vrel, u_vrel=u_v, teff=float(res.p[0]), u_teff=float(u_labels[0]),
            logg=float(res.p[1]), u_logg=float(u_labels[1]), fe_h=float(res.p[2]),
            u_fe_h=float(u_labels[2]), chisq=chisq_i, bc=old.bc, vhelio=vrel + old.bc,
            flags=int(flags), snr=old.snr, template=emulator.name, n_pixels=model.n_used,
            ccf_vrel=old.ccf_vrel, vsini=vsini,
        )

    vh = np.array([results[i].vhelio for i in good])
    uv = np.array([results[i].u_vrel for i in good])
    ok = np.isfinite(vh) & np.isfinite(uv) & (uv > 0)
    if np.any(ok):
        wv = 1.0 / uv[ok] ** 2
        vhelio = float(np.sum(wv * vh[ok]) / np.sum(wv))
        u_vhelio = float(math.sqrt(1.0 / np.sum(wv)))
    else:
        vhelio = u_vhelio = math.nan
        star_flags |= DopplerFlag.NO_BC
    vscatter = float(np.std(vh[ok])) if ok.sum() >= 2 else math.nan
    for r in results:
        star_flags |= r.flags & ~int(FATAL_FLAGS)
    return StarRV(
        visits=results, vhelio=vhelio, u_vhelio=u_vhelio, vscatter=vscatter,
        teff=float(res.p[0]), u_teff=float(u_labels[0]), logg=float(res.p[1]),
        u_logg=float(u_labels[1]), fe_h=float(res.p[2]), u_fe_h=float(u_labels[2]),
        chisq=float(chisq), n_visits=len(results), n_good_visits=len(good), flags=int(star_flags),
        template=emulator.name, vsini=vsini,
    )
