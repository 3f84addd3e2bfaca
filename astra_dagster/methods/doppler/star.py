"""Joint fit over the visits of one star (:func:`fit_star`): common labels, one velocity per visit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from astra_dagster.methods.doppler.ccf import _ccf
from astra_dagster.methods.doppler.emulator import Emulator
from astra_dagster.methods.doppler.fit import (
    _bounds,
    _edge_flags,
    _fine_rv,
    _fit_visit_state,
    _judge,
    _own_peak,
    _reduced_chi2,
    _rv_doubts,
    _VisitFit,
)
from astra_dagster.methods.doppler.flags import (
    FATAL_FLAGS,
    HIGH_CHISQ,
    STAR_TEMPLATE_SIGNAL,
    DopplerError,
    DopplerFlag,
)
from astra_dagster.methods.doppler.floors import _floor_vector, error_floors
from astra_dagster.methods.doppler.lm import _levenberg_marquardt, _lm_normal
from astra_dagster.methods.doppler.model import _VisitModel
from astra_dagster.methods.doppler.prepare import as_emulators
from astra_dagster.methods.doppler.results import StarRV, VisitRV
from astra_dagster.spectra.spectrum import Spectrum


def _joint_normal(models: list[_VisitModel]) -> Any:
    """Normal equations of the joint problem: common labels, per-visit v and continuum.

    Parameter layout: ``[teff, logg, fe_h, v_1 .. v_N, a_1 .., a_N ..]``; the matrix is built
    block by block so memory stays O(pixels of one visit).
    """
    n_vis = len(models)
    offsets = np.cumsum([3 + n_vis] + [m.n_cont for m in models])
    n_par = int(offsets[-1])

    def split(p: np.ndarray, i: int) -> np.ndarray:
        a0 = int(offsets[i])
        return np.concatenate([p[:3], p[3 + i:4 + i], p[a0:a0 + models[i].n_cont]])

    def fun(p: np.ndarray, normal: bool = True) -> tuple[float, Any, Any, np.ndarray]:
        chi2 = 0.0
        a_mat = np.zeros((n_par, n_par)) if normal else None
        g = np.zeros(n_par) if normal else None
        for i, model in enumerate(models):
            r, jac = model.residuals(split(p, i), normal)
            chi2 += float(r @ r)
            if not normal:
                continue
            assert a_mat is not None and g is not None and jac is not None
            a0 = int(offsets[i])
            cols = np.r_[0:3, 3 + i, a0:a0 + model.n_cont]
            a_mat[np.ix_(cols, cols)] += jac.T @ jac
            g[cols] += jac.T @ r
        return chi2, a_mat, g, np.empty(0)

    return fun, split, offsets


def _with_star_template(state: _VisitFit, base: Emulator, labels: np.ndarray, u_labels: np.ndarray,
                        vsini: float, vrange: float, judge: bool) -> VisitRV | None:
    """A visit with no significant correlation of its own (``NO_SIGNAL``) measured with the
    star's template: the joint fit's labels and broadening, matched to this visit's LSF. Only
    the velocity and the continuum are fitted. None when that template finds no peak either
    (below :data:`STAR_TEMPLATE_SIGNAL`, or at the edge of ±``vrange``) or the fit fails."""
    prep, old = state.prep, state.result
    if prep is None:
        return None
    em = state.match(base) if state.match is not None else base
    peak = _ccf(prep, [em], vrange, only=(em, labels), vsini=vsini)[0]
    if peak.edge or peak.significance < STAR_TEMPLATE_SIGNAL:
        return None
    try:
        model = _VisitModel(prep, em, peak.vrel, vsini=vsini)
        coef, _ = model.solve_continuum(labels, peak.vrel)
        p0 = np.concatenate([labels, [peak.vrel], coef])
        free = np.ones(model.n_params, dtype=bool)
        free[:3] = False
        lower, upper = _bounds(em, model.n_params, peak.vrel, vrange)
        res = _levenberg_marquardt(model.residuals, p0, free, lower, upper)
    except DopplerError:
        return None
    var_v = float(res.cov[3, 3])
    if not (math.isfinite(var_v) and var_v > 0):
        return None
    chisq = _reduced_chi2(model, res, free)
    u_v = math.sqrt(var_v) * math.sqrt(max(chisq, 1.0))
    vrel, scan_edge = _fine_rv(model, res.p, u_v)
    u_v = math.hypot(u_v, error_floors(em)["vrel"])
    flags = (old.flags & ~int(DopplerFlag.NO_SIGNAL)) | DopplerFlag.WEAK_CCF | DopplerFlag.STAR_TEMPLATE
    if scan_edge:
        flags |= DopplerFlag.RV_SCAN_EDGE
    if not res.converged:
        flags |= DopplerFlag.NOT_CONVERGED
    if chisq > HIGH_CHISQ:
        flags |= DopplerFlag.HIGH_CHISQ
    if judge:  # the star's template's own peak is this visit's CCF peak
        flags |= _rv_doubts(vrel, peak.vrel, peak.sigma_v, chisq, old.snr)
    visit = VisitRV(
        vrel=vrel, u_vrel=u_v, teff=float(labels[0]), u_teff=float(u_labels[0]),
        logg=float(labels[1]), u_logg=float(u_labels[1]), fe_h=float(labels[2]),
        u_fe_h=float(u_labels[2]), chisq=float(chisq), bc=old.bc, vhelio=vrel + old.bc,
        flags=int(flags), snr=old.snr, template=em.name, n_pixels=model.n_used,
        ccf_vrel=peak.vrel, u_ccf_vrel=peak.sigma_v, vsini=vsini,
        message=(f"{prep.source}: no significant correlation with any template alone; measured with the "
                 f"star's template (peak significance {peak.significance:.1f} >= {STAR_TEMPLATE_SIGNAL:g})"),
    )
    return _judge(visit) if judge else visit


def _star_failed(visits: list[VisitRV], flags: int, message: str) -> StarRV:
    nan = math.nan
    return StarRV(visits=visits, vhelio=nan, u_vhelio=nan, vscatter=nan, teff=nan, u_teff=nan,
                  logg=nan, u_logg=nan, fe_h=nan, u_fe_h=nan, chisq=nan, n_visits=len(visits),
                  n_good_visits=0, flags=int(flags), message=message)


def fit_star(visits: Sequence[Spectrum], templates: Emulator | Sequence[Emulator], *,
             vrange: float = 1000.0, reject_doubtful: bool = True) -> StarRV:
    """Joint fit of all visits of one star: common (Teff, logg, [Fe/H]), one RV per visit.

    Each visit is first fitted alone (:func:`fit_visit`); visits whose velocity could be
    measured then enter one least-squares problem with shared labels and per-visit velocity
    and continuum, started from the individual solutions, on the template family of the
    highest-S/N visit. The stellar ``vhelio`` is the inverse-variance weighted mean of the
    visits' ``vhelio``, ``vscatter`` their standard deviation (NaN with fewer than two).
    Visits that could not be measured keep their individual, flagged result. Each visit of the
    joint fit is judged again as in :func:`fit_visit` (``BAD_RV``: NaN velocity); with every
    visit rejected the star gets ``NO_GOOD_VISITS``.
    """
    emulators = as_emulators(templates)
    spectra = list(visits)
    if not spectra:
        raise DopplerError("fit_star needs at least one visit")
    if not (np.isfinite(vrange) and vrange > 0):
        raise DopplerError(f"vrange must be a positive number of km/s, got {vrange}")
    states = [_fit_visit_state(s, emulators, vrange, judge=reject_doubtful) for s in spectra]
    results = [st.result for st in states]
    good = [i for i, st in enumerate(states) if st.result.ok and st.model is not None]
    all_flags = 0
    for r in results:
        all_flags |= r.flags
    if not good:
        return _star_failed(results, all_flags | DopplerFlag.NO_GOOD_VISITS, "no visit gave a velocity")

    ref = max(good, key=lambda i: (np.nan_to_num(results[i].snr), -i))
    ref_model = states[ref].model
    assert ref_model is not None
    emulator, vsini = ref_model.em, ref_model.vsini
    # Each visit fits the reference family matched to its own LSF (.lsf): same name, own copy.
    base = next(e for e in emulators if e.name == emulator.name)
    models = []
    for i in good:
        st = states[i]
        assert st.model is not None and st.prep is not None
        if st.model.em.name == emulator.name and st.model.vsini == vsini:
            models.append(st.model)
        else:  # the visit's own fit used another family or broadening: same pixels, same rejections
            own = st.match(base) if st.match is not None else base
            other = _VisitModel(st.prep, own, results[i].vrel, vsini=vsini)
            other.reject(st.model.rejected)
            models.append(other)
    same = [i for i in good if results[i].template == emulator.name]
    w = np.array([1.0 / results[i].u_teff ** 2 for i in same])
    labels0 = np.array([[results[i].teff, results[i].logg, results[i].fe_h] for i in same])
    start = emulator.clip(np.average(labels0, axis=0, weights=w / w.sum()))

    fun, split, offsets = _joint_normal(models)
    p0 = np.zeros(int(offsets[-1]))
    p0[:3] = start
    lower = np.full(p0.size, -np.inf)
    upper = np.full(p0.size, np.inf)
    lower[:3], upper[:3] = emulator.ranges[:, 0], emulator.ranges[:, 1]
    for k, (i, model) in enumerate(zip(good, models, strict=True)):
        p0[3 + k] = results[i].vrel
        lower[3 + k], upper[3 + k] = -vrange, vrange
        coef, _ = model.solve_continuum(start, results[i].vrel)
        p0[int(offsets[k]):int(offsets[k]) + model.n_cont] = coef
    try:
        res = _lm_normal(fun, p0, np.ones(p0.size, dtype=bool), lower, upper)
    except DopplerError as exc:
        return _star_failed(results, all_flags | DopplerFlag.FIT_FAILED, f"joint fit failed: {exc}")
    n_pix = sum(m.n_used for m in models)
    chisq = res.chi2 / max(n_pix - p0.size, 1)
    var = np.diag(res.cov)
    if not np.all(np.isfinite(var[:3 + len(good)])):
        return _star_failed(results, all_flags | DopplerFlag.FIT_FAILED, "joint fit is singular")
    inflate = math.sqrt(max(chisq, 1.0))
    # Template mismatch does not average down over visits: the floors apply to the star too.
    u_labels = np.hypot(np.sqrt(var[:3]) * inflate, _floor_vector(emulator)[:3])
    star_flags = 0
    if not res.converged:
        star_flags |= DopplerFlag.NOT_CONVERGED
    if chisq > HIGH_CHISQ:
        star_flags |= DopplerFlag.HIGH_CHISQ

    gn_step: list[np.ndarray] = []

    def step() -> np.ndarray:
        """The joint fit's unconstrained Gauss-Newton step (once, only when a label is pinned)."""
        if not gn_step:
            _, _, g, _ = fun(res.p, True)
            gn_step.append(res.cov @ g)
        return gn_step[0]

    for k, (i, model) in enumerate(zip(good, models, strict=True)):
        p_i = split(res.p, k)
        r_i, _ = model.residuals(p_i, False)
        chisq_i = float(r_i @ r_i) / max(model.n_used - model.n_cont - 1, 1)
        u_v = float(math.sqrt(var[3 + k]) * math.sqrt(max(chisq_i, 1.0)))
        vrel, scan_edge = _fine_rv(model, p_i, u_v)
        u_v = math.hypot(u_v, error_floors(emulator)["vrel"])
        old = results[i]
        flags = (old.flags & ~int(DopplerFlag.LABEL_AT_EDGE | DopplerFlag.EDGE_RV | DopplerFlag.NOT_CONVERGED
                                  | DopplerFlag.HIGH_CHISQ | DopplerFlag.RV_SCAN_EDGE)) | star_flags
        if scan_edge:
            flags |= DopplerFlag.RV_SCAN_EDGE
        # The joint labels on a limit: a warning, or EDGE_RV where this visit's RV depends on them.
        edge, edge_shift = _edge_flags(emulator, res.p[:3], res.cov, 3 + k, u_labels, u_v, reject_doubtful,
                                       step)
        flags |= edge
        if reject_doubtful:
            prep = states[i].prep
            assert prep is not None
            flags |= _rv_doubts(vrel, old.ccf_vrel, old.u_ccf_vrel, chisq_i, old.snr,
                                lambda prep=prep, model=model, p_i=p_i: _own_peak(prep, model, p_i, vrange))
        visit = VisitRV(
            vrel=vrel, u_vrel=u_v, teff=float(res.p[0]), u_teff=float(u_labels[0]),
            logg=float(res.p[1]), u_logg=float(u_labels[1]), fe_h=float(res.p[2]),
            u_fe_h=float(u_labels[2]), chisq=chisq_i, bc=old.bc, vhelio=vrel + old.bc,
            flags=int(flags), snr=old.snr, template=emulator.name, n_pixels=model.n_used,
            ccf_vrel=old.ccf_vrel, u_ccf_vrel=old.u_ccf_vrel, vsini=vsini,
        )
        results[i] = _judge(visit, edge_shift) if reject_doubtful else visit

    # Visits too faint to correlate alone: the star's template from its other visits.
    measured = list(good)
    for i, st in enumerate(states):
        if i not in good and st.result.flags & DopplerFlag.NO_SIGNAL:
            rescued = _with_star_template(st, base, res.p[:3], u_labels, vsini, vrange, reject_doubtful)
            if rescued is not None:
                results[i] = rescued
                measured.append(i)
    vh = np.array([results[i].vhelio for i in measured])
    uv = np.array([results[i].u_vrel for i in measured])
    ok = np.isfinite(vh) & np.isfinite(uv) & (uv > 0)
    if np.any(ok):
        wv = 1.0 / uv[ok] ** 2
        vhelio = float(np.sum(wv * vh[ok]) / np.sum(wv))
        u_vhelio = float(math.sqrt(1.0 / np.sum(wv)))
    else:
        vhelio = u_vhelio = math.nan
        rejected = all(results[i].flags & DopplerFlag.BAD_RV for i in measured)
        star_flags |= DopplerFlag.NO_GOOD_VISITS if rejected else DopplerFlag.NO_BC
    vscatter = float(np.std(vh[ok])) if ok.sum() >= 2 else math.nan
    for r in results:
        star_flags |= r.flags & ~int(FATAL_FLAGS)
    return StarRV(
        visits=results, vhelio=vhelio, u_vhelio=u_vhelio, vscatter=vscatter,
        teff=float(res.p[0]), u_teff=float(u_labels[0]), logg=float(res.p[1]),
        u_logg=float(u_labels[1]), fe_h=float(res.p[2]), u_fe_h=float(u_labels[2]),
        chisq=float(chisq), n_visits=len(results), n_good_visits=len(measured), flags=int(star_flags),
        template=emulator.name, vsini=vsini,
    )
