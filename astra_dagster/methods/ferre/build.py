"""Building the grid from the generator (:func:`train_model`: FERRE has no training, its "model" is
the grid) and its held-out error floors; the grid options :data:`DEFAULT_GRID`, :data:`FULL_GRID`
and :data:`ROTATION_GRID`.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from astra_dagster.methods import continuum
from astra_dagster.methods.ferre.fit import fit_spectra
from astra_dagster.methods.ferre.flags import CONTINUUM_DEGREE, FerreError
from astra_dagster.methods.ferre.grid import (
    DEPTH_QUANTUM,
    GRID_DIMENSIONS,
    OPTIONAL_DIMENSIONS,
    FerreGrid,
    GridAxis,
    _axis,
)
from astra_dagster.methods.progress import Progress, reporter
from astra_dagster.spectra import synth
from astra_dagster.spectra.spectrum import Spectrum, apstar_wavelength

#: Default grid of :func:`train_model`: Teff, logg, [M/H] (2145 nodes), the labels the
#: generator's physical model carries; [α/M] is off (step 0) because its spectra do not depend
#: on it. Nodes in the physical model's hole (Teff > 5500 K with logg < 3.5: no Synspec
#: spectrum) are rendered at the nearest covered logg, and a fit that lands there is flagged
#: OUTSIDE_MODEL with no labels.
DEFAULT_GRID: dict[str, float] = {
    "teff_min": 3500.0, "teff_max": 7000.0, "teff_step": 250.0,
    "logg_min": 0.0, "logg_max": 5.0, "logg_step": 0.5,
    "metals_min": -2.5, "metals_max": 0.5, "metals_step": 0.25,
    "alpha_min": 0.0, "alpha_max": 0.0, "alpha_step": 0.0,
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
    out = {"teff": lab["teff"], "logg": lab["logg"], "fe_h": lab["metals"], "alpha_m": lab.get("o_mg_si_s_ca_ti", 0.0)}
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
                progress: Progress | None = None, **options: float) -> FerreGrid:
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

    ``progress`` gets a line per ``chunk`` of grid nodes and around the held-out fits (it does
    not change the grid).
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
    report = reporter(progress, "ferre")
    report(f"building a {n_nodes}-node grid ({' x '.join(f'{a.n} {a.name}' for a in axes)})")
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
        # a grid must be rectangular: nodes the physical model does not cover get the nearest
        # covered spectrum, and fits landing there are flagged OUTSIDE_MODEL (fit.py)
        flux = np.array([synth.synthesize(_node_labels(names, v), wave, settings, edge="clip") for v in block])
        norm, _, flags = continuum.normalize_arrays(wave, flux, np.broadcast_to(ivar, flux.shape),
                                                    return_flags=True)
        if np.any(flags):
            bad = [dict(zip(names, block[i], strict=True)) for i in np.flatnonzero(flags)[:3]]
            raise FerreError(f"continuum normalisation failed for grid nodes such as {bad}")
        d = (1.0 - norm[:, pixels]) / DEPTH_QUANTUM
        if not np.all(np.abs(d) < 32767):
            raise FerreError("grid spectra with normalised flux outside 0..2: cannot store them")
        depth[lo:lo + len(block)] = np.rint(d).astype(np.int16)
        report(f"grid: {lo + len(block)}/{n_nodes} nodes")
    seconds = time.perf_counter() - t0
    meta = {"generator": synth.GENERATOR_VERSION, "settings": settings.name, "seed": int(seed),
            "spectral_model": settings.model,
            "continuum_fingerprint": continuum.continuum_fingerprint(), "build_seconds": round(seconds, 1),
            "interpolation": "multilinear", "continuum_degree": CONTINUUM_DEGREE}
    grid = FerreGrid(axes, depth, pixels, meta)
    if n_validation > 0:
        t1 = time.perf_counter()
        report(f"error floors: fitting {n_validation} held-out stars")
        floors = held_out_errors(grid, int(n_validation), seed)
        report("error floors: " + ", ".join(f"{k} {v:.3g}" for k, v in floors.items()))
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
    rows = fit_spectra(grid, spectra, screen_mismatch=False)  # noiseless: χ² is no mismatch test here
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
