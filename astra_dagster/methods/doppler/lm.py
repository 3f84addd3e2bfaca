"""Bounded Levenberg–Marquardt on the normal equations (the visit and the joint star fits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
