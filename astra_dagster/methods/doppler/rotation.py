"""Extra rotational broadening (step 6 of :mod:`astra_dagster.methods.doppler`): the v sin i that best
fits the line shapes with the line depths free.
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sp_fft

from astra_dagster.methods.doppler.model import _VisitModel

#: Extra rotational broadening tried on the templates (km/s), in order; the search stops once χ²
#: has risen more than _BROADENING_DCHI2 above its lowest value (past the minimum), keeps the
#: minimum only if it lowers χ² by more than _BROADENING_DCHI2, and refines it with a parabola
#: through the neighbouring values.
_VSINI_STEPS = (6.0, 9.0, 13.0, 18.0, 25.0, 35.0, 50.0, 70.0, 100.0, 140.0, 200.0, 280.0)
_BROADENING_DCHI2 = 25.0
#: Smaller extra broadening is not applied: below ~2 LSF pixels it is degenerate with the
#: templates' macroturbulence and label mismatch and did not improve velocities (measured).
_MIN_VSINI = 12.0
#: The broadening is re-measured at each broadened fit's labels, at most this many fits, until
#: it moves by less than _ROTATION_TOLERANCE (km/s).
_ROTATION_ROUNDS = 4
_ROTATION_TOLERANCE = 1.0


class _FreeDepthChi2:
    """χ² of ``continuum × (1 + β (T - 1))`` with the per-chip continuum polynomials and the
    line-depth scale β solved linearly, for many templates T: compares line *shapes* whatever
    the depths. The continuum part of the normal equations is the same for every T, so it is
    factored once and β comes from a Schur complement."""

    def __init__(self, model: _VisitModel, cont: np.ndarray):
        self.model = model
        self.y = model.f * model.sw
        self.cw = cont * model.sw
        self.blocks = []
        yy = float(self.y @ self.y)
        for r0, r1, _, _ in model.blocks:
            b = model.basis[r0:r1] * model.sw[r0:r1, None]
            gram = b.T @ b
            gram[np.diag_indices_from(gram)] += 1e-12 * np.trace(gram) + 1e-300
            inv = np.linalg.inv(gram)
            by = b.T @ self.y[r0:r1]
            yy -= float(by @ inv @ by)
            self.blocks.append((r0, r1, b, inv, inv @ by))
        self.chi2_continuum_only = yy

    def __call__(self, labels: np.ndarray, v: float, grid: tuple[int, np.ndarray]) -> float:
        flux, _, _ = self.model.template(labels, v, jacobian=False, grid_flux=grid)
        t = (flux - 1.0) * self.cw
        num = float(t @ self.y)
        den = float(t @ t)
        for r0, r1, b, inv, coef_y in self.blocks:
            bt = b.T @ t[r0:r1]
            num -= float(bt @ coef_y)
            den -= float(bt @ inv @ bt)
        if den <= 0:
            return self.chi2_continuum_only
        return self.chi2_continuum_only - num * num / den


def _broadening(model: _VisitModel, p: np.ndarray) -> float:
    """Extra rotational broadening (km/s) that best fits the spectrum at fixed labels and
    velocity, or 0. Line depths are free in this comparison (a template whose lines are too
    deep must not be "fixed" by smearing them out). Each step convolves one template spectrum
    (not the emulator), so slow rotators pay one step."""
    em = model.em
    labels, v = p[:3], float(p[3])
    flux = em.flux(labels)
    chi2_of = _FreeDepthChi2(model, model.continuum(p[4:]))
    _, _, lo, hi = model._positions(v)
    values, chi2s = [0.0], [chi2_of(labels, v, (0, flux))]
    n_fft = sp_fft.next_fast_len(flux.size)
    spec = sp_fft.rfft(flux - 1.0, n_fft)
    for vsini in _VSINI_STEPS:
        kernel = em.rotation_kernel(vsini)
        h = kernel.size // 2
        if lo - h < 0 or hi + h > em.n_pixels:
            break
        conv = np.roll(sp_fft.irfft(spec * sp_fft.rfft(kernel, n_fft), n_fft), -h)[:flux.size] + 1.0
        values.append(vsini)
        chi2s.append(chi2_of(labels, v, (0, conv)))
        # Not "stop at the first step that does not help": broad shallow lines (hot stars fitted
        # with slowly rotating templates) gain little from the first few km/s (Δχ² -10 at 6 km/s,
        # -89 at 35 km/s for a 35 km/s star at S/N 91).
        if chi2s[-1] > min(chi2s) + _BROADENING_DCHI2:
            break
    i = int(np.argmin(chi2s))
    if i == 0 or chi2s[i] > chi2s[0] - _BROADENING_DCHI2:
        return 0.0
    if i + 1 < len(values):
        x = np.array(values[i - 1:i + 2])
        y = np.array(chi2s[i - 1:i + 2])
        coef = np.polyfit(x, y, 2)
        if coef[0] > 0:
            return float(np.clip(-coef[1] / (2 * coef[0]), x[0], x[2]))
    return float(values[i])
