"""Synthetic data releases with known truth: apVisit files, the apStar files the data-reduction
pipeline would make from them, truth tables, and a manifest written last.

Layout of ``directory/release/``::

    apVisit/apVisit-<tel>-<mjd>-<fiber>-<source>.fits   observed frame, 3 × 4096, native layout
    apStar/apStar-<source>.fits                         rest frame, [pixel stack, global stack, visits]
    truth_sources.csv  truth_visits.csv                 labels, velocities, S/N, epochs
    manifest.json                                       written last, atomically

Names and contents never mention the release, so a source whose visits did not change has
byte-identical files (and the same fingerprint) in every later release.

Per visit (methods.md §3.4-3.5): the star's spectrum from :mod:`astra_dagster.spectra.synth`
(``RELEASE_SETTINGS``: fiber-dependent R, asymmetric LSF) shifted by ``v_rel = v_bary − BC``
(cheap barycentric correction from RA/Dec/JD, ~15 % of stars in binaries), times the
H⁻-flattened continuum, extinction and a per-visit chip throughput, through telluric absorption
(corrected with a 4 % model error) with OH sky lines (subtracted with 3 % residuals and their
Poisson noise), noise from a visit S/N, and the APOGEE_PIXMASK defects at DR17-like rates
(fixed detector maps per telescope, persistence on the APO blue chip, cosmic rays, ...).

Random streams: source ``i`` of a release with seed ``s`` draws its properties from
``SeedSequence([s, SOURCE, i])`` and its visit ``k`` from ``SeedSequence([s', VISIT, i, k])``
where ``s'`` is the seed of the release that added the visit. Training sets
(:func:`synth.make_training_set`) use a different tag, so they never share draws with releases.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from astra_dagster import __version__
from astra_dagster.spectra import synth
from astra_dagster.spectra.apogee import open_fits, write_apstar, write_apvisit
from astra_dagster.spectra.bitmask import BAD_PIXELS, flag
from astra_dagster.spectra.manifest import (
    MANIFEST_NAME,
    ManifestError,
    ReleaseFile,
    ReleaseSource,
    file_entry,
    read_manifest,
    write_manifest,
)
from astra_dagster.spectra.spectrum import APSTAR_NPIX, C_KMS, apstar_wavelength

GENERATOR = f"astra_dagster.spectra.release {__version__} / {synth.GENERATOR_VERSION}"
TRUTH_SOURCES = "truth_sources.csv"
TRUTH_VISITS = "truth_visits.csv"

_SOURCE_TAG = 0x736F_7572  # "sour"
_VISIT_TAG = 0x7669_7369   # "visi"
_EXTEND_TAG = 0x6578_7465  # "exte"

NPIX_VISIT = 4096
#: apVisit rows: 0 = chip a (red), 1 = b (green), 2 = c (blue); wavelength decreasing (methods §1.3).
CHIP_RANGES = ((16473.0, 16955.0), (15857.0, 16435.0), (15142.0, 15810.0))
TELESCOPES = {"apo25m": (32.7803, 0.0), "lco25m": (-29.0146, -3.0)}  # latitude, λ offset of chips (Å)
#: σ multiplier of bad pixels in apStar files (DR17: err inflated ~1e10×, flux kept).
BAD_SIGMA_FACTOR = 1e10
#: Stack S/N distribution: 85 % lognormal around 80, 15 % log-uniform 10-300.
_SNR_MEDIAN = 80.0

_BAD_FLAGS = {name: flag(name) for name in ("BADPIX", "CRPIX", "SATPIX", "BADDARK", "BADFLAT", "NOSKY",
                                            "LITTROW_GHOST", "PERSIST_HIGH", "PERSIST_MED", "PERSIST_LOW",
                                            "SIG_SKYLINE", "SIG_TELLURIC", "NOT_ENOUGH_PSF")}


class ReleaseError(ValueError):
    """A release cannot be generated or extended; the message names the folder and the problem."""


# ----------------------------------------------------------------------------- source model


@dataclass(frozen=True)
class SourceTruth:
    """Everything fixed about a source (drawn from its own stream)."""

    index: int
    seed: int
    source_id: str
    kind: str
    ra: float
    dec: float
    telescope: str
    labels: dict[str, float]
    h_mag: float
    a_h: float
    v_sys: float
    k_amp: float          # binary semi-amplitude, km/s (0: single)
    period: float         # days
    phase0: float
    snr_visit: float      # typical visit S/N
    n_visits: int         # visits in the release that created the source
    jd0: float


@dataclass
class Visit:
    """One rendered visit: native arrays (3, 4096) and its truth."""

    source_id: str
    visit: int            # 1-based
    seed: int
    jd: float
    fiber: int
    bc: float
    v_bary: float
    vrel: float
    snr: float
    airmass: float
    wavelength: np.ndarray
    flux: np.ndarray
    sigma: np.ndarray
    flags: np.ndarray
    model: np.ndarray | None = None   # noiseless expected flux (tests)
    telescope: str = "apo25m"
    file: str = ""

    @property
    def mjd(self) -> int:
        return math.floor(self.jd - 2400000.5)


def source_name(ra: float, dec: float) -> str:
    """2MASS-style identifier ``2MHHMMSSss±DDMMSSs`` from coordinates in degrees."""
    ra_h = (ra % 360.0) / 15.0
    hh = int(ra_h)
    mm = int((ra_h - hh) * 60)
    ss = (ra_h - hh - mm / 60.0) * 3600.0
    cs = min(round(ss * 100), 5999)
    sign = "+" if dec >= 0 else "-"
    ad = abs(dec)
    dd = int(ad)
    dm = int((ad - dd) * 60)
    ds = min(round((ad - dd - dm / 60.0) * 36000), 599)
    return f"2M{hh:02d}{mm:02d}{cs:04d}{sign}{dd:02d}{dm:02d}{ds:03d}"


def _draw_source(seed: int, index: int) -> SourceTruth:
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, _SOURCE_TAG, index]))
    labels, kind = synth.draw_labels_with_kind(1, rng, "survey", hidden_scatter=True)
    lab = {k: float(v[0]) for k, v in labels.items()}
    telescope = "apo25m" if rng.random() < 0.8 else "lco25m"
    lo, hi = (-25.0, 75.0) if telescope == "apo25m" else (-85.0, 15.0)
    dec = math.degrees(math.asin(rng.uniform(math.sin(math.radians(lo)), math.sin(math.radians(hi)))))
    ra = float(rng.uniform(0.0, 360.0))
    n_visits = int(rng.choice(np.arange(1, 9), p=[0.30, 0.20, 0.18, 0.10, 0.08, 0.06, 0.05, 0.03]))
    if rng.random() < 0.85:
        stack = _SNR_MEDIAN * math.exp(rng.normal(0.0, 0.8))
    else:
        stack = math.exp(rng.uniform(math.log(10.0), math.log(300.0)))
    stack = float(np.clip(stack, 8.0, 450.0))
    snr_visit = max(stack / math.sqrt(n_visits), 4.0)
    binary = rng.random() < 0.15
    return SourceTruth(
        index=index, seed=seed, source_id=source_name(ra, dec), kind=str(kind[0]), ra=ra, dec=dec,
        telescope=telescope, labels=lab,
        h_mag=float(11.0 - 5.0 * math.log10(snr_visit / 100.0) + rng.normal(0.0, 0.1)),
        a_h=float(rng.exponential(0.15)), v_sys=float(rng.normal(0.0, 50.0)),
        k_amp=float(rng.uniform(3.0, 25.0)) if binary else 0.0,
        period=float(math.exp(rng.uniform(math.log(5.0), math.log(1000.0)))) if binary else 0.0,
        phase0=float(rng.uniform(0.0, 1.0)), snr_visit=float(snr_visit), n_visits=n_visits,
        jd0=round(float(2459200.5 + rng.uniform(0.0, 1200.0)), 6),
    )


def _v_bary(src: SourceTruth, jd: float) -> float:
    if src.k_amp == 0.0:
        return src.v_sys
    return src.v_sys + src.k_amp * math.sin(2.0 * math.pi * ((jd - 2459000.5) / src.period + src.phase0))


def barycentric_correction(ra: float, dec: float, jd: float, latitude: float = 32.78,
                           hour_angle_h: float = 0.0) -> float:
    """Cheap barycentric correction (km/s, positive when the observer moves towards the star):
    Earth's orbital velocity 29.78 cos β sin(λ☉ − λ) (plus eccentricity) and the diurnal term
    (methods.md §3.4); agrees with astropy's exact value to ~0.1 km/s."""
    eps = math.radians(23.4393)
    a, d = math.radians(ra), math.radians(dec)
    sin_beta = math.sin(d) * math.cos(eps) - math.cos(d) * math.sin(eps) * math.sin(a)
    beta = math.asin(max(-1.0, min(1.0, sin_beta)))
    lam = math.atan2(math.sin(a) * math.cos(eps) + math.tan(d) * math.sin(eps), math.cos(a))
    n = jd - 2451545.0
    g = math.radians(357.528 + 0.9856003 * n)
    lam_sun = math.radians(280.460 + 0.9856474 * n + 1.915 * math.sin(g) + 0.020 * math.sin(2 * g))
    # Earth's orbital velocity incl. the eccentricity term (e = 0.0167, solar perigee at 282.94°)
    orbital = 29.78 * math.cos(beta) * (math.sin(lam_sun - lam) + 0.0167 * math.sin(math.radians(282.94) - lam))
    diurnal = -0.465 * math.cos(math.radians(latitude)) * math.cos(d) * math.sin(hour_angle_h * math.pi / 12)
    return orbital + diurnal


# ----------------------------------------------------------------------------- instrument


@lru_cache(maxsize=4)
def native_wavelength(telescope: str) -> np.ndarray:
    """Nominal (3, 4096) vacuum wavelength solution of a telescope's spectrograph (decreasing)."""
    offset = TELESCOPES[telescope][1]
    p = np.arange(NPIX_VISIT) / (NPIX_VISIT - 1.0)
    rows = []
    for lo, hi in CHIP_RANGES:
        # slightly non-linear dispersion, as in the real solutions
        rows.append(hi + offset - (hi - lo) * p - 0.04 * (hi - lo) * p * (1.0 - p))
    return np.array(rows)


def _visit_wavelength(telescope: str, dither_px: float) -> np.ndarray:
    base = native_wavelength(telescope)
    step = np.gradient(base, axis=1)
    return base + dither_px * step


@lru_cache(maxsize=4)
def _detector_flags(telescope: str) -> np.ndarray:
    """Fixed detector defects of a telescope's spectrograph (3, 4096): bad, dark, flat, Littrow."""
    rng = np.random.default_rng(0xDE7EC7 + (0 if telescope == "apo25m" else 1))
    flags = np.zeros((3, NPIX_VISIT), dtype=np.int64)
    for name, rate in (("BADPIX", 0.018), ("BADDARK", 0.011), ("BADFLAT", 0.014)):
        _runs(flags, rng, _BAD_FLAGS[name], rate, max_len=4)
    for row, start in ((2, 1210), (1, 2840), (0, 600)):  # Littrow ghosts at fixed places
        flags[row, start: start + 29] |= _BAD_FLAGS["LITTROW_GHOST"]
    return flags


def _runs(flags: np.ndarray, rng: np.random.Generator, bit: int, rate: float, max_len: int) -> None:
    """Set ``bit`` on random runs of 1..max_len pixels covering about ``rate`` of the pixels."""
    n_runs = round(rate * flags.size / ((1 + max_len) / 2.0))
    rows = rng.integers(0, flags.shape[0], n_runs)
    starts = rng.integers(0, flags.shape[1], n_runs)
    lengths = rng.integers(1, max_len + 1, n_runs)
    for r, s, n in zip(rows, starts, lengths, strict=True):
        flags[r, s: s + n] |= bit


@lru_cache(maxsize=1)
def _sky_lines() -> tuple[np.ndarray, np.ndarray]:
    """Airglow OH emission lines (observed frame, vacuum Å) and relative strengths."""
    rng = np.random.default_rng(0x5C7)
    wave = np.sort(rng.uniform(15100.0, 17000.0, 130))
    strength = np.exp(rng.uniform(np.log(0.3), np.log(40.0), wave.size))
    return wave, strength


@lru_cache(maxsize=1)
def _telluric_lines() -> tuple[np.ndarray, np.ndarray]:
    """Telluric absorption lines (H2O at the band edges, CO2 near 1.57-1.61 µm, CH4 near
    1.63-1.67 µm): observed-frame wavelengths and optical depths at airmass 1."""
    rng = np.random.default_rng(0x7E11)
    parts = [rng.uniform(15100.0, 15350.0, 70), rng.uniform(16800.0, 17000.0, 60),
             rng.uniform(15700.0, 16100.0, 60), rng.uniform(16300.0, 16700.0, 50),
             rng.uniform(15100.0, 17000.0, 40)]
    wave = np.sort(np.concatenate(parts))
    tau = np.exp(rng.uniform(np.log(0.01), np.log(0.5), wave.size))
    return wave, tau


def _line_field(wave: np.ndarray, centres: np.ndarray, amplitude: np.ndarray, sigma_kms: float) -> np.ndarray:
    """Sum of Gaussians (peak = amplitude) at ``centres`` evaluated on ``wave`` (any order)."""
    out = np.zeros(wave.shape)
    flat = wave.ravel()
    order = np.argsort(flat)
    sw = flat[order]
    acc = np.zeros(flat.size)
    for c, a in zip(centres, amplitude, strict=True):
        s = c * sigma_kms / C_KMS
        lo, hi = np.searchsorted(sw, [c - 5 * s, c + 5 * s])
        if hi > lo:
            acc[lo:hi] += a * np.exp(-0.5 * ((sw[lo:hi] - c) / s) ** 2)
    out.ravel()[order] = acc
    return out.reshape(wave.shape)


def _dilate(mask: np.ndarray, n: int) -> np.ndarray:
    out = mask.copy()
    for k in range(1, n + 1):
        out[:, k:] |= mask[:, :-k]
        out[:, :-k] |= mask[:, k:]
    return out


def render_visit(src: SourceTruth, visit: int, seed: int, jd: float, *, keep_model: bool = False) -> Visit:
    """Render visit ``visit`` (1-based) of a source at ``jd`` from stream (seed, VISIT, index, visit)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, _VISIT_TAG, src.index, visit]))
    lat = TELESCOPES[src.telescope][0]
    fiber = int(rng.integers(1, 301))
    hour_angle = float(rng.uniform(-2.5, 2.5))
    airmass = float(1.0 / max(math.cos(math.radians(abs(lat - src.dec))) * math.cos(hour_angle * math.pi / 12),
                              0.45))
    bc = barycentric_correction(src.ra, src.dec, jd, lat, hour_angle)
    v_bary = _v_bary(src, jd)
    vrel = v_bary - bc
    snr = float(np.clip(src.snr_visit * math.exp(rng.normal(0.0, 0.25)), 3.0, 600.0))
    wave = _visit_wavelength(src.telescope, float(rng.uniform(-0.5, 0.5)))
    flat = wave.ravel()
    rest = flat / (1.0 + vrel / C_KMS)
    norm = synth.synthesize(src.labels, flat, synth.RELEASE_SETTINGS, rv_kms=vrel, fiber=fiber)
    scale = 830.0 * 10.0 ** (-0.4 * (src.h_mag - 10.3))
    extinction = 10.0 ** (-0.4 * src.a_h * (rest / 16500.0) ** -2.0)
    star = (norm * synth.continuum(src.labels, rest) * extinction * scale).reshape(wave.shape)
    x = np.linspace(-1.0, 1.0, NPIX_VISIT)
    throughput = np.array([math.exp(rng.normal(0.0, 0.08)) * (1 + rng.normal(0.0, 0.04) * x
                                                              + rng.normal(0.0, 0.03) * x * x)
                           for _ in range(3)]) * np.array([[1.05], [1.0], [0.92]])
    obj = star * throughput
    lsf_kms = C_KMS / synth.fiber_resolving_power(fiber) / 2.3548
    t_wave, t_tau = _telluric_lines()
    tau = airmass * _line_field(wave, t_wave, t_tau, lsf_kms)
    transmission = np.exp(-tau)
    model_error = rng.normal(0.0, 0.04)
    correction = np.exp(-tau * (1.0 + model_error))
    s_wave, s_amp = _sky_lines()
    cmed = float(np.median(obj[1]))
    sky_level = cmed * 10.0 ** (0.4 * (src.h_mag - 13.5)) * math.exp(rng.normal(0.0, 0.3))
    sky = _line_field(wave, s_wave, s_amp * sky_level, lsf_kms)
    sky_residual = _line_field(wave, s_wave, s_amp * sky_level * rng.normal(0.0, 0.03, s_wave.size), lsf_kms)
    # Noise: Poisson-like in the object (σ ∝ √F), plus the subtracted sky's photons.
    unit = cmed / snr
    var = unit**2 * (np.clip(obj * transmission, 0.0, None) / cmed + sky / cmed + 1e-4)
    noise = rng.normal(size=wave.shape) * np.sqrt(var)
    flux = (obj * transmission + noise + sky_residual) / correction
    sigma = np.sqrt(var) / correction
    model = obj * transmission / correction

    flags = _detector_flags(src.telescope).copy()
    per_visit = np.zeros_like(flags)
    _runs(per_visit, rng, _BAD_FLAGS["NOT_ENOUGH_PSF"], 0.015, max_len=5)
    cosmic = np.zeros_like(flags)
    _runs(cosmic, rng, _BAD_FLAGS["CRPIX"], 0.002, max_len=2)
    flags |= per_visit | cosmic
    if rng.random() < 0.12:  # a stretch without usable sky fibers
        row, start = int(rng.integers(0, 3)), int(rng.integers(0, NPIX_VISIT - 700))
        flags[row, start: start + 700] |= _BAD_FLAGS["NOSKY"]
    persist = 0.0
    if src.telescope == "apo25m" and fiber > 200:  # APOGEE-N blue-chip persistence
        level = float(rng.uniform(0.0, 1.0))
        bit = "PERSIST_HIGH" if level > 0.85 else ("PERSIST_MED" if level > 0.55 else "PERSIST_LOW")
        end = int(rng.integers(900, 1800))
        flags[2, :end] |= _BAD_FLAGS[bit]
        persist = 0.02 + 0.06 * level
        flux[2, :end] += persist * cmed * np.linspace(1.0, 0.3, end)
    flags |= np.where(_dilate(sky > obj, 2), _BAD_FLAGS["SIG_SKYLINE"], 0)
    flags |= np.where(1.0 - transmission > 0.04, _BAD_FLAGS["SIG_TELLURIC"], 0)
    # Defective pixels carry wrong values: flagged, σ not inflated (apVisit convention).
    broken = (flags & (_BAD_FLAGS["BADPIX"] | _BAD_FLAGS["BADDARK"] | _BAD_FLAGS["BADFLAT"])) != 0
    flux = np.where(broken, flux * rng.normal(1.0, 0.3, flux.shape), flux)
    hit = (flags & _BAD_FLAGS["CRPIX"]) != 0
    flux = np.where(hit, flux + sigma * rng.uniform(5.0, 40.0, flux.shape), flux)
    psf = (flags & _BAD_FLAGS["NOT_ENOUGH_PSF"]) != 0
    flux = np.where(psf, flux * 0.9, flux)
    good = (flags[1] & BAD_PIXELS) == 0
    header_snr = float(np.median(model[1][good] / sigma[1][good]))
    name = f"apVisit-{src.telescope}-{math.floor(jd - 2400000.5)}-{fiber:03d}-{src.source_id}.fits"
    return Visit(source_id=src.source_id, visit=visit, seed=seed, jd=jd, fiber=fiber, bc=bc, v_bary=v_bary,
                 vrel=vrel, snr=header_snr, airmass=airmass, wavelength=wave,
                 flux=flux.astype(np.float32), sigma=sigma.astype(np.float32),
                 flags=flags.astype(np.int16), model=model if keep_model else None,
                 telescope=src.telescope, file=name)


def _next_jd(rng_seed: int, index: int, visit: int, previous: float) -> float:
    rng = np.random.default_rng(np.random.SeedSequence([rng_seed & 0xFFFFFFFF, _VISIT_TAG, index, visit, 1]))
    # JDs are quantised to 1e-6 d so that the truth table reproduces every visit exactly
    return round(previous + 1.0 + float(rng.exponential(40.0)) + float(rng.uniform(0.6, 0.9)), 6)


# ----------------------------------------------------------------------------- apStar


def _resample_visit(v: Visit) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shift a visit to the rest frame and resample it on the apStar grid (Keys cubic in native
    pixels; σ propagated with the squared weights; flags of the two nearest pixels OR-ed)."""
    grid = apstar_wavelength()
    flux = np.zeros(APSTAR_NPIX)
    sigma = np.zeros(APSTAR_NPIX)
    flags = np.zeros(APSTAR_NPIX, dtype=np.int64)
    covered = np.zeros(APSTAR_NPIX, dtype=bool)
    factor = 1.0 + v.vrel / C_KMS
    for row in range(3):
        w = v.wavelength[row][::-1].astype(float) / factor
        f = v.flux[row][::-1].astype(float)
        s = v.sigma[row][::-1].astype(float)
        m = v.flags[row][::-1].astype(np.int64)
        inside = np.flatnonzero((grid > w[2]) & (grid < w[-3]))
        x = np.interp(np.log10(grid[inside]), np.log10(w), np.arange(w.size, dtype=float))
        i = np.floor(x).astype(np.intp)
        t = x - i
        weights = np.stack([-0.5 * t**3 + t**2 - 0.5 * t, 1.5 * t**3 - 2.5 * t**2 + 1.0,
                            -1.5 * t**3 + 2.0 * t**2 + 0.5 * t, 0.5 * t**3 - 0.5 * t**2])
        idx = np.stack([i - 1, i, i + 1, i + 2])
        flux[inside] = np.sum(weights * f[idx], axis=0)
        sigma[inside] = np.sqrt(np.sum(weights**2 * s[idx] ** 2, axis=0))
        flags[inside] = m[i] | m[i + 1]
        covered[inside] = True
    return flux, sigma, flags, covered


def build_apstar(visits: Sequence[Visit]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The apStar rows a DRP would make from the visits: for N > 1 [pixel-weighted stack,
    global (S/N²)-weighted stack, visits...], for N = 1 one row. Visits are scaled chip by chip to
    a common flux level first; stacks are NaN outside the chips; bad pixels keep their flux with σ
    inflated; stack flags: bad bits where no visit is good, warning bits OR-ed."""
    if not visits:
        raise ReleaseError("an apStar needs at least one visit")
    rows = [_resample_visit(v) for v in visits]
    grid_pix = [np.arange(a, b + 1) for a, b in synth.APSTAR_CHIP_PIXELS]
    weights = np.array([v.snr**2 for v in visits])
    # Common flux level per chip: S/N²-weighted mean of the visits' chip medians.
    for chip in grid_pix:
        meds = []
        for flux, _, flags, covered in rows:
            ok = covered[chip] & ((flags[chip] & BAD_PIXELS) == 0)
            meds.append(float(np.median(flux[chip][ok])) if ok.sum() > 50 else float("nan"))
        meds_arr = np.array(meds)
        fine = np.isfinite(meds_arr) & (meds_arr > 0)
        if not fine.any():
            continue
        target = float(np.sum(weights[fine] * meds_arr[fine]) / np.sum(weights[fine]))
        for (flux, sigma, _, _), med, ok in zip(rows, meds_arr, fine, strict=True):
            if ok:
                flux[chip] *= target / med
                sigma[chip] *= target / med
    flux = np.array([r[0] for r in rows])
    sigma = np.array([r[1] for r in rows])
    flags = np.array([r[2] for r in rows])
    covered = np.array([r[3] for r in rows])
    bad = (flags & BAD_PIXELS) != 0
    usable = covered & ~bad & (sigma > 0)
    visit_sigma = np.where(bad & covered, sigma * BAD_SIGMA_FACTOR, sigma)
    any_cover = covered.any(axis=0)
    n_good = usable.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ivar = np.where(usable, 1.0 / np.where(usable, sigma, 1.0) ** 2, 0.0)
        pix_flux = np.sum(ivar * flux, axis=0) / np.sum(ivar, axis=0)
        pix_sigma = 1.0 / np.sqrt(np.sum(ivar, axis=0))
        w = np.where(usable, weights[:, None], 0.0)
        glob_flux = np.sum(w * flux, axis=0) / np.sum(w, axis=0)
        glob_sigma = np.sqrt(np.sum(w**2 * sigma**2, axis=0)) / np.sum(w, axis=0)
        fallback = np.sum(np.where(covered, flux, 0.0), axis=0) / covered.sum(axis=0)
        fallback_sigma = np.sqrt(np.sum(np.where(covered, sigma**2, 0.0), axis=0)) / covered.sum(axis=0)
    none_good = any_cover & (n_good == 0)
    for f, s in ((pix_flux, pix_sigma), (glob_flux, glob_sigma)):
        f[none_good] = fallback[none_good]
        s[none_good] = fallback_sigma[none_good] * BAD_SIGMA_FACTOR
        f[~any_cover] = np.nan
        s[~any_cover] = np.nan
    warn = np.bitwise_or.reduce(np.where(covered, flags & ~BAD_PIXELS, 0), axis=0)
    all_bad = np.bitwise_and.reduce(np.where(covered, flags & BAD_PIXELS, BAD_PIXELS), axis=0)
    stack_flags = warn | np.where(any_cover, all_bad, 0)
    visit_flux = np.where(covered, flux, 0.0)
    visit_sigma = np.where(covered, visit_sigma, 0.0)
    visit_flags = np.where(covered, flags, 0)
    if len(visits) == 1:
        return pix_flux[None, :], pix_sigma[None, :], stack_flags[None, :]
    return (np.vstack([pix_flux, glob_flux, visit_flux]), np.vstack([pix_sigma, glob_sigma, visit_sigma]),
            np.vstack([stack_flags, stack_flags, visit_flags]))


def stack_snr(visits: Sequence[Visit]) -> float:
    return float(math.sqrt(sum(v.snr**2 for v in visits)))


# ----------------------------------------------------------------------------- writing


def _visit_header(src: SourceTruth, v: Visit) -> dict[str, Any]:
    return {"APOGEE_ID": src.source_id, "TELESCOP": src.telescope, "RA": round(src.ra, 7),
            "DEC": round(src.dec, 7), "JD-MID": round(v.jd, 6), "MJD5": v.mjd, "MJD": v.mjd,
            "BC": round(v.bc, 5), "SNR": round(v.snr, 3), "FIBERID": v.fiber,
            "AIRMASS": round(v.airmass, 4), "HMAG": round(src.h_mag, 3)}


def _star_header(src: SourceTruth, visits: Sequence[Visit]) -> dict[str, Any]:
    header: dict[str, Any] = {"APOGEE_ID": src.source_id, "TELESCOP": src.telescope, "RA": round(src.ra, 7),
                              "DEC": round(src.dec, 7), "HMAG": round(src.h_mag, 3),
                              "NVISITS": len(visits), "SNR": round(stack_snr(visits), 3)}
    for i, v in enumerate(visits, start=1):
        header.update({f"SFILE{i}": v.file, f"JD{i}": round(v.jd, 6), f"BC{i}": round(v.bc, 5),
                       f"FIBER{i}": v.fiber, f"SNRVIS{i}": round(v.snr, 3)})
    return header


def _write_source(root: Path, src: SourceTruth, visits: Sequence[Visit], written: Iterable[str] = ()
                  ) -> list[ReleaseFile]:
    """Write the source's apVisit files (those not already in ``written``) and its apStar."""
    files = []
    done = set(written)
    for v in visits:
        rel = Path("apVisit") / v.file
        if str(rel) not in done:
            write_apvisit(root / rel, v.wavelength, v.flux, v.sigma, v.flags, _visit_header(src, v))
        files.append(file_entry(root, root / rel, "apVisit"))
    flux, sigma, flags = build_apstar(visits)
    rel = Path("apStar") / f"apStar-{src.source_id}.fits"
    write_apstar(root / rel, flux, sigma, flags, _star_header(src, visits))
    files.insert(0, file_entry(root, root / rel, "apStar"))
    return files


_SOURCE_COLUMNS = ("source_id", "index", "seed", "kind", "telescope", "ra", "dec", "h_mag", "a_h",
                   *synth.MAIN_LABELS, *synth.HIDDEN_LABELS, "v_bary", "binary_k", "binary_period",
                   "n_visits", "snr", "apstar")
_VISIT_COLUMNS = ("source_id", "visit", "seed", "file", "telescope", "mjd", "jd", "fiber", "airmass",
                  "bc", "v_bary", "vrel", "snr")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


def _source_row(src: SourceTruth, visits: Sequence[Visit]) -> dict[str, Any]:
    return {"source_id": src.source_id, "index": src.index, "seed": src.seed, "kind": src.kind,
            "telescope": src.telescope, "ra": src.ra, "dec": src.dec, "h_mag": src.h_mag, "a_h": src.a_h,
            **{k: src.labels[k] for k in synth.ALL_LABELS}, "v_bary": src.v_sys, "binary_k": src.k_amp,
            "binary_period": src.period, "n_visits": len(visits), "snr": stack_snr(visits),
            "apstar": f"apStar/apStar-{src.source_id}.fits"}


def _visit_row(v: Visit) -> dict[str, Any]:
    return {"source_id": v.source_id, "visit": v.visit, "seed": v.seed, "file": f"apVisit/{v.file}",
            "telescope": v.telescope, "mjd": v.mjd, "jd": v.jd, "fiber": v.fiber, "airmass": v.airmass,
            "bc": v.bc, "v_bary": v.v_bary, "vrel": v.vrel, "snr": v.snr}


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row[c]) for c in columns])
    path.write_text(buf.getvalue())


def read_truth(release_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The release's truth tables as lists of dicts (numbers converted)."""
    release_dir = Path(release_dir)
    out = []
    for name in (TRUTH_SOURCES, TRUTH_VISITS):
        path = release_dir / name
        if not path.is_file():
            raise ReleaseError(f"{release_dir}: no {name}")
        rows = []
        with open(path, newline="") as handle:
            for raw in csv.DictReader(handle):
                rows.append({k: _parse(v) for k, v in raw.items()})
        out.append(rows)
    return out[0], out[1]


def _parse(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _progress(items: Sequence[Any], enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="source")


def _prepare(directory: str | Path, release: str) -> Path:
    if not release or "/" in release or release.startswith("."):
        raise ReleaseError(f"invalid release name {release!r}")
    root = Path(directory) / release
    if (root / MANIFEST_NAME).exists():
        raise ReleaseError(f"{root}: a release with a manifest already exists there")
    (root / "apVisit").mkdir(parents=True, exist_ok=True)
    (root / "apStar").mkdir(parents=True, exist_ok=True)
    return root


def _finish(root: Path, release: str, sources: list[tuple[SourceTruth, list[Visit], list[ReleaseFile]]],
            **meta: Any) -> Path:
    _write_csv(root / TRUTH_SOURCES, _SOURCE_COLUMNS, (_source_row(s, v) for s, v, _ in sources))
    _write_csv(root / TRUTH_VISITS, _VISIT_COLUMNS, (_visit_row(x) for _, v, _ in sources for x in v))
    extra = [file_entry(root, root / TRUTH_SOURCES, "truth"), file_entry(root, root / TRUTH_VISITS, "truth")]
    entries = [ReleaseSource(s.source_id, tuple(f), round(s.ra, 7), round(s.dec, 7)) for s, _, f in sources]
    write_manifest(root, release, entries, extra, generator=GENERATOR, n_sources=len(sources), **meta)
    return root


def _new_source(seed: int, index: int, taken: set[str]) -> SourceTruth:
    src = _draw_source(seed, index)
    if src.source_id in taken:  # astronomically unlikely; nudge the position deterministically
        nudge = 1
        while True:
            ra = (src.ra + nudge * 0.001) % 360.0
            name = source_name(ra, src.dec)
            if name not in taken:
                src = SourceTruth(**{**src.__dict__, "ra": ra, "source_id": name})
                break
            nudge += 1
    taken.add(src.source_id)
    return src


def _initial_visits(src: SourceTruth, seed: int, keep_model: bool = False) -> list[Visit]:
    visits, jd = [], src.jd0
    for k in range(1, src.n_visits + 1):
        if k > 1:
            jd = _next_jd(seed, src.index, k, jd)
        visits.append(render_visit(src, k, seed, jd, keep_model=keep_model))
    return visits


def generate_release(directory: str | Path, release: str, n_sources: int, seed: int, *,
                     progress: bool = True) -> Path:
    """Write a synthetic release under ``directory/release`` and return that folder.

    Deterministic: the same call writes byte-identical files. The manifest is written last.
    """
    if n_sources < 1:
        raise ReleaseError(f"release {release}: n_sources must be >= 1, got {n_sources}")
    root = _prepare(directory, release)
    taken: set[str] = set()
    sources = []
    for index in _progress(range(n_sources), progress, f"release {release}"):
        src = _new_source(seed, index, taken)
        visits = _initial_visits(src, seed)
        sources.append((src, visits, _write_source(root, src, visits)))
    return _finish(root, release, sources, seed=seed, base_release=None)


def _read_visit(root: Path, row: dict[str, Any], src: SourceTruth) -> Visit:
    path = root / row["file"]
    with open_fits(path) as hdul:
        flux, sigma, flags, wave = (np.array(hdul[i].data) for i in (1, 2, 3, 4))
    return Visit(source_id=src.source_id, visit=int(row["visit"]), seed=int(row["seed"]), jd=float(row["jd"]),
                 fiber=int(row["fiber"]), bc=float(row["bc"]), v_bary=float(row["v_bary"]),
                 vrel=float(row["vrel"]), snr=float(row["snr"]), airmass=float(row["airmass"]),
                 wavelength=wave, flux=flux, sigma=sigma, flags=flags, telescope=src.telescope,
                 file=Path(row["file"]).name)


def extend_release(base_dir: str | Path, directory: str | Path, release: str, seed: int, *,
                   new_visit_fraction: float = 0.2, n_new_sources: int = 0, progress: bool = False) -> Path:
    """A new complete release with the base release's sources, where a fraction of them gained
    one visit (new apVisit, rebuilt apStar) and the others are byte-identical copies, plus
    ``n_new_sources`` new sources. Returns ``directory/release``.
    """
    base = Path(base_dir)
    try:
        manifest = read_manifest(base)
    except ManifestError as exc:
        raise ReleaseError(f"{base}: cannot extend ({exc})") from exc
    if not 0.0 <= new_visit_fraction <= 1.0:
        raise ReleaseError(f"new_visit_fraction must be within 0..1, got {new_visit_fraction}")
    source_rows, visit_rows = read_truth(base)
    by_source: dict[str, list[dict[str, Any]]] = {}
    for row in visit_rows:
        by_source.setdefault(str(row["source_id"]), []).append(row)
    listed = {s.source_id: s for s in manifest.sources}
    if set(listed) != {str(r["source_id"]) for r in source_rows}:
        raise ReleaseError(f"{base}: the truth table and the manifest list different sources")
    root = _prepare(directory, release)
    n_base = len(source_rows)
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, _EXTEND_TAG]))
    chosen = set(rng.choice(n_base, size=round(new_visit_fraction * n_base), replace=False).tolist())
    taken = {str(r["source_id"]) for r in source_rows}
    sources = []
    for pos, row in enumerate(_progress(source_rows, progress, f"release {release}")):
        src = _draw_source(int(row["seed"]), int(row["index"]))
        if src.source_id != row["source_id"]:
            src = SourceTruth(**{**src.__dict__, "source_id": str(row["source_id"]), "ra": float(row["ra"])})
        rows = sorted(by_source.get(src.source_id, []), key=lambda r: int(r["visit"]))
        old = listed[src.source_id]
        for f in old.files:
            (root / f.path).parent.mkdir(parents=True, exist_ok=True)
            if pos in chosen and f.format == "apStar":
                continue
            shutil.copyfile(base / f.path, root / f.path)
        if pos not in chosen:
            visits = [_visit_stub(src, r) for r in rows]
            sources.append((src, visits, list(old.files)))
            continue
        visits = [_read_visit(root, r, src) for r in rows]
        k = len(visits) + 1
        jd = _next_jd(seed, src.index, k, max(v.jd for v in visits))
        visits.append(render_visit(src, k, seed, jd))
        files = _write_source(root, src, visits, written=[f"apVisit/{v.file}" for v in visits[:-1]])
        sources.append((src, visits, files))
    for index in range(n_base, n_base + n_new_sources):
        src = _new_source(seed, index, taken)
        visits = _initial_visits(src, seed)
        sources.append((src, visits, _write_source(root, src, visits)))
    return _finish(root, release, sources, seed=seed, base_release=manifest.release)


def _visit_stub(src: SourceTruth, row: dict[str, Any]) -> Visit:
    """A visit's truth without its pixels (unchanged sources are copied, not rebuilt)."""
    empty = np.zeros((0,))
    return Visit(source_id=src.source_id, visit=int(row["visit"]), seed=int(row["seed"]), jd=float(row["jd"]),
                 fiber=int(row["fiber"]), bc=float(row["bc"]), v_bary=float(row["v_bary"]),
                 vrel=float(row["vrel"]), snr=float(row["snr"]), airmass=float(row["airmass"]),
                 wavelength=empty, flux=empty, sigma=empty, flags=empty, telescope=src.telescope,
                 file=Path(str(row["file"])).name)


@dataclass
class ReleaseSummary:
    """Counts of a release folder (for the CLI and benchmarks)."""

    sources: int
    visits: int
    snr: list[float] = field(default_factory=list)


def summarize(release_dir: str | Path) -> ReleaseSummary:
    src, vis = read_truth(release_dir)
    return ReleaseSummary(len(src), len(vis), [float(r["snr"]) for r in src])



# ----------------------------------------------------------------------------- information limits


def rv_information_limit(src: SourceTruth, visit: Visit, step_kms: float = 0.05) -> float:
    """Cramér–Rao bound (km/s) on the radial velocity of one rendered visit.

    The smallest RV standard deviation any unbiased method can reach on this visit's pixels: the
    Fisher information Σ (∂F/∂v)² / σ² of the noiseless flux over the pixels a reader keeps (no
    ``BAD_PIXELS`` bit), with ∂F/∂v from the star's spectrum shifted by ±``step_kms`` (tellurics,
    sky and throughput do not move with the star). Continuum and labels are taken as known, so real
    fits sit somewhat above it. ``visit`` must come from :func:`render_visit` with ``keep_model``.
    Benchmarks use it to tell a method's shortfall from the information in the spectrum (a fast-
    rotating hot star has almost none).
    """
    if visit.model is None:
        raise ValueError(f"{visit.file or visit.source_id}: rendered without keep_model=True")
    flat = visit.wavelength.ravel()
    spec = [synth.synthesize(src.labels, flat, synth.RELEASE_SETTINGS, rv_kms=visit.vrel + d, fiber=visit.fiber)
            for d in (-step_kms, 0.0, step_kms)]
    with np.errstate(divide="ignore", invalid="ignore"):
        dfdv = visit.model.ravel() * (spec[2] - spec[0]) / (2.0 * step_kms) / spec[1]
    sigma = visit.sigma.ravel().astype(float)
    good = ((visit.flags.ravel() & BAD_PIXELS) == 0) & np.isfinite(dfdv) & (sigma > 0)
    fisher = float(np.sum((dfdv[good] / sigma[good]) ** 2))
    return math.inf if fisher <= 0 else 1.0 / math.sqrt(fisher)


def visit_rv_information_limits(seed: int, n_sources: int) -> dict[tuple[str, int], float]:
    """:func:`rv_information_limit` of every visit of ``generate_release(..., n_sources, seed)``,
    keyed by (source_id, mjd) like the truth table (the release is re-rendered, not read)."""
    taken: set[str] = set()
    out: dict[tuple[str, int], float] = {}
    for index in range(n_sources):
        src = _new_source(seed, index, taken)
        for visit in _initial_visits(src, seed, keep_model=True):
            out[(src.source_id, visit.mjd)] = rv_information_limit(src, visit)
    return out
