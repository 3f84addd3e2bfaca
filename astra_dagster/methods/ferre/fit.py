"""The fit of a spectrum against the grid (:func:`fit_spectra`): node scan, Nelder–Mead from the best
starts, uncertainties from the χ² curvature, flags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

from astra_dagster.methods import continuum, hydrogen, mismatch
from astra_dagster.methods.ferre.flags import (
    COARSE_STRIDE,
    CONTINUUM_DEGREE,
    EDGE_TOLERANCE,
    FLAGS,
    FLAT_DELTA_CHI2,
    HESSIAN_STEP,
    HIGH_CHI2,
    MIN_PIXELS,
    N_STARTS,
    FerreError,
)
from astra_dagster.methods.ferre.grid import DIMENSIONS, OPTIONAL_DIMENSIONS, FerreGrid, _chip_layout
from astra_dagster.spectra.spectrum import Spectrum, apstar_wavelength


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
    screen_mismatch: bool = True,
) -> list[dict[str, Any]]:
    """Fit every spectrum (raw rest-frame apStar rows) against the grid; one ``astra.ferre``
    row dict per spectrum (see the module docstring for the steps and flags).

    ``frozen``: grid dimensions held at fixed values (FerreError for a dimension the grid lacks
    or a value outside it). ``initial``: one label mapping for all spectra, or one per spectrum
    (None entries allowed; default ``spectrum.meta["initial"]`` if present); it is added to the
    coarse scan's starts, clipped into the grid (``START_OUTSIDE_GRID``) when outside. Spectra
    whose ``meta["normalized"]`` is True are taken as already normalised by
    :mod:`~astra_dagster.methods.continuum`. Raises only for a wrong grid, wrong options or a
    spectrum that is not on the rest-frame apStar grid. ``screen_mismatch=False`` skips the
    ``POOR_MODEL_MATCH`` screen: for noiseless calibration spectra, whose reduced χ² measures the
    grid's interpolation error against a token ivar, not a mismatch with the data.
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
    return [_fit_one(grid, s, fixed, _initial_for(initial, i, s), screen_mismatch)
            for i, s in enumerate(spectra)]


def _fit_one(grid: FerreGrid, spectrum: Spectrum, fixed: dict[str, float],
             initial: Mapping[str, float] | None, screen_mismatch: bool = True) -> dict[str, Any]:
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
    # no grid spectrum explains the data (a real star today, issue #11): no labels
    if screen_mismatch and mismatch.is_poor_match(red, snr):
        row["bitmask_flag"] = flags | FLAGS["POOR_MODEL_MATCH"]
        return row
    # a hot star fitted at the grid's warm edge: its Brackett lines give it away (labels None)
    best_model = _scaled_model(grid, p, 1.0 - grid.interpolate_depth(x_best).astype(float))
    if hydrogen.has_hot_star_lines(apstar_wavelength()[grid.pixels], p.y, best_model, p.w):
        row["bitmask_flag"] = flags | FLAGS["HYDROGEN_LINES"]
        return row
    if grid.meta.get("spectral_model") == "physical" and not _covered(grid, names, x_best):
        row["bitmask_flag"] = flags | FLAGS["OUTSIDE_MODEL"]
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


def _covered(grid: FerreGrid, names: list[str], x: np.ndarray) -> bool:
    """Whether the fitted (teff, logg, metals) lies where the physical model has spectra (the grid
    nodes elsewhere are clamped copies, so a minimum there carries no information)."""
    from astra_dagster.spectra.physical import in_grid

    value = {n: grid.axis(n).to_value(x[k]) for k, n in enumerate(names)}
    return bool(in_grid(value["teff"], value["logg"], value["metals"]))
