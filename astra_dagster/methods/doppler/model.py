"""Template × continuum model of one prepared spectrum, with its analytic Jacobian."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import fft as sp_fft

from astra_dagster.methods.doppler.emulator import Emulator
from astra_dagster.methods.doppler.flags import CONTINUUM_ORDER, DopplerError
from astra_dagster.methods.doppler.prepare import _Prepared
from astra_dagster.spectra.spectrum import C_KMS

_OFFSETS = np.arange(-1, 3)


def _cubic_weights(t: np.ndarray, derivative: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Catmull-Rom interpolation weights (n, 4) for offsets -1..2, and their t-derivatives."""
    w = np.empty((t.size, 4))
    t2 = t * t
    w[:, 0] = 0.5 * t * (t * (2.0 - t) - 1.0)
    w[:, 1] = 0.5 * (t2 * (3.0 * t - 5.0) + 2.0)
    w[:, 2] = 0.5 * t * (t * (4.0 - 3.0 * t) + 1.0)
    w[:, 3] = 0.5 * t2 * (t - 1.0)
    if not derivative:
        return w, None
    dw = np.empty((t.size, 4))
    dw[:, 0] = 0.5 * (t * (4.0 - 3.0 * t) - 1.0)
    dw[:, 1] = 0.5 * t * (9.0 * t - 10.0)
    dw[:, 2] = 0.5 * (t * (8.0 - 9.0 * t) + 1.0)
    dw[:, 3] = 0.5 * t * (3.0 * t - 2.0)
    return w, dw


def _interpolate(k: np.ndarray, weights: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Σ_j weights[:, j] · g[k + j − 1]: 4-point interpolation of grid values ``g`` ((n_grid,) or
    (n_grid, m)) around grid index k (every k within 1..n_grid − 3, as :meth:`_VisitModel._positions`
    guarantees). Plain gathers: building a sparse matrix per call cost more than the products."""
    if g.ndim == 2:
        weights = weights[:, :, None]
    out = weights[:, 0] * g[k - 1]
    for j in range(1, 4):
        out += weights[:, j] * g[k + j - 1]
    return out


class _VisitModel:
    """Template × continuum for one prepared spectrum and one emulator.

    Parameters: ``[teff, logg, fe_h, v, a_0 .. a_{n_cont-1}]``.
    """

    def __init__(self, prep: _Prepared, emulator: Emulator, v: float = 0.0, vsini: float = 0.0):
        self.em = emulator
        # Extra rotational broadening applied to every template spectrum (0: none).
        self.vsini = float(vsini)
        self._kernel = emulator.rotation_kernel(vsini) if vsini > 0 else None
        self._half = 0 if self._kernel is None else self._kernel.size // 2
        self._kernel_fft: dict[int, np.ndarray] = {}
        self.x = prep.ln_wave
        self.f = prep.flux
        self.basis = prep.basis
        chip = prep.chip
        self.ivar = prep.ivar
        self.rejected = np.zeros(self.x.size, dtype=bool)
        self.set_weights(v)
        # Pixels are sorted by wavelength, so each chip is one contiguous block of rows and
        # the continuum part of the Jacobian is block-diagonal.
        n_b = CONTINUUM_ORDER + 1
        edges = np.searchsorted(chip, np.arange(prep.n_chips + 1))
        self.blocks = [(int(edges[k]), int(edges[k + 1]), 4 + n_b * k, 4 + n_b * (k + 1))
                       for k in range(prep.n_chips)]
        self.n_cont = n_b * prep.n_chips
        self.n_params = 4 + self.n_cont
        self._jac = np.zeros((self.x.size, self.n_params))

    def set_weights(self, v: float) -> None:
        """Pixel weights 1/(σ² + s²) with the emulator's model variance s² taken where each
        pixel lands for velocity ``v``: s² is large at the lines the emulator gets wrong, and
        weights misaligned with the lines would bias the velocity."""
        ivar = self.ivar
        if self.em.s2 is not None:
            u = (self.x - math.log1p(v / C_KMS) - self.em.ln_start) / self.em.ln_step
            i = np.clip(np.rint(u).astype(np.int64), 0, self.em.n_pixels - 1)
            ivar = ivar / (1.0 + ivar * self.em.s2[i])
        self.sw = np.where(self.rejected, 0.0, np.sqrt(ivar))

    @property
    def n_used(self) -> int:
        """Pixels with weight (rejected outliers have none)."""
        return int(np.count_nonzero(self.sw))

    def reject(self, bad: np.ndarray) -> None:
        """Give no weight to the ``bad`` pixels from now on."""
        self.rejected |= bad
        self.sw = np.where(self.rejected, 0.0, self.sw)

    def continuum(self, coef: np.ndarray) -> np.ndarray:
        cont = np.empty(self.x.size)
        for r0, r1, c0, c1 in self.blocks:
            cont[r0:r1] = self.basis[r0:r1] @ coef[c0 - 4:c1 - 4]
        return cont

    def _emulate(self, lo: int, hi: int, mat: np.ndarray) -> np.ndarray:
        """``theta[lo:hi] @ mat``, broadened by the rotation kernel when ``vsini`` > 0 (the
        product is taken on a wider range, then convolved and cut back to [lo, hi))."""
        em = self.em
        h = self._half
        if h == 0:
            return em.theta[lo:hi] @ mat
        if lo - h < 0 or hi + h > em.n_pixels:
            raise DopplerError(f"rotational broadening of {self.vsini:g} km/s runs off the template {em.name}")
        g = em.theta[lo - h:hi + h] @ mat
        n_fft = sp_fft.next_fast_len(g.shape[0])
        kf = self._kernel_fft.get(n_fft)
        if kf is None:
            assert self._kernel is not None
            kf = self._kernel_fft[n_fft] = sp_fft.rfft(self._kernel, n_fft)
        spec = sp_fft.rfft(g, n_fft, axis=0)
        spec *= kf if g.ndim == 1 else kf[:, None]
        return sp_fft.irfft(spec, n_fft, axis=0)[2 * h:2 * h + (hi - lo)]

    def _positions(self, v: float) -> tuple[np.ndarray, np.ndarray, int, int]:
        em = self.em
        u = (self.x - math.log1p(v / C_KMS) - em.ln_start) / em.ln_step
        i0 = np.floor(u).astype(np.int64)
        lo = int(i0[0]) - 1  # pixels are sorted, so the extremes are at the ends
        hi = int(i0[-1]) + 3
        if lo < 0 or hi > em.n_pixels:
            raise DopplerError(f"velocity {v:.1f} km/s shifts the spectrum off the template {em.name}")
        return i0 - lo, u - i0, lo, hi

    def template(self, labels: np.ndarray, v: float, jacobian: bool = True,
                 grid_flux: tuple[int, np.ndarray] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Template flux at the pixels, d/dlabels (n, 3) and d/dv (n,).

        ``grid_flux`` = (first pixel, emulator flux on the grid) reuses one evaluation of the
        emulator for several velocities at fixed labels (flux only).
        """
        em = self.em
        k, t, lo, hi = self._positions(v)
        if grid_flux is not None:
            start, g = grid_flux
            k = k + (lo - start)
            if k[0] < 1 or k[-1] + 2 >= g.shape[0]:
                raise DopplerError(f"velocity {v:.1f} km/s is outside the precomputed template range")
        elif jacobian:
            vec, dvec = em.label_vector_and_derivatives(labels)
            g = self._emulate(lo, hi, np.column_stack([vec, dvec]))
        else:
            g = self._emulate(lo, hi, em.label_vector(labels))
        w, dw = _cubic_weights(t, derivative=g.ndim == 2)
        vals = _interpolate(k, w, g)
        if g.ndim == 1:
            return vals, None, None
        assert dw is not None
        dflux_du = _interpolate(k, dw, g[:, 0])
        dflux_dv = dflux_du * (-1.0 / em.ln_step) / (C_KMS + v)
        return vals[:, 0], vals[:, 1:], dflux_dv

    def grid_flux(self, labels: np.ndarray, vmin: float, vmax: float) -> tuple[int, np.ndarray]:
        """Emulator flux on the grid pixels needed for velocities vmin..vmax."""
        _, _, lo1, hi1 = self._positions(vmax)
        _, _, lo0, hi0 = self._positions(vmin)
        lo, hi = min(lo0, lo1), max(hi0, hi1)
        return lo, self._emulate(lo, hi, self.em.label_vector(labels))

    def residuals(self, p: np.ndarray, jacobian: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Weighted residuals sw·(f − model) and the weighted model Jacobian (n, n_params)."""
        flux, dlab, dv = self.template(p[:3], float(p[3]), jacobian)
        return self._assemble(p, flux, dlab, dv, jacobian)

    def _assemble(self, p: np.ndarray, flux: np.ndarray, dlab: np.ndarray | None,
                  dv: np.ndarray | None, jacobian: bool) -> tuple[np.ndarray, np.ndarray | None]:
        cont = self.continuum(p[4:])
        r = self.sw * (self.f - flux * cont)
        if not jacobian:
            return r, None
        # One buffer per model: the optimiser never needs two Jacobians at once, and the
        # off-block zeros of the continuum part stay zero.
        jac = self._jac
        scw = self.sw * cont
        np.multiply(dlab, scw[:, None], out=jac[:, :3])
        jac[:, 3] = 0.0 if dv is None else dv * scw
        fsw = flux * self.sw
        for r0, r1, c0, c1 in self.blocks:
            np.multiply(self.basis[r0:r1], fsw[r0:r1, None], out=jac[r0:r1, c0:c1])
        return r, jac

    def at_fixed_velocity(self, v: float) -> Any:
        """Residual function for fixed v: the emulator basis is interpolated to the pixels once,
        so each evaluation is one (n_pix × n_terms) product. Its Jacobian has a zero v column."""
        k, t, lo, hi = self._positions(v)
        w, _ = _cubic_weights(t, derivative=False)
        theta = self.em.theta[lo:hi] if self._half == 0 else self._emulate(lo, hi, np.eye(self.em.theta.shape[1]))
        basis = _interpolate(k, w, theta)

        def fun(p: np.ndarray, jacobian: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
            if jacobian:
                vec, dvec = self.em.label_vector_and_derivatives(p[:3])
                vals = basis @ np.column_stack([vec, dvec])
                return self._assemble(p, vals[:, 0], vals[:, 1:], None, True)
            return self._assemble(p, basis @ self.em.label_vector(p[:3]), None, None, False)

        return fun

    def solve_continuum(self, labels: np.ndarray, v: float,
                        grid_flux: tuple[int, np.ndarray] | None = None) -> tuple[np.ndarray, float]:
        """Best continuum coefficients for fixed labels and velocity, and the χ²."""
        flux, _, _ = self.template(labels, v, jacobian=False, grid_flux=grid_flux)
        fsw = flux * self.sw
        b = self.f * self.sw
        coef = np.zeros(self.n_cont)
        chi2 = 0.0
        for r0, r1, c0, c1 in self.blocks:
            a_mat = self.basis[r0:r1] * fsw[r0:r1, None]
            gram = a_mat.T @ a_mat
            gram[np.diag_indices_from(gram)] += 1e-12 * np.trace(gram)
            c = np.linalg.solve(gram, a_mat.T @ b[r0:r1])
            coef[c0 - 4:c1 - 4] = c
            res = b[r0:r1] - a_mat @ c
            chi2 += float(res @ res)
        return coef, chi2
