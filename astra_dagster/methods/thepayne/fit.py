"""The fit of one spectrum (:func:`fit_normalized`, :func:`fit_spectra`): bounded least squares over the
labels, an RV offset and the continuum, from the best starts; flags and result rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from astra_dagster.methods import continuum, hydrogen, mismatch
from astra_dagster.methods.thepayne.flags import (
    BOUND_TOL,
    COVERAGE_DISTANCE,
    FATAL,
    FLAGS,
    HIGH_CHI2,
    KMS_PER_PIXEL,
    MIN_PIXELS,
    N_STARTS,
    RANGE_LABELS,
    RV_LIMIT,
    PayneError,
)
from astra_dagster.methods.thepayne.model import _PER_FE, COLUMNS, FIT_LABELS, REQUIRED_LABELS, PayneModel
from astra_dagster.spectra.spectrum import APSTAR_NPIX, Spectrum, apstar_wavelength


def _shift_operator(model: PayneModel, s: float, use: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Catmull-Rom sampling of a model at pixel positions i - s (a shift by s pixels, clamped
    to each chip) for the model pixels ``use``: indices (4, m), weights (4,) and their
    derivative w.r.t. s (4,)."""
    p = -float(s)
    j = int(np.floor(p))
    t = p - j
    lo, hi = model._lo[use], model._hi[use]
    idx = np.stack([np.clip(use + j + m, lo, hi) for m in (-1, 0, 1, 2)])
    t2, t3 = t * t, t * t * t
    w = 0.5 * np.array([-t3 + 2 * t2 - t, 3 * t3 - 5 * t2 + 2, -3 * t3 + 4 * t2 + t, t3 - t2])
    dw_dt = 0.5 * np.array([-3 * t2 + 4 * t - 1, 9 * t2 - 10 * t, -9 * t2 + 8 * t + 1, 3 * t2 - 2 * t])
    return idx, w, -dw_dt   # dt/ds = -1


class _Problem:
    """Residuals and Jacobian of one spectrum for least_squares, with a one-point cache."""

    def __init__(self, model: PayneModel, flux: np.ndarray, weight: np.ndarray) -> None:
        self.model = model
        self.use = np.flatnonzero(weight > 0)
        self.sw = np.sqrt(weight[self.use])
        self.flux = flux[self.use]
        self._key: bytes | None = None

    def _eval(self, p: np.ndarray) -> None:
        key = p.tobytes()
        if key == self._key:
            return
        k = self.model.n_labels
        f, df = self.model._value_and_jacobian(p[:k])
        idx, w, dw = _shift_operator(self.model, p[k], self.use)
        both = np.vstack([f, df])[:, idx]                     # (k + 1, 4, m): the 4 taps of each pixel
        shifted = np.einsum("t,ltm->lm", w, both)             # value and label derivatives, shifted
        self.resid = self.sw * (shifted[0] - self.flux)
        jac = np.empty((self.use.size, k + 1))
        jac[:, :k] = (shifted[1:] * self.sw).T
        jac[:, k] = self.sw * (dw @ both[0])
        self.jac = jac
        self._key = key

    def residuals(self, p: np.ndarray) -> np.ndarray:
        self._eval(p)
        return self.resid

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        self._eval(p)
        return self.jac


def _snr(spectrum: Spectrum) -> float | None:
    value = spectrum.snr
    if value is not None and np.isfinite(value):
        return value
    good = np.isfinite(spectrum.flux) & np.isfinite(spectrum.ivar) & (spectrum.ivar > 0)
    if not good.any():
        return None
    return float(np.median(spectrum.flux[good] * np.sqrt(spectrum.ivar[good])))


def _empty_row(snr: float | None, flag: int) -> dict[str, Any]:
    row: dict[str, Any] = {"snr": snr}
    for column in COLUMNS.values():
        row[column] = None
        row[f"u_{column}"] = None
    row.update({"rv": None, "u_rv": None, "r_chi_sq": None, "bitmask_flag": int(flag)})
    return row


def check_labels(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple if they are a valid label set (known, no repeats, with
    :data:`REQUIRED_LABELS`), else :class:`PayneError`."""
    names = tuple(names)
    unknown = [n for n in names if n not in FIT_LABELS]
    missing = [n for n in REQUIRED_LABELS if n not in names]
    if unknown or missing or len(set(names)) != len(names):
        raise PayneError(f"labels {list(names)}: unknown {unknown}, missing {missing} (known: {list(FIT_LABELS)}, "
                         f"required: {list(REQUIRED_LABELS)}, no repeats)")
    return names


def row_labels(model: PayneModel, row: Mapping[str, Any]) -> list[float]:
    """The model's labels (its own names and units: [C/Fe], not [C/H]) from an output row."""
    out = []
    for name in model.label_names:
        value = row[COLUMNS[name]]
        if value is not None and name in _PER_FE:
            value = None if row["fe_h"] is None else value - row["fe_h"]
        out.append(np.nan if value is None else float(value))
    return out


def coverage_distance(model: PayneModel, scaled: np.ndarray) -> float:
    """Distance (scaled labels) from ``scaled`` to the third-nearest of the model's start points,
    a random sample of its training labels: how far the fit lies from the stars it learnt from."""
    d = np.sqrt(np.sum((model.start_points - np.asarray(scaled, dtype=float)) ** 2, axis=1))
    return float(np.partition(d, 2)[2]) if d.size >= 3 else float("inf")


def _clean(value: float) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def fit_normalized(model: PayneModel, flux: np.ndarray, ivar: np.ndarray, *, continuum_flags: int = 0,
                   non_finite: bool = False, snr: float | None = None,
                   screen_mismatch: bool = True) -> dict[str, Any]:
    """Fit one continuum-normalised spectrum (8575 apStar pixels, or the model's pixels).
    Returns one output row (see :func:`fit_spectra`). ``screen_mismatch=False`` skips the
    POOR_MODEL_MATCH screen (noiseless calibration spectra, whose χ² against the token ivar
    measures emulator error, not a mismatch)."""
    flux = np.asarray(flux, dtype=float)
    ivar = np.asarray(ivar, dtype=float)
    if flux.shape != ivar.shape or flux.ndim != 1:
        raise PayneError(f"flux {flux.shape} and ivar {ivar.shape} must be 1-D and alike")
    if flux.shape[0] == APSTAR_NPIX:
        flux, ivar = flux[model.pixels], ivar[model.pixels]
    elif flux.shape[0] != model.n_pixels:
        raise PayneError(f"spectrum has {flux.shape[0]} pixels; the model needs {APSTAR_NPIX} or {model.n_pixels}")
    flag = FLAGS["NON_FINITE_INPUT"] if non_finite else 0
    if continuum_flags:
        flag |= FLAGS["CONTINUUM_FAILED"]
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0) & model._fit_ok
    if int(good.sum()) < MIN_PIXELS:
        return _empty_row(snr, flag | FLAGS["NO_DATA"])
    # data errors and emulator error in quadrature
    weight = np.where(good, 1.0 / (1.0 / np.where(good, ivar, 1.0) + model.model_sigma**2), 0.0)
    flux = np.where(good, flux, 1.0)
    prob = _Problem(model, flux, weight)
    k = model.n_labels
    # starting points: the best few of the start grid by χ² (one batched forward pass, no shift)
    grid = model.start_points
    pred = model.predict_scaled(grid)[:, prob.use]
    chi2 = np.sum(((pred - prob.flux) * prob.sw) ** 2, axis=1)
    starts = grid[np.argsort(chi2)[:N_STARTS]]
    lo = np.r_[np.full(k, -0.5), -RV_LIMIT / KMS_PER_PIXEL]
    hi = -lo
    best = None
    for x0 in starts:
        p0 = np.r_[np.clip(x0, -0.5 + 1e-6, 0.5 - 1e-6), 0.0]
        res = least_squares(prob.residuals, p0, jac=prob.jacobian, bounds=(lo, hi), method="trf",
                            x_scale=np.r_[np.full(k, 0.1), 0.5], ftol=1e-6, xtol=1e-6, gtol=1e-8, max_nfev=100)
        if best is None or res.cost < best.cost:
            best = res
    assert best is not None
    p = best.x
    n_use = prob.use.size
    chi2_best = 2.0 * best.cost
    r_chi_sq = chi2_best / max(n_use - (k + 1), 1)
    if best.status == 0:
        flag |= FLAGS["NOT_CONVERGED"]
    pinned = np.abs(p[:k]) >= 0.5 - BOUND_TOL
    in_range_labels = np.isin(model.label_names, RANGE_LABELS)
    if np.any(pinned & in_range_labels):
        flag |= FLAGS["OUTSIDE_RANGE"]
    if np.any(pinned & ~in_range_labels):
        flag |= FLAGS["AT_BOUND"]
    if abs(p[k]) * KMS_PER_PIXEL >= RV_LIMIT * (1 - 1e-3):
        flag |= FLAGS["RV_AT_BOUND"]
    if r_chi_sq > HIGH_CHI2:
        flag |= FLAGS["HIGH_CHI2"]
    if screen_mismatch and mismatch.is_poor_match(r_chi_sq, snr):
        flag |= FLAGS["POOR_MODEL_MATCH"]
    outside = coverage_distance(model, p[:k]) > COVERAGE_DISTANCE
    if outside:
        flag |= FLAGS["OUTSIDE_TRAINING"]
    if hydrogen.has_hot_star_lines(apstar_wavelength()[model.pixels], flux,
                                   model.predict_scaled(p[None, :k])[0], weight, outside_hull=outside):
        flag |= FLAGS["HYDROGEN_LINES"]
    jac = prob.jacobian(p)
    try:
        cov = np.linalg.inv(jac.T @ jac)
        err = np.sqrt(np.diag(cov))
        if not np.all(np.isfinite(err)):
            raise np.linalg.LinAlgError("non-finite covariance")
    except np.linalg.LinAlgError:
        err = np.full(k + 1, np.nan)
        flag |= FLAGS["SINGULAR"]
    row = _empty_row(snr, flag)
    row["r_chi_sq"] = _clean(r_chi_sq)
    if flag & FATAL:
        return row
    labels = model.unscale(p[:k])
    span = model.x_max - model.x_min
    cov_labels = cov[:k, :k] * np.outer(span, span) if np.all(np.isfinite(err)) else np.full((k, k), np.nan)
    iron = model.label_names.index("fe_h")
    for i, name in enumerate(model.label_names):
        value, var = labels[i], cov_labels[i, i] + model.label_floor[i] ** 2
        if name in _PER_FE:   # [X/H] = [X/Fe] + [Fe/H], with their covariance
            value += labels[iron]
            var += cov_labels[iron, iron] + 2.0 * cov_labels[i, iron] + model.label_floor[iron] ** 2
        row[COLUMNS[name]] = _clean(value)
        row[f"u_{COLUMNS[name]}"] = _clean(np.sqrt(var))
    row["rv"] = _clean(p[k] * KMS_PER_PIXEL)
    row["u_rv"] = _clean(err[k] * KMS_PER_PIXEL)
    return row


def fit_spectra(model: PayneModel, spectra: Sequence[Spectrum]) -> list[dict[str, Any]]:
    """Fit every rest-frame apStar-grid spectrum: continuum normalisation
    (:func:`continuum.normalize`), then the emulator fit. One dict per spectrum with the
    ``astra.thepayne`` columns snr, teff, u_teff, logg, u_logg, fe_h, u_fe_h, alpha_m, u_alpha_m,
    v_turb, u_v_turb, c_h, u_c_h, n_h, u_n_h (columns of labels the model lacks are None), rv, u_rv,
    r_chi_sq, bitmask_flag (None where not measured; see :data:`FLAGS`).
    Raises :class:`PayneError` for a model of other labels or another continuum rule, and
    ValueError (naming the file) for a spectrum not on the rest-frame apStar grid."""
    if not isinstance(model, PayneModel):
        raise PayneError(f"fit_spectra needs a PayneModel, got {type(model).__name__}")
    check_labels(model.label_names)
    trained_with = model.meta.get("continuum_fingerprint")
    if trained_with is not None and trained_with != continuum.continuum_fingerprint():
        raise PayneError(f"model was trained on spectra normalised with continuum rule {trained_with}; "
                         f"this code normalises with {continuum.continuum_fingerprint()}: retrain the model")
    rows = []
    for spectrum in spectra:
        norm = continuum.normalize(spectrum)
        weighted = (spectrum.ivar != 0) & (continuum.chip_index() >= 0)
        non_finite = bool(np.any(weighted & ~(np.isfinite(spectrum.flux) & np.isfinite(spectrum.ivar))))
        rows.append(fit_normalized(model, norm.flux, norm.ivar, continuum_flags=int(norm.meta["continuum_flags"]),
                                   non_finite=non_finite, snr=_snr(spectrum)))
    return rows
