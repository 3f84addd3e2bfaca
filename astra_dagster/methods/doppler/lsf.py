"""Matching generator-trained templates to each visit's line-spread function.

The synthetic releases observe every visit with the fiber's resolving power (R falls ~11 % from
mid-slit to the slit ends), a skewed Gauss-Hermite LSF and the detector pixel box
(:func:`astra_dagster.spectra.synth.observation`). Templates rendered at one LSF fit the other
fibers with a velocity bias that depends on the star (measured: giants +30 m/s per +10 % R).
So the generator's templates are rendered sharper than any fiber (:data:`TEMPLATE_RESOLUTION`,
their LSF recorded in ``meta["lsf"]``) and, per visit, convolved with the kernel that turns
their LSF into the visit's: the ratio of the two Fourier transfer functions the generator itself
uses (:func:`astra_dagster.spectra.synth.broadening_transfer`), so the matched template is the
template the visit's instrument would have rendered. Convolution commutes with ``theta @ v``,
so convolving the emulator's coefficients matches the flux of every label triple.

Templates without ``meta["lsf"]`` (Doppler's Synspec grids, for real data) are left alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft as sfft

from astra_dagster.methods.doppler.emulator import Emulator
from astra_dagster.spectra.spectrum import C_KMS, Spectrum

#: R of the generator's templates: above every fiber's (at most 1.06 × 22,500 = 23,850), so
#: the matching kernel only ever broadens.
TEMPLATE_RESOLUTION = 24000.0
#: Matched copies kept per template family (a copy is one theta, ~5 MB): visits of one star
#: and repeated fits of one visit reuse them.
_CACHE_SIZE = 6
#: Transfer below this carries nothing the fit can see (its ratio is set to 0 there).
_NEGLIGIBLE = 1e-12


@dataclass(frozen=True)
class LSF:
    """An instrumental profile: Gauss-Hermite at resolving power ``resolution`` (h3, h4), then
    the detector pixel box ``pixel_log10`` wide in log10 λ (0: sampled, not integrated)."""

    resolution: float
    lsf_h3: float = 0.0
    lsf_h4: float = 0.0
    pixel_log10: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def key(self) -> tuple[float, ...]:
        """Cache key: R to 0.1, the box to 1e-10 in log10 (far below anything a velocity sees)."""
        return (round(self.resolution, 1), round(self.lsf_h3, 6), round(self.lsf_h4, 6),
                round(self.pixel_log10, 10))

    def rounded(self) -> LSF:
        """This LSF at its :meth:`key`'s precision: what a matched template is computed for, so
        that it does not depend on which visit of the key came first (a worker pool computes
        visits in another order than a serial run, and must give the same numbers)."""
        return LSF(*self.key())


def template_lsf(settings: Any) -> LSF:
    """The LSF of templates rendered with the generator's ``settings`` (a model grid is sampled,
    not pixel-integrated, unless the settings say so)."""
    if settings.fiber_resolution:
        raise ValueError("templates rendered with a fiber-dependent R have no single LSF")
    pixel = settings.log10_step if settings.pixel_integration else 0.0
    return LSF(float(settings.resolution), float(settings.lsf_h3), float(settings.lsf_h4), float(pixel))


def visit_lsf(spectrum: Spectrum) -> LSF:
    """The LSF the synthetic instrument observed ``spectrum`` with: its fiber's R
    (``meta["fiber"]``; the instrument's central R without one), the instrument's Gauss-Hermite
    shape and a pixel box of the spectrum's median pixel width, as the generator computes it."""
    from astra_dagster.spectra import synth

    instrument = synth.RELEASE_SETTINGS
    resolution = instrument.resolution
    fiber = spectrum.meta.get("fiber")
    try:
        fiber_no = int(fiber) if fiber is not None else None
    except (TypeError, ValueError):
        fiber_no = None
    if instrument.fiber_resolution and fiber_no is not None and 1 <= fiber_no <= 300:
        resolution = synth.fiber_resolving_power(fiber_no, instrument.resolution)
    pixel = 0.0
    wave = spectrum.wavelength
    if instrument.pixel_integration and wave.size > 1:
        pixel = float(np.median(np.abs(np.diff(np.log10(wave)))))
    return LSF(float(resolution), instrument.lsf_h3, instrument.lsf_h4, pixel)


@functools.lru_cache(maxsize=16)
def _transfer(lsf: LSF, log10_step: float, n_fft: int) -> np.ndarray:
    """rfft transfer function of ``lsf`` on a grid of ``log10_step`` (cached: the templates' own
    is the same for every visit)."""
    from astra_dagster.spectra import synth

    settings = dataclasses.replace(synth.RELEASE_SETTINGS, resolution=lsf.resolution, fiber_resolution=False,
                                   lsf_h3=lsf.lsf_h3, lsf_h4=lsf.lsf_h4)
    kms_per_px = C_KMS * math.log(10.0) * log10_step
    out = synth.broadening_transfer(np.fft.rfftfreq(n_fft), kms_per_px, n_fft, settings, lsf.resolution,
                                    vmacro=0.0, vsini=0.0, pixel_px=lsf.pixel_log10 / log10_step)
    out.setflags(write=False)
    return out


def matching_transfer(have: LSF, want: LSF, log10_step: float, n_fft: int) -> np.ndarray:
    """rfft transfer function that turns spectra sampled at ``log10_step`` with LSF ``have``
    into spectra with LSF ``want`` (``want`` sharper than ``have`` is clamped to ``have``'s R:
    a kernel cannot sharpen)."""
    if want.resolution > have.resolution:
        want = dataclasses.replace(want, resolution=have.resolution)
    t_have = _transfer(have, log10_step, n_fft)
    t_want = _transfer(want, log10_step, n_fft)
    # Where the wanted transfer is negligible the ratio is noise: nothing passes there. (Measured:
    # wherever |t_want| > 1e-9, |t_want / t_have| <= 1, so the ratio never amplifies.)
    keep = (np.abs(t_want) > _NEGLIGIBLE) & (np.abs(t_have) > _NEGLIGIBLE)
    out = np.zeros_like(t_want)
    out[keep] = t_want[keep] / t_have[keep]
    return out


def convolve(values: np.ndarray, have: LSF, want: LSF, log10_step: float) -> np.ndarray:
    """``values`` (n,) or (n, k) on a log-uniform grid, matched from LSF ``have`` to ``want``
    along the first axis (edge values extended, so the ends do not wrap around)."""
    arr = np.asarray(values, dtype=float)
    sigma_px = C_KMS / want.resolution / 2.3548 / (C_KMS * math.log(10.0) * log10_step)
    pad = math.ceil(10.0 * sigma_px + want.pixel_log10 / log10_step) + 8
    n = arr.shape[0]
    n_fft = sfft.next_fast_len(n + 2 * pad, real=True)
    # One contiguous row per column (FFTs along the last axis run twice as fast), padded to the
    # FFT length at once, in single precision: 3x faster, and its ~1e-7 round-off is far below
    # any spectrum's noise (the result is double again).
    rows = arr.reshape(n, -1).T
    padded = np.empty((rows.shape[0], n_fft), dtype=np.float32)
    padded[:, pad:pad + n] = rows
    padded[:, :pad] = rows[:, :1]
    padded[:, pad + n:] = rows[:, -1:]
    spec = sfft.rfft(padded, axis=1)
    spec *= matching_transfer(have, want, log10_step, n_fft).astype(np.complex64)
    out = sfft.irfft(spec, n_fft, axis=1)[:, pad:pad + n].T
    return out.reshape(arr.shape).astype(float)


def match_emulator(emulator: Emulator, want: LSF) -> Emulator:
    """``emulator`` with its coefficients convolved to LSF ``want``; the emulator itself when it
    records no LSF (Synspec) or is already a matched copy. Copies share the base's ``meta`` (so
    error floors set later are seen) and are cached on the base, a few per family."""
    recorded = emulator.meta.get("lsf")
    if not recorded or emulator._coarse_cache.get("lsf_matched"):
        return emulator
    have = LSF(**recorded)
    cache: OrderedDict[tuple[float, ...], Emulator] = emulator._coarse_cache.setdefault("lsf", OrderedDict())
    want = want.rounded()
    key = want.key()
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    theta = convolve(emulator.theta, have, want, emulator.log10_step)
    matched = dataclasses.replace(emulator, theta=theta, meta=emulator.meta)
    matched._coarse_cache["lsf_matched"] = want
    cache[key] = matched
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return matched


class VisitMatcher:
    """The templates of one visit: ``matcher(emulator)`` is ``emulator`` matched to the visit's
    LSF (computed once per visit and family)."""

    def __init__(self, spectrum: Spectrum):
        self.lsf = visit_lsf(spectrum)

    def __call__(self, emulator: Emulator) -> Emulator:
        return match_emulator(emulator, self.lsf)
