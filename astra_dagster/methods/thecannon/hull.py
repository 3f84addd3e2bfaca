"""The convex hull of the training labels (the OUTSIDE_HULL test)."""

from __future__ import annotations

from typing import Any

import numpy as np


class LabelHull:
    """Convex hull of training labels (scaled); ``contains`` is exact.

    Delaunay triangulation (Qhull) for 2 ≤ K ≤ 6 (falls back to the LP test if Qhull fails on
    degenerate points); for K = 1 the min-max interval; otherwise an LP feasibility test per point
    (is x a convex combination of the training points?).
    """

    def __init__(self, points: np.ndarray) -> None:
        self.points = np.asarray(points, dtype=float)
        self._delaunay: Any = None
        n, k = self.points.shape
        if 2 <= k <= 6 and n > k + 1:
            from scipy.spatial import Delaunay, QhullError

            try:
                self._delaunay = Delaunay(self.points)
            except QhullError:
                self._delaunay = None

    def contains(self, x: np.ndarray) -> np.ndarray:
        """Boolean (m,) for points (m, K); non-finite points are outside."""
        x = np.atleast_2d(np.asarray(x, dtype=float))
        finite = np.all(np.isfinite(x), axis=1)
        out = np.zeros(x.shape[0], dtype=bool)
        lo, hi = self.points.min(axis=0), self.points.max(axis=0)
        in_box = finite & np.all((x >= lo) & (x <= hi), axis=1)  # outside the box: outside the hull
        if not in_box.any():
            return out
        if self.points.shape[1] == 1:
            out[in_box] = True
        elif self._delaunay is not None:
            out[in_box] = self._delaunay.find_simplex(x[in_box]) >= 0
        else:
            out[in_box] = [self._lp_contains(p) for p in x[in_box]]
        return out

    def _lp_contains(self, x: np.ndarray) -> bool:
        from scipy.optimize import linprog

        n = self.points.shape[0]
        a_eq = np.vstack([self.points.T, np.ones((1, n))])
        b_eq = np.append(x, 1.0)
        res = linprog(np.zeros(n), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
        return bool(res.status == 0)
