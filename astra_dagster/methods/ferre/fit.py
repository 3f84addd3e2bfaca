"""A compact FERRE (Allende Prieto; ASPCAP, García Pérez et al. 2016) in numpy/scipy: χ² fits
of continuum-normalised APOGEE spectra against a regular grid of synthetic spectra.

**Grid** (:class:`FerreGrid`, built by :func:`train_model`). A regular, rectangular grid over
``teff``, ``logg``, ``metals`` ([M/H]) and ``o_mg_si_s_ca_ti`` ([α/M]), optionally
``log10vdop`` (log10 micro-turbulence, km/s) and ``lgvsini`` (log10 v sin i, km/s), at
ASPCAP-like spacing (default 3500-7000 K in 250 K, logg 0-5 in 0.5, [M/H] -2.5..+0.5 and
[α/M] -0.25..+0.5 in 0.25 dex: 8580 nodes). Every node is rendered noiselessly by the project's
generator (:func:`astra_dagster.spectra.synth.synthesize` with ``TRAINING_SETTINGS``, the
hidden labels that are not grid dimensions on their mean relations) on the apStar grid and then
normalised with :func:`astra_dagster.methods.continuum.normalize_arrays` — the same rule that
normalises the data. Only detector pixels are kept; the line depth ``1 - flux`` is stored as
16-bit fixed point (:data:`DEPTH_QUANTUM` = 1/32000 of the continuum, far below the noise at
any S/N; int16 → float32 is ten times faster to unpack than float16) in one ``.npz`` file
together with the axes, the build facts and the held-out errors. The generator's line list is fixed,
so the grid does not depend on a seed.

**Model.** Multilinear interpolation between the 2^D corners of the grid cell (FERRE's
``inter=1``). The observed spectrum may differ from the model by a smooth factor per detector
chip: a Legendre polynomial of degree :data:`CONTINUUM_DEGREE` per chip multiplies the model,
and its coefficients are solved *linearly* at every χ² evaluation (so χ² is the profile over
the continuum: ``χ² = Σ w y² − Σ_chips bᵀ A⁻¹ b``, with ``A = Σ w m² P Pᵀ`` and
``b = Σ w y m P``).

**Fit** (:func:`fit_spectra`, one spectrum at a time):

1. normalise the raw apStar spectrum (:func:`continuum.normalize`); pixel weights are its ivar;
2. starting points: a χ² scan over *all* grid nodes (every :data:`COARSE_STRIDE`-th pixel, a
   scale factor per chip) and the :data:`N_STARTS` best nodes that are at least two nodes apart,
   plus a caller-given initial guess (clipped into the grid and flagged if outside);
3. Nelder–Mead (``scipy.optimize.minimize``, bounded to the grid, in grid-index units so the
   simplex is isotropic) from each start, and once more from the best result (a restart guards
   against a collapsed simplex);
4. uncertainties from the curvature of χ² at the minimum: a central finite-difference Hessian
   (step :data:`HESSIAN_STEP` of a grid cell), ``cov = 2 H⁻¹``, scaled by the reduced χ² when
   that exceeds one, plus in quadrature the grid's held-out error floor (``floor_<dim>``,
   see :func:`train_model`): the curvature alone knows nothing of model mismatch;
5. optional frozen dimensions (``frozen={"o_mg_si_s_ca_ti": 0.0}``): held at the given value.

**Flags** (``bitmask_flag``, :data:`FLAGS`): ``START_OUTSIDE_GRID`` a given initial guess was
outside the grid (clipped); ``AT_GRID_EDGE`` a free label ended on the grid boundary (the true
value may lie beyond; the lowest v sin i node is exempt: slower rotation is unresolved);
``FLAT_CHI2`` the spectrum carries no line information — the best grid model is not better
than a line-free continuum by :data:`FLAT_DELTA_CHI2` — labels None;
``TOO_FEW_PIXELS`` fewer than :data:`MIN_PIXELS` usable pixels — labels None;
``NOT_CONVERGED`` Nelder–Mead hit its iteration limit; ``HIGH_CHI2`` reduced χ² above
:data:`HIGH_CHI2`; ``CHIP_FAILED`` the continuum normalisation dropped a chip; ``BAD_CURVATURE``
the χ² Hessian is not positive definite (uncertainties None); ``HYDROGEN_LINES`` the Brackett
lines are far deeper than the best grid model's (a hot star beyond the grid's warm edge,
:mod:`astra_dagster.methods.hydrogen`) — labels None.

**Measured** (default grid, one core; ``bench/ferre_accuracy.py``): build ~50-70 s + ~15 s of
held-out fits, 127 MB file; 0.13 s CPU per spectrum. On 196 release-like giants and dwarfs at
S/N 100-200: robust σ 15 K (0.3 % of Teff), 0.07 dex logg, 0.035 dex [M/H] vs [Fe/H], 0.014 dex
[α/M]; rms 30 K, 0.14, 0.08, 0.03 — the tails are cool upper-RGB giants whose hidden [C/Fe],
[N/Fe] and turbulence scatter (the grid keeps them on mean relations) trade logg for [M/H]
(:data:`FULL_GRID` fits [C/M] and [N/M] and meets the targets in rms), and fast-rotating warm
dwarfs (:data:`ROTATION_GRID` fits v sin i and does better). Without an
initial guess every spectrum starts from the node scan, so no upstream estimate is needed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

from astra_dagster.methods import continuum, hydrogen
from astra_dagster.methods.modelfile import read_arrays, write_arrays
from astra_dagster.spectra import synth
from astra_dagster.spectra.spectrum import APSTAR_NPIX, Spectrum, apstar_wavelength

FORMAT = "astra-ferre-grid/1"

#: The eight FERRE dimensions of ``astra.ferre`` (column order of the seed schema).
DIMENSIONS: tuple[str, ...] = ("teff", "logg", "metals", "log10vdop", "o_mg_si_s_ca_ti", "lgvsini", "c", "n")
#: Dimensions a grid built here may have: c = [C/M], n = [N/M] (M = Fe in the generator).
GRID_DIMENSIONS: tuple[str, ...] = ("teff", "logg", "metals", "o_mg_si_s_ca_ti", "log10vdop", "lgvsini", "c", "n")
#: Optional dimensions: off (the generator's mean relation) unless their step is > 0.
OPTIONAL_DIMENSIONS: tuple[str, ...] = ("log10vdop", "lgvsini", "c", "n")

FLAGS: dict[str, int] = {
    "START_OUTSIDE_GRID": 1 << 0,
    "AT_GRID_EDGE": 1 << 1,
    "FLAT_CHI2": 1 << 2,
    "TOO_FEW_PIXELS": 1 << 3,
    "NOT_CONVERGED": 1 << 4,
    "HIGH_CHI2": 1 << 5,
    "CHIP_FAILED": 1 << 6,
    "BAD_CURVATURE": 1 << 7,
    "HYDROGEN_LINES": 1 << 8,
}

#: Fixed-point unit of the stored line depths.
DEPTH_QUANTUM = 1.0 / 32000.0
#: A spectrum needs at least this many usable pixels to be fitted.
MIN_PIXELS = 200
#: FLAT_CHI2 when the best model improves χ² over a line-free continuum by less than this.
FLAT_DELTA_CHI2 = 25.0
#: Reduced χ² above which HIGH_CHI2 is set.
HIGH_CHI2 = 10.0
#: Degree of the per-chip multiplicative continuum correction.
CONTINUUM_DEGREE = 2
#: Pixel stride of the coarse node scan.
COARSE_STRIDE = 5
#: Nelder–Mead starts from the coarse scan.
N_STARTS = 3
#: Finite-difference step of the χ² Hessian, in grid cells.
HESSIAN_STEP = 0.25
#: A free label closer than this (grid cells) to the boundary is AT_GRID_EDGE.
EDGE_TOLERANCE = 0.02

#: Default grid of :func:`train_model` (8580 nodes, ~1-2 min on one core).
DEFAULT_GRID: dict[str, float] = {
    "teff_min": 3500.0, "teff_max": 7000.0, "teff_step": 250.0,
    "logg_min": 0.0, "logg_max": 5.0, "logg_step": 0.5,
    "metals_min": -2.5, "metals_max": 0.5, "metals_step": 0.25,
    "alpha_min": -0.25, "alpha_max": 0.5, "alpha_step": 0.25,
    "log10vdop_min": 0.0, "log10vdop_max": 0.0, "log10vdop_step": 0.0,
    "lgvsini_min": 0.0, "lgvsini_max": 0.0, "lgvsini_step": 0.0,
    "c_min": 0.0, "c_max": 0.0, "c_step": 0.0,
    "n_min": 0.0, "n_max": 0.0, "n_step": 0.0,
}
#: The default grid plus [C/M] (-0.45, -0.15, 0.15) and [N/M] (-0.2, 0.3, 0.8), as ASPCAP's
#: giant grids have: an upper-branch giant's own C and N otherwise trade 0.3-1 dex of logg for
#: [M/H]. 77,220 nodes, ~9 min build on one core, 1.15 GB, 0.36 s per spectrum in the asset.
#: bench/accuracy.py (150 sources, seed 3) at S/N >= 100, all stars: rms ΔTeff/Teff 1.1 %,
#: logg 0.078, [M/H] 0.045 (default grid: 1.0 %, 0.18, 0.12).
FULL_GRID: dict[str, float] = {
    **DEFAULT_GRID,
    "c_min": -0.45, "c_max": 0.15, "c_step": 0.3,
    "n_min": -0.2, "n_max": 0.8, "n_step": 0.5,
}
#: The default grid plus log10 v sin i as a fifth dimension (1, 3.2, 10, 32 km/s): warm dwarfs
#: rotate, and a grid on the generator's v sin i relation turns their rotation into Teff/logg
#: errors (measured on 5000-7000 K dwarfs at S/N 150: Teff rms 111 → 22 K, logg 0.23 → 0.03).
#: 34,320 nodes, 190 s build + 18 s held-out fits on one core, 510 MB, 0.27 s CPU per spectrum.
ROTATION_GRID: dict[str, float] = {
    **DEFAULT_GRID,
    "lgvsini_min": 0.0, "lgvsini_max": 1.5, "lgvsini_step": 0.5,
}
_OPTION_PREFIX = {"teff": "teff", "logg": "logg", "metals": "metals", "o_mg_si_s_ca_ti": "alpha",
                  "log10vdop": "log10vdop", "lgvsini": "lgvsini", "c": "c", "n": "n"}


class FerreError(ValueError):
    """Bad grid, bad grid file or bad call (the message names the problem)."""


def describe_flags(value: int) -> list[str]:
    """Names of the :data:`FLAGS` bits set in ``value``."""
    return [name for name, bit in FLAGS.items() if int(value) & bit]


# ----------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class GridAxis:
    """One regular axis: ``start + step * i`` for ``i < n``."""

    name: str
    start: float
    step: float
    n: int

    @property
    def values(self) -> np.ndarray:
        return self.start + self.step * np.arange(self.n)

    @property
    def stop(self) -> float:
        return self.start + self.step * (self.n - 1)

    def to_index(self, value: float) -> float:
        return (float(value) - self.start) / self.step

    def to_value(self, index: float) -> float:
        return self.start + self.step * float(index)


def _axis(name: str, lo: float, hi: float, step: float) -> GridAxis:
    if not all(math.isfinite(v) for v in (lo, hi, step)) or step <= 0 or hi <= lo:
        raise FerreError(f"grid axis {name}: need finite min < max and step > 0, got {lo}, {hi}, {step}")
    n = round((hi - lo) / step) + 1
    if abs(lo + (n - 1) * step - hi) > 1e-6 * step:
        raise FerreError(f"grid axis {name}: ({hi} - {lo}) is not a multiple of the step {step}")
    return GridAxis(name, float(lo), float(step), int(n))


@dataclass
class FerreGrid:
    """A regular grid of continuum-normalised synthetic spectra.

    ``axes``: the dimensions (a subset of :data:`GRID_DIMENSIONS`, starting with teff, logg,
    metals, o_mg_si_s_ca_ti), node order C-contiguous over the axes. ``depth`` (n_nodes,
    n_pixels) int16: ``(1 - normalised flux) / DEPTH_QUANTUM`` at the apStar pixels ``pixels``. ``meta``: build
    facts (generator and settings, continuum fingerprint, build time).
    """

    axes: tuple[GridAxis, ...]
    depth: np.ndarray
    pixels: np.ndarray
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        names = [a.name for a in self.axes]
        if len(set(names)) != len(names) or any(n not in GRID_DIMENSIONS for n in names):
            raise FerreError(f"grid axes {names}: must be distinct names from {GRID_DIMENSIONS}")
        if any(a.n < 2 for a in self.axes):
            raise FerreError(f"grid axes {names}: every axis needs at least 2 nodes for interpolation")
        n_nodes = int(np.prod([a.n for a in self.axes]))
        if self.depth.ndim != 2 or self.depth.shape != (n_nodes, self.pixels.size):
            raise FerreError(f"grid depth has shape {self.depth.shape}, expected ({n_nodes}, {self.pixels.size})")
        if self.pixels.ndim != 1 or self.pixels.size == 0 or self.pixels.min() < 0 or self.pixels.max() >= APSTAR_NPIX:
            raise FerreError("grid pixels must be indices into the apStar grid")
        self._cache: dict[str, Any] = {}

    # -- facts

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.n for a in self.axes)

    @property
    def n_nodes(self) -> int:
        return int(self.depth.shape[0])

    @property
    def n_pixels(self) -> int:
        return int(self.pixels.size)

    def axis(self, name: str) -> GridAxis:
        for a in self.axes:
            if a.name == name:
                return a
        raise FerreError(f"the grid has no dimension {name!r} (has {self.names})")

    def summary(self) -> dict[str, Any]:
        """Small JSON-able facts for the model asset's metadata."""
        return {
            "format": FORMAT,
            "dimensions": list(self.names),
            "axes": {a.name: {"min": a.start, "max": a.stop, "step": a.step, "n": a.n} for a in self.axes},
            "n_nodes": self.n_nodes,
            "n_pixels": self.n_pixels,
            "size_mb": round(self.depth.nbytes / 2**20, 1),
            **{k: v for k, v in self.meta.items() if isinstance(v, str | int | float | bool)},
        }

    # -- interpolation

    def _strides(self) -> np.ndarray:
        shape = self.shape
        return np.array([int(np.prod(shape[i + 1:])) for i in range(len(shape))], dtype=np.int64)

    def _corners(self) -> tuple[np.ndarray, np.ndarray]:
        """(2^D, D) corner bit patterns and their (2^D,) flat offsets."""
        if "corners" not in self._cache:
            bits = np.array(list(itertools.product((0, 1), repeat=len(self.axes))), dtype=np.int64)
            self._cache["corners"] = (bits, bits @ self._strides())
        return self._cache["corners"]

    def interpolate_depth(self, index: np.ndarray) -> np.ndarray:
        """Line depth (n_pixels,) float32 by multilinear interpolation at fractional grid
        indices ``index`` (D,), clipped into the grid."""
        shape = np.array(self.shape)
        u = np.clip(np.asarray(index, dtype=float), 0.0, shape - 1.0)
        i0 = np.minimum(np.floor(u).astype(np.int64), shape - 2)
        t = u - i0
        bits, offsets = self._corners()
        w = np.prod(np.where(bits == 1, t, 1.0 - t), axis=1)
        keep = w > 1e-12   # corners with zero weight (on a node face) need not be read
        rows = int(i0 @ self._strides()) + offsets[keep]
        return (w[keep] * DEPTH_QUANTUM).astype(np.float32) @ self.depth[rows].astype(np.float32)

    def to_index(self, labels: Mapping[str, float]) -> np.ndarray:
        """Fractional grid indices of a label mapping (every grid dimension needed)."""
        return np.array([a.to_index(labels[a.name]) for a in self.axes])

    def model_flux(self, labels: Mapping[str, float]) -> np.ndarray:
        """Interpolated normalised flux on the full apStar grid (NaN outside the grid pixels)."""
        missing = [n for n in self.names if n not in labels]
        if missing:
            raise FerreError(f"model_flux needs labels {missing}")
        out = np.full(APSTAR_NPIX, np.nan)
        out[self.pixels] = 1.0 - self.interpolate_depth(self.to_index(labels))
        return out

    def coarse_arrays(self) -> list[tuple[slice, np.ndarray, np.ndarray]]:
        """Per chip: its pixel slice, the model flux at every node on every COARSE_STRIDE-th
        pixel of the chip and its square (float32, cached): the node scan of :func:`fit_spectra`."""
        if "coarse" not in self._cache:
            slices, _, _ = _chip_layout(self)
            out = []
            for sl in slices:
                sub = 1.0 - self.depth[:, sl][:, ::COARSE_STRIDE].astype(np.float32) * np.float32(DEPTH_QUANTUM)
                out.append((sl, sub, sub * sub))
            self._cache["coarse"] = out
        return self._cache["coarse"]

    # -- files

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the grid to exactly ``path`` (one ``.npz`` file, atomically: temp file + rename)."""
        path = Path(path)
        config = {"axes": [[a.name, a.start, a.step, a.n] for a in self.axes], "meta": self.meta}
        return write_arrays(path, {"format": np.array(FORMAT), "config": np.array(json.dumps(config, sort_keys=True)),
                                   "depth": self.depth, "pixels": self.pixels})

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> FerreGrid:
        """Read a grid written by :meth:`write`; :class:`FerreError` naming the file for
        anything else (FileNotFoundError if it does not exist)."""
        path = Path(path)
        contents = read_arrays(path, what="FERRE grid", error=FerreError, file_format=FORMAT,
                               required=("format", "config", "depth", "pixels"))
        try:
            config = json.loads(str(contents["config"]))
            axes = tuple(GridAxis(str(n), float(s), float(d), int(k)) for n, s, d, k in config["axes"])
            meta = dict(config["meta"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FerreError(f"{path}: bad grid configuration ({exc})") from exc
        try:
            return cls(axes, contents["depth"].astype(np.int16, copy=False),
                       contents["pixels"].astype(np.int64), meta)
        except FerreError as exc:
            raise FerreError(f"{path}: {exc}") from exc


def _grid_axes(options: Mapping[str, float]) -> tuple[GridAxis, ...]:
    axes = []
    for name in GRID_DIMENSIONS:
        p = _OPTION_PREFIX[name]
        lo, hi, step = (float(options[f"{p}_{k}"]) for k in ("min", "max", "step"))
        if name in OPTIONAL_DIMENSIONS and step == 0.0:
            continue   # not a dimension: the generator's mean relation is used
        axes.append(_axis(name, lo, hi, step))
    return tuple(axes)


def _node_labels(names: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    lab = dict(zip(names, values, strict=True))
    out = {"teff": lab["teff"], "logg": lab["logg"], "fe_h": lab["metals"], "alpha_m": lab["o_mg_si_s_ca_ti"]}
    if "log10vdop" in lab:
        out["vmicro"] = 10.0 ** lab["log10vdop"]
    if "lgvsini" in lab:
        out["vsini"] = 10.0 ** lab["lgvsini"]
    if "c" in lab:
        out["c_fe"] = lab["c"]
    if "n" in lab:
        out["n_fe"] = lab["n"]
    return out


def train_model(*, n_train: int | None = None, seed: int = 0, n_validation: int = 40, chunk: int = 512,
                **options: float) -> FerreGrid:
    """Build the synthetic grid (FERRE has no training: its "model" is the grid), then
    calibrate its systematic error floors on ``n_validation`` held-out stars (0: none).

    ``options`` override :data:`DEFAULT_GRID` (``teff_min``, ``teff_max``, ``teff_step``, the
    same for ``logg``, ``metals``, ``alpha`` ([α/M]) and the optional ``log10vdop``,
    ``lgvsini``, ``c`` ([C/M]), ``n`` ([N/M]), which a step of 0 leaves off the grid, on the
    generator's mean relations). ``n_train``, if given, caps the number of
    nodes (FerreError when the grid is larger). ``seed`` is recorded only: the generator's
    line list is fixed and grid spectra are noiseless, so the grid is deterministic; it seeds
    the held-out stars.

    **Error floors.** The held-out stars are drawn from the survey's giants and dwarfs inside
    the grid, with their hidden labels (micro/macro-turbulence, v sin i, [C/Fe], [N/Fe])
    *scattering* about the relations the grid assumes, rendered noiselessly off the nodes and
    fitted like data. The rms of estimate − truth per label (interpolation error plus
    hidden-label mismatch, what the curvature cannot know), after dropping misfits beyond five
    robust σ, is stored as ``floor_<dim>`` and added in quadrature to every fitted uncertainty.
    """
    unknown = sorted(set(options) - set(DEFAULT_GRID))
    if unknown:
        raise FerreError(f"unknown grid options {unknown}; known: {sorted(DEFAULT_GRID)}")
    opts = {**DEFAULT_GRID, **{k: float(v) for k, v in options.items()}}
    axes = _grid_axes(opts)
    for a in axes:   # the generator's validity range, before spending minutes on the grid
        label = {"teff": "teff", "logg": "logg", "metals": "fe_h", "o_mg_si_s_ca_ti": "alpha_m",
                 "c": "c_fe", "n": "n_fe"}.get(a.name)
        if label:
            lo, hi = synth.LABEL_LIMITS[label]
            if a.start < lo or a.stop > hi:
                raise FerreError(f"grid axis {a.name} {a.start}..{a.stop} outside the generator's range {lo}..{hi}")
    n_nodes = int(np.prod([a.n for a in axes]))
    if n_train is not None and int(n_train) > 0 and n_nodes > int(n_train):
        raise FerreError(f"the grid has {n_nodes} nodes, more than the cap n_train={n_train}; "
                         "use coarser steps or a smaller range")
    t0 = time.perf_counter()
    wave = apstar_wavelength()
    chips = continuum.chip_index()
    pixels = np.flatnonzero(chips >= 0)
    names = [a.name for a in axes]
    settings = synth.TRAINING_SETTINGS
    depth = np.empty((n_nodes, pixels.size), dtype=np.int16)
    nodes = itertools.product(*(a.values for a in axes))
    ivar = np.where(chips >= 0, synth.NOISELESS_IVAR, 0.0)
    for lo in range(0, n_nodes, chunk):
        block = list(itertools.islice(nodes, chunk))
        flux = np.array([synth.synthesize(_node_labels(names, v), wave, settings) for v in block])
        norm, _, flags = continuum.normalize_arrays(wave, flux, np.broadcast_to(ivar, flux.shape),
                                                    return_flags=True)
        if np.any(flags):
            bad = [dict(zip(names, block[i], strict=True)) for i in np.flatnonzero(flags)[:3]]
            raise FerreError(f"continuum normalisation failed for grid nodes such as {bad}")
        d = (1.0 - norm[:, pixels]) / DEPTH_QUANTUM
        if not np.all(np.abs(d) < 32767):
            raise FerreError("grid spectra with normalised flux outside 0..2: cannot store them")
        depth[lo:lo + len(block)] = np.rint(d).astype(np.int16)
    seconds = time.perf_counter() - t0
    meta = {"generator": synth.GENERATOR_VERSION, "settings": settings.name, "seed": int(seed),
            "continuum_fingerprint": continuum.continuum_fingerprint(), "build_seconds": round(seconds, 1),
            "interpolation": "multilinear", "continuum_degree": CONTINUUM_DEGREE}
    grid = FerreGrid(axes, depth, pixels, meta)
    if n_validation > 0:
        t1 = time.perf_counter()
        floors = held_out_errors(grid, int(n_validation), seed)
        grid.meta.update({f"floor_{k}": round(v, 5) for k, v in floors.items()})
        grid.meta["held_out_n"] = int(n_validation)
        grid.meta["held_out_seconds"] = round(time.perf_counter() - t1, 1)
    return grid


#: Random stream of the held-out stars (never shared with releases, training or test sets).
_HELD_OUT_STREAM = 0x6665_7272  # "ferr"
#: Truth of each grid dimension in the generator's labels.
_TRUTH = {"teff": ("teff", float), "logg": ("logg", float), "metals": ("fe_h", float),
          "o_mg_si_s_ca_ti": ("alpha_m", float), "log10vdop": ("vmicro", math.log10),
          "lgvsini": ("vsini", math.log10), "c": ("c_fe", float), "n": ("n_fe", float)}


def held_out_errors(grid: FerreGrid, n: int, seed: int) -> dict[str, float]:
    """Fit ``n`` noiseless off-node giants and dwarfs with scattering hidden labels and return
    the rms of Δ (misfits beyond 5 robust σ dropped) per grid dimension (see :func:`train_model`)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _HELD_OUT_STREAM]))
    labels, kind = synth.draw_labels_with_kind(6 * n + 20, rng, "survey", hidden_scatter=True)
    labels["vsini"] = np.maximum(labels["vsini"], 0.5)   # log10 v sin i must be finite
    inside = np.isin(kind, ("giant", "dwarf"))
    truth = {}
    for a in grid.axes:
        key, f = _TRUTH[a.name]
        v = np.array([f(x) for x in labels[key]])
        if a.name in ("lgvsini", "log10vdop"):
            # below the lowest node (v sin i < 1 km/s) the spectrum does not change at this
            # resolution: such stars are compared with the nearest node, not left out
            v = np.clip(v, a.start, a.stop)
        truth[a.name] = v
        inside &= (v >= a.start) & (v <= a.stop)
    keep = np.flatnonzero(inside)[:n]
    if keep.size < min(n, 5):
        raise FerreError(f"only {keep.size} held-out stars fall inside the grid {grid.summary()['axes']}")
    wave = apstar_wavelength()
    chips = continuum.chip_index()
    spectra = []
    for i in keep:
        flux = synth.synthesize({k: float(labels[k][i]) for k in synth.ALL_LABELS}, wave, synth.TRAINING_SETTINGS)
        spectra.append(Spectrum(wave, np.where(chips >= 0, flux, np.nan),
                                np.where(chips >= 0, synth.NOISELESS_IVAR, 0.0), np.zeros(wave.size, np.int64),
                                {"source": "ferre held-out"}))
    rows = fit_spectra(grid, spectra)
    floors = {}
    for a in grid.axes:
        d = np.array([np.nan if r[a.name] is None else r[a.name] - truth[a.name][i]
                      for r, i in zip(rows, keep, strict=True)])
        d = d[np.isfinite(d)]
        if d.size == 0:
            floors[a.name] = float("nan")
            continue
        # catastrophic misfits (e.g. a fast rotator far from the grid's v sin i relation) are
        # flagged elsewhere, not a floor: drop those beyond 5 robust σ before the rms
        width = 1.4826 * float(np.median(np.abs(d)))
        core = d[np.abs(d) <= 5.0 * width] if width > 0 else d
        floors[a.name] = float(np.sqrt(np.mean(core * core)))
    return floors


# ----------------------------------------------------------------------------- fitting


@dataclass
class _Prepared:
    """One spectrum on the grid's pixels: normalised flux y and weights w (0 where unusable),
    the chips that take part and the χ² constants."""

    y: np.ndarray
    w: np.ndarray
    wy: np.ndarray
    yy: float
    chips: np.ndarray       # indices of the chips with enough usable pixels
    n_used: int


def _chip_layout(grid: FerreGrid) -> tuple[list[slice], np.ndarray, np.ndarray]:
    """Per chip: its slice of the grid's pixels; the continuum design as block matrices over
    all pixels: ``outer`` (n_pixels, 3·(d+1)²) and ``basis`` (n_pixels, 3·(d+1)) (cached)."""
    if "layout" not in grid._cache:
        chips = continuum.chip_index()[grid.pixels]
        k = CONTINUUM_DEGREE + 1
        n_chips = len(continuum.CHIPS)
        slices, outer, basis = [], np.zeros((grid.n_pixels, n_chips * k * k)), np.zeros((grid.n_pixels, n_chips * k))
        for c, (lo, hi) in enumerate(continuum.CHIPS):
            r = np.flatnonzero(chips == c)
            if r.size == 0:
                slices.append(slice(0, 0))
                continue
            if np.any(np.diff(r) != 1):
                raise FerreError(f"grid pixels of chip {c} are not contiguous")
            x = 2.0 * (grid.pixels[r] - lo) / (hi - lo) - 1.0
            B = np.polynomial.legendre.legvander(x, CONTINUUM_DEGREE)
            basis[r, c * k:(c + 1) * k] = B
            outer[r, c * k * k:(c + 1) * k * k] = (B[:, :, None] * B[:, None, :]).reshape(r.size, k * k)
            slices.append(slice(int(r[0]), int(r[-1]) + 1))
        grid._cache["layout"] = (slices, outer, basis)
    return grid._cache["layout"]


def _prepare(grid: FerreGrid, flux: np.ndarray, ivar: np.ndarray) -> _Prepared:
    y = np.asarray(flux, dtype=float)[grid.pixels]
    w = np.asarray(ivar, dtype=float)[grid.pixels]
    ok = np.isfinite(y) & np.isfinite(w) & (w > 0)
    slices, _, _ = _chip_layout(grid)
    active = []
    for c, sl in enumerate(slices):
        if np.count_nonzero(ok[sl]) > 2 * (CONTINUUM_DEGREE + 1):
            active.append(c)
        else:   # too few pixels to solve the chip's continuum: leave the chip out
            ok[sl] = False
    w = np.where(ok, w, 0.0)
    y = np.where(ok, y, 1.0)
    wy = w * y
    return _Prepared(y, w, wy, float(np.sum(wy * y)), np.array(active, dtype=np.int64), int(ok.sum()))


def _continuum_coefficients(grid: FerreGrid, p: _Prepared, model: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coef, b): per active chip the polynomial continuum that best scales ``model`` to the data."""
    _, outer, basis = _chip_layout(grid)
    k = CONTINUUM_DEGREE + 1
    wm = p.w * model
    A = ((wm * model) @ outer).reshape(-1, k, k)[p.chips]
    b = ((p.wy * model) @ basis).reshape(-1, k)[p.chips]
    try:
        coef = np.linalg.solve(A, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        coef = np.array([np.linalg.lstsq(a, v, rcond=None)[0] for a, v in zip(A, b, strict=True)])
    return coef, b


def _chi2(grid: FerreGrid, p: _Prepared, model: np.ndarray) -> float:
    """χ² of ``model`` with the per-chip polynomial continuum solved linearly (profile χ²)."""
    coef, b = _continuum_coefficients(grid, p, model)
    return max(p.yy - float(np.sum(coef * b)), 0.0)


def _scaled_model(grid: FerreGrid, p: _Prepared, model: np.ndarray) -> np.ndarray:
    """``model`` times its best per-chip continuum (what the χ² compares with the data)."""
    _, _, basis = _chip_layout(grid)
    k = CONTINUUM_DEGREE + 1
    coef, _ = _continuum_coefficients(grid, p, model)
    full = np.zeros((len(continuum.CHIPS), k))
    full[p.chips] = coef
    return model * (basis @ full.ravel())


def _coarse_scan(grid: FerreGrid, p: _Prepared) -> np.ndarray:
    """χ² (n_nodes,) of every node with one scale factor per chip, on every COARSE_STRIDE-th pixel."""
    blocks = grid.coarse_arrays()
    chi2 = np.zeros(grid.n_nodes)
    for c in p.chips:
        sl, sub, sub2 = blocks[c]
        w = p.w[sl][::COARSE_STRIDE]
        y = p.y[sl][::COARSE_STRIDE]
        mm = sub2 @ w.astype(np.float32)
        ym = sub @ (w * y).astype(np.float32)
        chi2 += float(np.sum(w * y * y)) - ym.astype(float) ** 2 / np.maximum(mm.astype(float), 1e-300)
    return chi2


def _pick_starts(grid: FerreGrid, chi2: np.ndarray, k: int) -> list[np.ndarray]:
    """The k best nodes that are pairwise at least two nodes apart in some dimension."""
    order = np.argsort(chi2)
    chosen: list[np.ndarray] = []
    for node in order[: min(order.size, 400)]:
        idx = np.array(np.unravel_index(int(node), grid.shape), dtype=float)
        if all(np.max(np.abs(idx - c)) >= 2 for c in chosen):
            chosen.append(idx)
            if len(chosen) == k:
                break
    return chosen


def _hessian(f: Any, x: np.ndarray, h: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Central finite-difference Hessian of f at x (stencil shifted inwards at the boundary)."""
    x = np.clip(x, lo + h, hi - h)
    d = x.size
    f0 = f(x)
    H = np.empty((d, d))
    e = np.eye(d) * h
    fp = [f(x + e[i]) for i in range(d)]
    fm = [f(x - e[i]) for i in range(d)]
    for i in range(d):
        H[i, i] = (fp[i] - 2.0 * f0 + fm[i]) / h**2
        for j in range(i + 1, d):
            fpp, fpm = f(x + e[i] + e[j]), f(x + e[i] - e[j])
            fmp, fmm = f(x - e[i] + e[j]), f(x - e[i] - e[j])
            H[i, j] = H[j, i] = (fpp - fpm - fmp + fmm) / (4.0 * h * h)
    return H


def _none_if_nan(value: float | None) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _empty_row(snr: float | None, frozen: Mapping[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"snr": _none_if_nan(snr)}
    for d in DIMENSIONS:
        row[f"frozen_{d}"] = d in frozen
    for d in DIMENSIONS:
        row[f"initial_{d}"] = None
    for d in DIMENSIONS:
        row[d] = None
        row[f"u_{d}"] = None
    row["log_chisq_fit"] = None
    row["log_snr_sq"] = (None if snr is None or not math.isfinite(snr) or snr <= 0
                         else float(2.0 * math.log10(snr)))
    row["bitmask_flag"] = 0
    return row


def _snr_of(spectrum: Spectrum, y: np.ndarray, w: np.ndarray) -> float | None:
    snr = spectrum.meta.get("snr")
    if snr is not None:
        try:
            value = float(snr)
        except (TypeError, ValueError):
            value = float("nan")
        if math.isfinite(value):
            return value
    good = w > 0
    if not good.any():
        return None
    return float(np.median(y[good] * np.sqrt(w[good])))


def _check_frozen(grid: FerreGrid, frozen: Mapping[str, float] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in (frozen or {}).items():
        if name not in grid.names:
            raise FerreError(f"cannot freeze {name!r}: the grid's dimensions are {grid.names}")
        a = grid.axis(name)
        v = float(value)
        if not (math.isfinite(v) and a.start - 1e-9 <= v <= a.stop + 1e-9):
            raise FerreError(f"frozen {name}={value} outside the grid's {a.start}..{a.stop}")
        out[name] = v
    if len(out) == len(grid.names):
        raise FerreError("every grid dimension is frozen: nothing to fit")
    return out


def _initial_for(initial: Any, i: int, spectrum: Spectrum) -> Mapping[str, float] | None:
    if initial is None:
        guess = spectrum.meta.get("initial")
        return guess if isinstance(guess, Mapping) else None
    if isinstance(initial, Mapping):
        return initial
    return initial[i]


def fit_spectra(
    grid: FerreGrid,
    spectra: Sequence[Spectrum],
    *,
    frozen: Mapping[str, float] | None = None,
    initial: Mapping[str, float] | Sequence[Mapping[str, float] | None] | None = None,
) -> list[dict[str, Any]]:
    """Fit every spectrum (raw rest-frame apStar rows) against the grid; one ``astra.ferre``
    row dict per spectrum (see the module docstring for the steps and flags).

    ``frozen``: grid dimensions held at fixed values (FerreError for a dimension the grid lacks
    or a value outside it). ``initial``: one label mapping for all spectra, or one per spectrum
    (None entries allowed; default ``spectrum.meta["initial"]`` if present); it is added to the
    coarse scan's starts, clipped into the grid (``START_OUTSIDE_GRID``) when outside. Spectra
    whose ``meta["normalized"]`` is True are taken as already normalised by
    :mod:`~astra_dagster.methods.continuum`. Raises only for a wrong grid, wrong options or a
    spectrum that is not on the rest-frame apStar grid.
    """
    if not isinstance(grid, FerreGrid):
        raise FerreError(f"fit_spectra needs a FerreGrid, got {type(grid).__name__}")
    fingerprint = grid.meta.get("continuum_fingerprint")
    if fingerprint is not None and fingerprint != continuum.continuum_fingerprint():
        raise FerreError("the grid was normalised with a different continuum rule "
                         f"({fingerprint} != {continuum.continuum_fingerprint()}); rebuild it")
    fixed = _check_frozen(grid, frozen)
    if initial is not None and not isinstance(initial, Mapping) and len(initial) != len(spectra):
        raise FerreError(f"{len(initial)} initial guesses for {len(spectra)} spectra")
    return [_fit_one(grid, s, fixed, _initial_for(initial, i, s)) for i, s in enumerate(spectra)]


def _fit_one(grid: FerreGrid, spectrum: Spectrum, fixed: dict[str, float],
             initial: Mapping[str, float] | None) -> dict[str, Any]:
    if spectrum.meta.get("normalized"):
        continuum.check_apstar_grid(spectrum.wavelength, str(spectrum.meta.get("path") or "spectrum"))
        norm = spectrum
        chip_flags = int(spectrum.meta.get("continuum_flags", 0) or 0)
    else:
        norm = continuum.normalize(spectrum)
        chip_flags = int(norm.meta["continuum_flags"])
    p = _prepare(grid, norm.flux, norm.ivar)
    snr = _snr_of(spectrum, p.y, p.w)
    row = _empty_row(snr, fixed)
    flags = FLAGS["CHIP_FAILED"] if chip_flags else 0
    names = grid.names
    free = np.array([n not in fixed for n in names])
    shape = np.array(grid.shape, dtype=float)
    base = np.array([grid.axis(n).to_index(fixed[n]) if n in fixed else 0.0 for n in names])
    n_cont = int(p.chips.size) * (CONTINUUM_DEGREE + 1)
    if p.n_used < MIN_PIXELS or p.chips.size == 0:
        row["bitmask_flag"] = flags | FLAGS["TOO_FEW_PIXELS"]
        return row

    def full(xf: np.ndarray) -> np.ndarray:
        x = base.copy()
        x[free] = xf
        return x

    def chi2_at(x: np.ndarray) -> float:
        """Profile χ² of the grid model at fractional indices ``x`` (all dimensions)."""
        return _chi2(grid, p, 1.0 - grid.interpolate_depth(x).astype(float))

    def objective(xf: np.ndarray) -> float:
        return chi2_at(full(xf))

    # starting points: given initial guess (clipped), then the best separated nodes of the scan
    starts: list[np.ndarray] = []
    start_labels: np.ndarray | None = None
    if initial is not None:
        guess = np.array([grid.axis(n).to_index(fixed.get(n, initial.get(n, np.nan))) if
                          (n in fixed or initial.get(n) is not None) else np.nan for n in names], dtype=float)
        if np.all(np.isfinite(guess)):
            clipped = np.clip(guess, 0.0, shape - 1.0)
            if np.any(np.abs(clipped - guess) > 1e-9):
                flags |= FLAGS["START_OUTSIDE_GRID"]
            starts.append(clipped)
            start_labels = clipped
    scan = _coarse_scan(grid, p)
    if fixed:   # restrict the scan to the nodes next to the frozen values
        ok = np.ones(grid.n_nodes, dtype=bool)
        idx = np.unravel_index(np.arange(grid.n_nodes), grid.shape)
        for k, n in enumerate(names):
            if n in fixed:
                ok &= np.abs(idx[k] - base[k]) < 1.0
        scan = np.where(ok, scan, np.inf)
    for node in _pick_starts(grid, scan, N_STARTS):
        node[~free] = base[~free]
        starts.append(node)
    if start_labels is None:
        start_labels = starts[0]
    for k, n in enumerate(names):
        row[f"initial_{n}"] = grid.axis(n).to_value(start_labels[k])

    options = {"xatol": 2e-3, "fatol": 1e-3, "maxfev": 1500, "adaptive": False}

    def run(mask: np.ndarray, x_start: np.ndarray, step: float) -> Any:
        """Nelder–Mead over the dimensions in ``mask``, the others held at ``x_start``."""
        bounds = [(0.0, float(s - 1)) for s in shape[mask]]
        x0 = x_start[mask]
        simplex = [x0]
        for j in range(x0.size):
            v = x0.copy()
            v[j] = v[j] + step if v[j] + step <= bounds[j][1] else v[j] - step
            simplex.append(v)

        def f(xm: np.ndarray) -> float:
            x = x_start.copy()
            x[mask] = xm
            return chi2_at(x)

        return minimize(f, x0, method="Nelder-Mead", bounds=bounds,
                        options={**options, "initial_simplex": np.array(simplex)})

    optional = free & np.array([n in OPTIONAL_DIMENSIONS for n in names])
    if optional.any() and (free & ~optional).any():
        # Restarts over the main dimensions with the optional ones (v sin i, C, N, ...) held at
        # their start node: on a node an interpolation reads 2^4 grid rows instead of 2^D.
        # Then one search over all free dimensions from the best (a 6-D grid: 3x faster).
        main = free & ~optional
        staged = []
        for s in starts:
            r = run(main, s, 0.5)
            x = s.copy()
            x[main] = r.x
            staged.append((r.fun, x))
        best = run(free, min(staged, key=lambda fx: fx[0])[1], 0.3)
    else:
        results = [run(free, s, 0.5) for s in starts]
        best = min(results, key=lambda r: r.fun)
        polish = run(free, full(best.x), 0.15)
        if polish.fun <= best.fun:
            best = polish
    if not best.success and best.nfev >= options["maxfev"]:
        flags |= FLAGS["NOT_CONVERGED"]
    x_best = full(np.clip(best.x, 0.0, shape[free] - 1.0))
    chi2_best = float(best.fun)
    dof = max(p.n_used - int(free.sum()) - n_cont, 1)
    red = chi2_best / dof
    row["log_chisq_fit"] = float(math.log10(max(red, 1e-30)))
    if red > HIGH_CHI2:
        flags |= FLAGS["HIGH_CHI2"]
    # no information: a line-free continuum is (nearly) as good as the best model
    chi2_flat = _chi2(grid, p, np.ones(grid.n_pixels))
    if chi2_flat - chi2_best < FLAT_DELTA_CHI2:
        row["bitmask_flag"] = flags | FLAGS["FLAT_CHI2"]
        return row
    # a hot star fitted at the grid's warm edge: its Brackett lines give it away (labels None)
    best_model = _scaled_model(grid, p, 1.0 - grid.interpolate_depth(x_best).astype(float))
    if hydrogen.has_hot_star_lines(apstar_wavelength()[grid.pixels], p.y, best_model, p.w):
        row["bitmask_flag"] = flags | FLAGS["HYDROGEN_LINES"]
        return row
    low_ok = np.array([n == "lgvsini" for n in names])[free]   # v sin i below 1 km/s is unresolved, not off-grid
    edge = ((x_best[free] < EDGE_TOLERANCE) & ~low_ok) | (x_best[free] > shape[free] - 1.0 - EDGE_TOLERANCE)
    if edge.any():
        flags |= FLAGS["AT_GRID_EDGE"]
    for k, n in enumerate(names):
        row[n] = grid.axis(n).to_value(x_best[k])
    H = _hessian(objective, x_best[free], HESSIAN_STEP, np.zeros(int(free.sum())), shape[free] - 1.0)
    try:
        eig = np.linalg.eigvalsh(H)
        if not np.all(np.isfinite(eig)) or eig.min() <= 0:
            raise np.linalg.LinAlgError("not positive definite")
        cov = 2.0 * np.linalg.inv(H) * max(1.0, red)
        sig = np.sqrt(np.diag(cov))
        for k, n in enumerate(np.array(names)[free]):
            formal = sig[k] * grid.axis(str(n)).step
            floor = float(grid.meta.get(f"floor_{n}", 0.0) or 0.0)
            row[f"u_{n}"] = _none_if_nan(math.hypot(formal, floor if math.isfinite(floor) else 0.0))
    except np.linalg.LinAlgError:
        flags |= FLAGS["BAD_CURVATURE"]
    row["bitmask_flag"] = flags
    return row

