"""The fit of one visit (:func:`fit_visit`): CCF candidates, labels, joint fit, template families
competing, rotation and the fine RV (the flow of :mod:`astra_dagster.methods.doppler`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from astra_dagster.methods.doppler.barycentric import _barycentric
from astra_dagster.methods.doppler.ccf import _ccf, _CCFResult
from astra_dagster.methods.doppler.emulator import Emulator
from astra_dagster.methods.doppler.flags import (
    _AMBIGUOUS_DCHI2,
    _MAX_TEMPLATE_FITS,
    _NO_SIGNAL,
    _WEAK_CCF,
    CCF_MISMATCH_KMS,
    CCF_MISMATCH_SIGMA,
    CLIP_SIGMA,
    EDGE_RV_SIGMA,
    HIGH_CHISQ,
    MIN_GOOD_PIXELS,
    POOR_MATCH_RESIDUAL,
    RV_DOUBTS,
    DopplerError,
    DopplerFlag,
)
from astra_dagster.methods.doppler.floors import _floor_vector
from astra_dagster.methods.doppler.lm import _levenberg_marquardt, _LMResult
from astra_dagster.methods.doppler.lsf import VisitMatcher
from astra_dagster.methods.doppler.model import _VisitModel
from astra_dagster.methods.doppler.prepare import _prepare, _Prepared, as_emulators
from astra_dagster.methods.doppler.results import VisitRV
from astra_dagster.methods.doppler.rotation import _MIN_VSINI, _ROTATION_ROUNDS, _ROTATION_TOLERANCE, _broadening
from astra_dagster.spectra.spectrum import Spectrum


def _bounds(emulator: Emulator, n_params: int, v0: float, vrange: float) -> tuple[np.ndarray, np.ndarray]:
    lower = np.full(n_params, -np.inf)
    upper = np.full(n_params, np.inf)
    lower[:3], upper[:3] = emulator.ranges[:, 0], emulator.ranges[:, 1]
    lower[3], upper[3] = -vrange, vrange
    return lower, upper


def _fit_candidate(prep: _Prepared, emulators: list[Emulator], ccf: _CCFResult, vrange: float,
                   match: VisitMatcher) -> tuple[_VisitModel, _LMResult, np.ndarray]:
    """From one CCF candidate to a converged joint fit.

    Labels (with the continuum) at the CCF velocity; a second CCF with those labels; then the
    joint fit of all labels, v and the continuum, 5σ clipping and a refit. Broad-lined spectra
    (CCF error > 1 km/s, e.g. hot stars whose Brackett lines dominate the correlation) keep
    [Fe/H] at the template's value in the first step, so that the weak narrow lines stay in the
    template, and get a χ²(v) scan at 1 km/s steps across the CCF uncertainty, where the narrow
    lines decide, before the joint fit.
    The fit uses the candidate's family matched to the visit's LSF (``match``; the coarse CCF
    only places the star, so it keeps the unmatched templates).
    Returns the model, the fit and the free-parameter mask.
    """
    emulator = match(ccf.emulator)
    model = _VisitModel(prep, emulator, ccf.vrel)
    labels0 = emulator.clip(ccf.labels)
    coef, _ = model.solve_continuum(labels0, ccf.vrel)
    p0 = np.concatenate([labels0, [ccf.vrel], coef])
    lower, upper = _bounds(emulator, model.n_params, ccf.vrel, vrange)
    free = np.ones(model.n_params, dtype=bool)
    free[3] = False
    broad = ccf.sigma_v > 1.0
    if broad:
        free[2] = False
    stage = _levenberg_marquardt(model.at_fixed_velocity(ccf.vrel), p0, free, lower, upper, max_iter=4)
    ccf2 = _ccf(prep, emulators, vrange, only=(emulator, stage.p[:3]))[0]
    p0 = stage.p.copy()
    p0[3] = ccf2.vrel if not ccf2.edge else ccf.vrel
    if not ccf2.edge and (broad or ccf2.sigma_v > 1.0):
        half = min(max(3.0 * ccf2.sigma_v, 5.0), 40.0)
        vs = np.clip(p0[3] + np.arange(-half, half + 0.5, 1.0), -vrange, vrange)
        grid = model.grid_flux(p0[:3], float(vs[0]), float(vs[-1]))
        chi2 = [model.solve_continuum(p0[:3], float(v), grid)[1] for v in vs]
        p0[3] = float(vs[int(np.argmin(chi2))])
    free[:] = True
    model.set_weights(float(p0[3]))
    res = _levenberg_marquardt(model.residuals, p0, free, lower, upper)
    # Reject > CLIP_SIGMA residuals (sky residuals, bad pixels the mask missed) and refit, with
    # the weights following the star's final position.
    bad = np.abs(res.residuals) > CLIP_SIGMA
    # s² weights misplaced by δv bias v by ~2 % of δv (measured): refit when δv > 0.5 km/s.
    moved = abs(res.p[3] - p0[3]) > 0.5 and model.em.s2 is not None
    if (np.any(bad) and (~bad).sum() >= MIN_GOOD_PIXELS) or moved:
        if (~bad).sum() >= MIN_GOOD_PIXELS:
            model.reject(bad)
        model.set_weights(float(res.p[3]))
        res = _levenberg_marquardt(model.residuals, res.p, free, lower, upper)
    return model, res, free


def _pinned(emulator: Emulator, labels: np.ndarray) -> np.ndarray:
    """Per label: True when it is within 0.1 % of its range limit."""
    lo, hi = emulator.ranges[:, 0], emulator.ranges[:, 1]
    tol = 1e-3 * (hi - lo)
    return (labels <= lo + tol) | (labels >= hi - tol)


def _at_label_edge(emulator: Emulator, labels: np.ndarray) -> bool:
    """True when any label is within 0.1 % of its range limit."""
    return bool(np.any(_pinned(emulator, labels)))


def _edge_rv_shift(emulator: Emulator, labels: np.ndarray, cov: np.ndarray, iv: int,
                   u_labels: np.ndarray, u_v: float, step: np.ndarray | None = None) -> float:
    """How far (in ``u_v``) the RV would move if a pinned label were free to go a plausible
    excursion beyond its limit: ``|Σ_vL / Σ_LL|`` (the RV's regression on the label in the fit's
    covariance ``cov``, the RV at index ``iv``) times the excursion: how far beyond the limit
    the unconstrained minimum lies (the outward part of the Gauss-Newton ``step`` from the
    boundary solution), at least 3 ``u_labels``. 0 with no label pinned; inf when the
    covariance cannot tell."""
    lo = emulator.ranges[:, 0]
    worst = 0.0
    for k in np.flatnonzero(_pinned(emulator, labels)):
        s_kk, s_vk = float(cov[k, k]), float(cov[iv, k])
        if not (math.isfinite(s_kk) and s_kk > 0 and math.isfinite(s_vk) and u_v > 0):
            return math.inf
        beyond = 0.0
        if step is not None and math.isfinite(step[k]):
            outward = -1.0 if labels[k] <= lo[k] + 1e-3 * (emulator.ranges[k, 1] - lo[k]) else 1.0
            beyond = max(outward * float(step[k]), 0.0)
        excursion = max(3.0 * float(u_labels[k]), beyond)
        worst = max(worst, abs(s_vk / s_kk) * excursion / u_v)
    return worst


def _edge_flags(emulator: Emulator, labels: np.ndarray, cov: np.ndarray, iv: int, u_labels: np.ndarray,
                u_v: float, judge: bool, step: Any = None) -> tuple[int, float]:
    """LABEL_AT_EDGE for a pinned label, with EDGE_RV when the RV depends on it (judged fits
    only), and the RV shift in σ (:func:`_edge_rv_shift`). ``step``: a callable giving the
    Gauss-Newton step from the solution (computed only when a label is pinned)."""
    if not _at_label_edge(emulator, labels):
        return 0, 0.0
    shift = _edge_rv_shift(emulator, labels, cov, iv, u_labels, u_v, step() if step is not None else None)
    flags = DopplerFlag.LABEL_AT_EDGE
    if judge and not shift <= EDGE_RV_SIGMA:
        flags |= DopplerFlag.EDGE_RV
    return int(flags), shift


def _gauss_newton_step(model: _VisitModel, res: _LMResult) -> np.ndarray:
    """The unconstrained step ``cov Jᵀr`` from a fit's solution (where a bound-free fit would go)."""
    r, jac = model.residuals(res.p)
    assert jac is not None
    return res.cov @ (jac.T @ r)


def _doubtful(res: _LMResult, emulator: Emulator, ccf: _CCFResult) -> bool:
    """A fit worth checking against another template family."""
    return _at_label_edge(emulator, res.p[:3]) or not res.converged or ccf.significance < _WEAK_CCF


def _fine_rv(model: _VisitModel, p: np.ndarray, sigma_v: float) -> tuple[float, bool]:
    """χ²(v) at fixed labels on 5 velocities within ±2σ (continuum re-solved at each)."""
    half = 2.0 * max(sigma_v, 0.02)
    vs = p[3] + np.linspace(-half, half, 5)
    grid = model.grid_flux(p[:3], float(vs[0]), float(vs[-1]))
    chi2 = np.array([model.solve_continuum(p[:3], float(v), grid)[1] for v in vs])
    i = int(np.argmin(chi2))
    if i == 0 or i == vs.size - 1:
        return float(p[3]), True
    coef = np.polyfit(vs[i - 1:i + 2] - vs[i], chi2[i - 1:i + 2], 2)
    if coef[0] <= 0:
        return float(vs[i]), False
    return float(vs[i] - coef[1] / (2 * coef[0])), False


def _ccf_limit(u_ccf: float) -> float:
    return max(CCF_MISMATCH_KMS, CCF_MISMATCH_SIGMA * u_ccf) if math.isfinite(u_ccf) else CCF_MISMATCH_KMS


def _excess_residual(chisq: float, snr: float) -> float:
    """Residual rms beyond the noise as a fraction of the continuum (NaN without an S/N)."""
    if not (math.isfinite(snr) and snr > 0 and math.isfinite(chisq)):
        return math.nan
    return math.sqrt(max(chisq - 1.0, 0.0)) / snr


def _own_peak(prep: _Prepared, model: _VisitModel, p: np.ndarray, vrange: float) -> tuple[float, float] | None:
    """(velocity, σ) of the correlation peak of the fitted template itself (its labels and
    rotational broadening), or None when that peak is at the edge of ±``vrange``."""
    peak = _ccf(prep, [model.em], vrange, only=(model.em, p[:3]), vsini=model.vsini)[0]
    return None if peak.edge else (peak.vrel, peak.sigma_v)


def _rv_doubts(vrel: float, ccf_vrel: float, u_ccf: float, chisq: float, snr: float,
               own_peak: Callable[[], tuple[float, float] | None] | None = None) -> int:
    """CCF_MISMATCH and POOR_MATCH bits of a fitted velocity (EDGE_RV is set by the caller).

    CCF_MISMATCH: far from the coarse CCF peak and, with ``own_peak`` (called only then), from
    the peak of the fitted template too. The coarse grid's nearest template can correlate
    20 km/s off for a hot star (its Brackett lines' shape follows Teff; its line widths are not
    the star's): measured 20.4 km/s for a 12,300 K star on the 15,000 K node, 5 km/s with its
    own template; a fit that left the correlation peak is far from both."""
    flags = 0
    if math.isfinite(ccf_vrel) and abs(vrel - ccf_vrel) > _ccf_limit(u_ccf):
        own = own_peak() if own_peak is not None else None
        if own is None or abs(vrel - own[0]) > _ccf_limit(own[1]):
            flags |= DopplerFlag.CCF_MISMATCH
    if _excess_residual(chisq, snr) > POOR_MATCH_RESIDUAL:
        flags |= DopplerFlag.POOR_MATCH
    return int(flags)


def _judge(result: VisitRV, edge_shift: float = math.nan) -> VisitRV:
    """A result with any RV_DOUBTS bit becomes BAD_RV: velocity and labels NaN (as for the other
    fatal flags), the rejected values in ``message``; χ², bc, S/N and the CCF peak stay.
    ``edge_shift``: the RV shift (σ) a pinned label's excursion implies, for the message."""
    doubts = result.flags & RV_DOUBTS
    if not doubts:
        return result
    why = []
    if doubts & DopplerFlag.CCF_MISMATCH:
        why.append(f"{abs(result.vrel - result.ccf_vrel):.1f} km/s from the CCF peak at "
                   f"{result.ccf_vrel:.1f} km/s (limit {_ccf_limit(result.u_ccf_vrel):.1f})")
    if doubts & DopplerFlag.EDGE_RV:
        why.append(f"labels ({result.teff:.0f} K, {result.logg:.2f}, {result.fe_h:+.2f}) at a limit of "
                   f"the {result.template} templates, and the RV depends on them (a plausible excursion "
                   f"beyond the limit moves it by {edge_shift:.1f}σ; limit {EDGE_RV_SIGMA:g}σ)")
    if doubts & DopplerFlag.POOR_MATCH:
        why.append(f"residuals {100 * _excess_residual(result.chisq, result.snr):.1f} % of the continuum "
                   f"beyond the noise (χ²_red {result.chisq:.1f}; limit {100 * POOR_MATCH_RESIDUAL:g} %)")
    nan = math.nan
    return replace(result, vrel=nan, u_vrel=nan, vhelio=nan, teff=nan, u_teff=nan, logg=nan, u_logg=nan,
                   fe_h=nan, u_fe_h=nan, flags=int(result.flags | DopplerFlag.BAD_RV),
                   message=f"RV {result.vrel:.2f} km/s rejected: " + "; ".join(why))


# ---------------------------------------------------------------------------------------------
# The visit fit
# ---------------------------------------------------------------------------------------------

def _reduced_chi2(model: _VisitModel, res: _LMResult, free: np.ndarray) -> float:
    return res.chi2 / max(model.n_used - int(np.sum(free)), 1)


def _rotate(prep: _Prepared, model: _VisitModel, res: _LMResult, free: np.ndarray,
            vrange: float) -> tuple[_VisitModel, _LMResult, float]:
    """The fit refitted with the extra rotational broadening that lowers χ² (0 km/s: unchanged).

    Broader lines than the templates' bias the labels and, with the asymmetric LSF, the
    velocity. The broadening is measured at the labels of the unbroadened fit, which have
    already bent to mimic broad lines (a 25 km/s star first comes out at 18 km/s), so it is
    measured again at each broadened fit's labels; two or three rounds converge.
    """
    vsini = 0.0
    trial = _broadening(model, res.p)
    for _ in range(_ROTATION_ROUNDS):
        if trial < _MIN_VSINI or abs(trial - vsini) < _ROTATION_TOLERANCE:
            break
        try:
            broad = _VisitModel(prep, model.em, float(res.p[3]), vsini=trial)
            broad.reject(model.rejected)
            lower, upper = _bounds(broad.em, broad.n_params, float(res.p[3]), vrange)
            res_b = _levenberg_marquardt(broad.residuals, res.p, free, lower, upper)
        except DopplerError:
            break
        if res_b.chi2 / max(broad.n_used, 1) >= res.chi2 / max(model.n_used, 1):
            break
        model, res, vsini = broad, res_b, trial
        trial = _broadening(model, res.p)
    return model, res, vsini


def _failed(prep_or_none: _Prepared | None, spectrum: Spectrum, flags: int, bc: float,
            message: str, **extra: Any) -> VisitRV:
    nan = math.nan
    snr = prep_or_none.snr if prep_or_none is not None else nan
    return VisitRV(vrel=nan, u_vrel=nan, teff=nan, u_teff=nan, logg=nan, u_logg=nan, fe_h=nan,
                   u_fe_h=nan, chisq=nan, bc=bc, vhelio=nan, flags=int(flags), snr=snr,
                   message=message, **extra)


@dataclass
class _VisitFit:
    """Internal full state of a visit fit (used by :func:`fit_star`)."""

    result: VisitRV
    prep: _Prepared | None = None
    model: _VisitModel | None = None
    lm: _LMResult | None = None
    #: The visit's templates matched to its LSF (fit_star refits with them).
    match: VisitMatcher | None = None


def _fit_visit_state(spectrum: Spectrum, emulators: list[Emulator], vrange: float,
                     judge: bool = True) -> _VisitFit:
    prep = _prepare(spectrum, emulators, vrange)
    bc, flags = _barycentric(spectrum, prep.flags)
    if flags & DopplerFlag.LOW_GOOD_PIXELS:
        return _VisitFit(_failed(prep, spectrum, flags, bc, prep.message), prep)

    match = VisitMatcher(spectrum)
    candidates = _ccf(prep, emulators, vrange)
    ccf = candidates[0]
    if ccf.edge:
        flags |= DopplerFlag.CCF_EDGE
        msg = (f"{prep.source}: correlation peak at {ccf.vrel:.1f} km/s is at the edge of the "
               f"±{vrange:g} km/s search range")
        return _VisitFit(_failed(prep, spectrum, flags, bc, msg, template=ccf.emulator.name,
                                 n_pixels=prep.ln_wave.size), prep)
    if ccf.significance < _NO_SIGNAL:
        flags |= DopplerFlag.NO_SIGNAL
        msg = (f"{prep.source}: no significant correlation with any template "
               f"(peak significance {ccf.significance:.1f} < {_NO_SIGNAL:g})")
        # fit_star may still measure it with the star's template, matched to this visit's LSF.
        return _VisitFit(_failed(prep, spectrum, flags, bc, msg, template=ccf.emulator.name,
                                 n_pixels=prep.ln_wave.size), prep, match=match)
    # Fit the best template. Then also fit (a) templates whose CCF is almost as good but puts
    # the star elsewhere (broad-lined hot stars can fool the coarse CCF), and (b) when the fit
    # is doubtful, the best template of every other family; keep the lowest reduced χ².
    fits: list[tuple[float, int, _VisitModel, _LMResult, np.ndarray, _CCFResult]] = []
    tried: list[_CCFResult] = []
    errors: list[str] = []

    def attempt(cand: _CCFResult) -> None:
        tried.append(cand)
        try:
            model, res, free = _fit_candidate(prep, emulators, cand, vrange, match)
        except DopplerError as exc:
            errors.append(str(exc))
            return
        fits.append((_reduced_chi2(model, res, free), len(fits), model, res, free, cand))

    attempt(ccf)
    v_first = fits[0][3].p[3] if fits else ccf.vrel
    for cand in candidates[1:]:
        if len(tried) >= _MAX_TEMPLATE_FITS or cand.chi2 - ccf.chi2 > _AMBIGUOUS_DCHI2:
            break
        far = abs(cand.vrel - v_first) > max(3.0 * (cand.sigma_v + ccf.sigma_v), 3.0)
        if not cand.edge and far and all(abs(cand.vrel - t.vrel) > 3.0 for t in tried):
            attempt(cand)
    if not fits or _doubtful(fits[0][3], ccf.emulator, ccf):
        # Other families' best templates, and the next coarse template of the same family
        # (a different start in (Teff, logg) escapes a local minimum).
        for em in emulators:
            other = next((c for c in candidates if c.emulator is em and not c.edge), None)
            # Only families whose templates correlate about as well as the best one.
            if (other is not None and other.significance >= 0.5 * ccf.significance
                    and all(t.emulator is not em for t in tried)):
                attempt(other)
        settled = any(not _doubtful(f[3], f[5].emulator, f[5]) for f in fits)
        same = [c for c in candidates if c.emulator is ccf.emulator and not c.edge
                and all(c is not t for t in tried)]
        if same and not settled:
            attempt(same[0])
    if not fits:
        flags |= DopplerFlag.FIT_FAILED
        msg = f"{prep.source}: no template could be fitted ({'; '.join(errors)})"
        return _VisitFit(_failed(prep, spectrum, flags, bc, msg, template=ccf.emulator.name), prep)
    ranked = sorted(fits, key=lambda f: (f[0], f[1]))
    _, _, model, res, free, ccf = ranked[0]
    model, res, vsini = _rotate(prep, model, res, free, vrange)
    if len(ranked) > 1 and _at_label_edge(model.em, res.p[:3]):
        # The families were ranked before broadening, which misleads for fast rotators: a
        # 4640 K YSO at 44 km/s went to the cool family's 4199 K limit at χ²_red 3.25, against
        # 0.98 for the warm family once both are broadened. Broaden the others too and rank again.
        best = _reduced_chi2(model, res, free)
        for _, _, other, res_o, free_o, ccf_o in ranked[1:]:
            other, res_o, vsini_o = _rotate(prep, other, res_o, free_o, vrange)
            chisq_o = _reduced_chi2(other, res_o, free_o)
            if chisq_o < best:
                model, res, free, ccf, vsini, best = other, res_o, free_o, ccf_o, vsini_o, chisq_o
    if ccf.significance < _WEAK_CCF:
        flags |= DopplerFlag.WEAK_CCF
    emulator = model.em

    n = model.n_used
    chisq = _reduced_chi2(model, res, free)
    if not res.converged:
        flags |= DopplerFlag.NOT_CONVERGED
    if chisq > HIGH_CHISQ:
        flags |= DopplerFlag.HIGH_CHISQ
    if not np.all(np.isfinite(np.diag(res.cov)[:4])):
        flags |= DopplerFlag.FIT_FAILED
        return _VisitFit(_failed(prep, spectrum, flags, bc, f"{prep.source}: singular fit",
                                 template=emulator.name), prep)
    inflate = math.sqrt(max(chisq, 1.0))
    err = np.sqrt(np.diag(res.cov)[:4]) * inflate
    vrel, scan_edge = _fine_rv(model, res.p, float(err[3]))
    err = np.hypot(err, _floor_vector(model.em))
    if scan_edge:
        flags |= DopplerFlag.RV_SCAN_EDGE
    labels = res.p[:3]
    edge, edge_shift = _edge_flags(emulator, labels, res.cov, 3, err[:3], float(err[3]), judge,
                                   lambda: _gauss_newton_step(model, res))
    flags |= edge
    if judge:
        flags |= _rv_doubts(vrel, float(ccf.vrel), float(ccf.sigma_v), float(chisq), prep.snr,
                            lambda: _own_peak(prep, model, res.p, vrange))
    result = VisitRV(
        vrel=vrel, u_vrel=float(err[3]), teff=float(labels[0]), u_teff=float(err[0]),
        logg=float(labels[1]), u_logg=float(err[1]), fe_h=float(labels[2]), u_fe_h=float(err[2]),
        chisq=float(chisq), bc=bc, vhelio=vrel + bc, flags=int(flags), snr=prep.snr,
        template=emulator.name, n_pixels=int(n), ccf_vrel=float(ccf.vrel),
        u_ccf_vrel=float(ccf.sigma_v), vsini=vsini,
    )
    return _VisitFit(_judge(result, edge_shift) if judge else result, prep, model, res, match)


def fit_visit(spectrum: Spectrum, templates: Emulator | Sequence[Emulator], *,
              vrange: float = 1000.0, reject_doubtful: bool = True) -> VisitRV:
    """Measure the radial velocity and coarse labels of one spectrum.

    ``templates`` is one emulator or a list of them (e.g. both Synspec families, or Synspec and
    generator-trained ones: the coarse CCF picks the family with the lower χ²). Problems with
    the data (too few good pixels, masked chips, a correlation peak at the edge of ±``vrange``,
    non-finite values) give a result with ``flags`` set and NaN for what could not be measured;
    input that cannot be fitted at all (not a Spectrum, wavelengths outside the templates,
    unsorted wavelengths) raises :class:`DopplerError` (:class:`UnsupportedSpectrumError` for
    wavelengths outside the templates). A fit whose RV is doubtful (:data:`RV_DOUBTS`: far from
    the CCF peak, a label on its template limit that the RV depends on, residuals far beyond the
    noise) gets ``BAD_RV``
    and NaN velocity and labels; ``reject_doubtful=False`` keeps them (error-floor calibration
    measures template mismatch on every fit).
    """
    emulators = as_emulators(templates)
    if not (np.isfinite(vrange) and vrange > 0):
        raise DopplerError(f"vrange must be a positive number of km/s, got {vrange}")
    return _fit_visit_state(spectrum, emulators, vrange, judge=reject_doubtful).result
