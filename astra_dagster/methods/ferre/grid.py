"""The synthetic grid (:class:`FerreGrid`): its axes, multilinear interpolation of the stored line
depths, the per-chip continuum design, and its ``.npz`` file.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astra_dagster.methods import continuum
from astra_dagster.methods.ferre.flags import COARSE_STRIDE, CONTINUUM_DEGREE, FerreError
from astra_dagster.methods.modelfile import read_arrays, write_arrays
from astra_dagster.spectra.spectrum import APSTAR_NPIX

FORMAT = "astra-ferre-grid/1"

#: The eight FERRE dimensions of ``astra.ferre`` (column order of the seed schema).
DIMENSIONS: tuple[str, ...] = ("teff", "logg", "metals", "log10vdop", "o_mg_si_s_ca_ti", "lgvsini", "c", "n")
#: Dimensions a grid built here may have: c = [C/M], n = [N/M] (M = Fe in the generator).
GRID_DIMENSIONS: tuple[str, ...] = ("teff", "logg", "metals", "o_mg_si_s_ca_ti", "log10vdop", "lgvsini", "c", "n")
#: Optional dimensions: off (the generator's mean relation) unless their step is > 0. [α/M] is
#: optional since the generator's physical model does not carry it (its spectra have one [α/M]).
OPTIONAL_DIMENSIONS: tuple[str, ...] = ("o_mg_si_s_ca_ti", "log10vdop", "lgvsini", "c", "n")

#: Fixed-point unit of the stored line depths.
DEPTH_QUANTUM = 1.0 / 32000.0
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
