"""FERRE's result flags (:data:`FLAGS`), the fit's thresholds and settings, and :class:`FerreError`."""

from __future__ import annotations

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
    "POOR_MODEL_MATCH": 1 << 9,   # reduced χ² above mismatch.POOR_MATCH_CHI2: labels None
    "OUTSIDE_MODEL": 1 << 10,     # best fit where the physical model has no spectrum: labels None
}

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


class FerreError(ValueError):
    """Bad grid, bad grid file or bad call (the message names the problem)."""


def describe_flags(value: int) -> list[str]:
    """Names of the :data:`FLAGS` bits set in ``value``."""
    return [name for name, bit in FLAGS.items() if int(value) & bit]
