"""Vectorised numerics of training and test: L1 coordinate descent, the intrinsic scatter s², the
batched Levenberg-Marquardt and the covariance.
"""

from __future__ import annotations

import numpy as np

from astra_dagster.methods.thecannon.flags import LABEL_LIMIT
from astra_dagster.methods.thecannon.vectorizer import label_vector, label_vector_derivative


def _lasso_cd(A: np.ndarray, b: np.ndarray, lam: float, theta: np.ndarray,
              max_sweeps: int = 5000, tol: float = 1e-7) -> np.ndarray:
    """Minimise θᵀAθ - 2bᵀθ + λ Σ_{j≥1}|θ_j| for every pixel (A (P,T,T), b (P,T)) by cyclic
    coordinate descent, all pixels at once (warm start ``theta``).

    A pixel has converged when a whole sweep changes no coefficient by more than
    ``tol / √A_jj`` relative to ``√A_00`` (the model flux moves by less than ``tol`` in units of
    the pixel's weighted flux scale); converged pixels leave the working set every 10 sweeps.
    """
    theta = theta.copy()
    T = A.shape[1]
    work = np.arange(A.shape[0])
    Aw, bw, tw = A, b, theta.copy()
    diag = np.diagonal(Aw, axis1=1, axis2=2).copy()
    Atheta = np.einsum("pij,pj->pi", Aw, tw)
    half = 0.5 * lam
    for sweep in range(1, max_sweeps + 1):
        moved = np.zeros(work.size)
        for j in range(T):
            c = bw[:, j] - Atheta[:, j] + diag[:, j] * tw[:, j]
            new = c / diag[:, j] if j == 0 else np.sign(c) * np.maximum(np.abs(c) - half, 0.0) / diag[:, j]
            delta = new - tw[:, j]
            tw[:, j] = new
            Atheta += Aw[:, :, j] * delta[:, None]
            moved = np.maximum(moved, np.abs(delta) * np.sqrt(diag[:, j]))
        done = moved <= tol * np.sqrt(diag[:, 0])
        if done.all():
            theta[work] = tw
            return theta
        if sweep % 10 == 0 and done.any():
            theta[work[done]] = tw[done]
            keep = ~done
            work, Aw, bw, tw = work[keep], Aw[keep], bw[keep], tw[keep]
            diag, Atheta = diag[keep], Atheta[keep]
    theta[work] = tw
    return theta


def _scatter_dof(R2: np.ndarray, IV: np.ndarray, dof: np.ndarray, n_newton: int = 40) -> np.ndarray:
    """s² per pixel with Σ_n R2 IV / (1 + IV s²) = dof (0 where χ² ≤ dof already).

    Newton iterations on φ(s²) = 1/χ²(s²) - 1/dof, which is increasing and concave, so from
    s² = 0 they approach the root from below without overshooting (exact in one step when all
    ivar are equal and large, the noiseless-training case).
    """
    a = R2 * IV
    s2 = np.zeros(R2.shape[1])
    active = a.sum(axis=0) > dof
    for _ in range(n_newton):
        if not active.any():
            break
        ivk = IV[:, active]
        denom = 1.0 + ivk * s2[active]
        g = np.sum(a[:, active] / denom, axis=0)
        dg = -np.sum(a[:, active] * ivk / denom**2, axis=0)
        step = (1.0 / g - 1.0 / dof[active]) * g**2 / dg
        new = s2[active] + step
        done = np.abs(step) <= 1e-12 * np.maximum(new, 1e-30)
        s2[active] = new
        idx = np.flatnonzero(active)
        active[idx[done]] = False
    return s2


def _scatter_median(R2: np.ndarray, IV: np.ndarray, n_bisect: int = 100) -> np.ndarray:
    """s² per pixel with median_n(R2 IV / (1 + IV s²)) = 1 (annieslasso's rule), by bisection
    in log s² (the median is decreasing in s²); stars with ivar 0 count as χ² = 0 as there."""
    def med(s2: np.ndarray) -> np.ndarray:
        return np.median(R2 * IV / (1.0 + IV * s2), axis=0)

    s2 = np.zeros(R2.shape[1])
    need = med(s2) > 1.0
    if not need.any():
        return s2
    lo = np.full(int(need.sum()), -40.0)
    hi = np.log(np.max(R2[:, need], axis=0) + 1e-300) + 1.0
    Rn, IVn = R2[:, need], IV[:, need]
    for _ in range(n_bisect):
        mid = 0.5 * (lo + hi)
        above = np.median(Rn * IVn / (1.0 + IVn * np.exp(mid)), axis=0) > 1.0
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    s2[need] = np.exp(0.5 * (lo + hi))
    return s2


def _levenberg_marquardt(theta_t: np.ndarray, theta_t32: np.ndarray, terms: np.ndarray, x0: np.ndarray,
                         F: np.ndarray, W: np.ndarray, max_iterations: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched Levenberg-Marquardt for B problems: minimise Σ_p W (F - ℓ(x) θᵀ)² over scaled
    labels x (B, K), within ±LABEL_LIMIT. ``theta_t`` is θᵀ (T, P) (float64 for the model and
    χ², a float32 copy for the Jacobian, whose precision only affects the step direction).
    Returns x, χ² (B,), Jᵀ W J at x (B, K, K), converged (B,), residuals F - model (B, P)."""
    B, K = x0.shape
    W32 = W.astype(np.float32)

    def evaluate(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        vec = label_vector(x, terms)
        dvec = label_vector_derivative(x, terms).astype(np.float32)          # (b, T, K)
        r = F[rows] - vec @ theta_t
        jac = (dvec.transpose(0, 2, 1).reshape(-1, dvec.shape[1]) @ theta_t32).reshape(x.shape[0], K, -1)
        return r, jac, np.sum(W[rows] * r * r, axis=1)

    def normal(rows: np.ndarray, r: np.ndarray, jac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        jw = jac * W32[rows][:, None, :]
        return ((jw @ jac.transpose(0, 2, 1)).astype(float),
                np.einsum("bkp,bp->bk", jw, r.astype(np.float32)).astype(float))

    everyone = np.arange(B)
    x = x0.astype(float).copy()
    r, jac, chi2 = evaluate(x, everyone)
    H, g = normal(everyone, r, jac)
    resid = r
    lam = np.full(B, 1e-3)
    converged = np.zeros(B, dtype=bool)
    eye = np.eye(K)
    for _ in range(max_iterations):
        act = np.flatnonzero(~converged)
        if act.size == 0:
            break
        Ha = H[act]
        damp = Ha + lam[act, None, None] * (np.diagonal(Ha, axis1=1, axis2=2)[:, :, None] * eye) + 1e-12 * eye
        try:
            step = np.linalg.solve(damp, g[act][..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.stack([np.linalg.lstsq(d, gg, rcond=None)[0] for d, gg in zip(damp, g[act], strict=True)])
        xn = np.clip(x[act] + step, -LABEL_LIMIT, LABEL_LIMIT)
        rn, jn, cn = evaluate(xn, act)
        better = np.isfinite(cn) & (cn <= chi2[act])
        acc = act[better]
        gain = chi2[acc] - cn[better]
        small = (gain <= 1e-4 + 1e-10 * chi2[acc]) | (np.max(np.abs(xn[better] - x[acc]), axis=1) < 1e-8)
        x[acc], chi2[acc], resid[acc] = xn[better], cn[better], rn[better]
        if acc.size:
            H[acc], g[acc] = normal(acc, rn[better], jn[better])
        lam[acc] = np.maximum(lam[acc] * 0.2, 1e-9)
        converged[acc[small]] = True
        rej = act[~better]
        lam[rej] = lam[rej] * 10.0
        converged[rej[lam[rej] > 1e10]] = True   # no step downhill at any damping: a minimum
    return x, chi2, H, converged, resid


def _invert(H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of each (K, K) matrix; NaN and a True flag where not positive definite."""
    try:
        ci = np.linalg.inv(np.linalg.cholesky(H))
        return ci.transpose(0, 2, 1) @ ci, np.zeros(H.shape[0], dtype=bool)
    except np.linalg.LinAlgError:
        pass
    out = np.full(H.shape, np.nan)
    bad = np.zeros(H.shape[0], dtype=bool)
    for i, h in enumerate(H):   # only when some matrix is singular: find which
        try:
            ci = np.linalg.inv(np.linalg.cholesky(h))
            out[i] = ci.T @ ci
        except np.linalg.LinAlgError:
            bad[i] = True
    return out, bad
