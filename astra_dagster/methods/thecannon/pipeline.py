"""The Cannon as a pipeline method: the training set from the generator, :func:`train_model` and
:func:`fit_spectra` on :class:`~astra_dagster.spectra.spectrum.Spectrum` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from astra_dagster.methods.progress import Progress, reporter
from astra_dagster.methods.thecannon.flags import FATAL, FLAGS, CannonError
from astra_dagster.methods.thecannon.model import SURVEY_REGIONS, CannonModel

#: Default training size: small enough for CI (generation ~20 s, training ~10 s on one core).
DEFAULT_TRAINING: dict[str, Any] = {"n_train": 600, "seed": 101}
#: Full-size settings (a few minutes on one core).
FULL_TRAINING: dict[str, Any] = {"n_train": 3000, "seed": 101}
#: Populations of the generator the default model covers; a quadratic model cannot span the hot stars.
TRAINING_KINDS: tuple[str, ...] = ("giant", "dwarf", "yso")
#: Label order of the per-spectrum results and of ``astra.thecannon``.
#: The labels the generator's physical model carries ([α/M] would be fitted to noise).
LABELS: tuple[str, ...] = ("teff", "logg", "fe_h")


def training_spectra(n_train: int, seed: int, *, kinds: Sequence[str] = TRAINING_KINDS,
                     hidden_scatter: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``n_train`` noiseless generator spectra (TRAINING_SETTINGS: an independent draw and
    instrument settings from any release) of the populations ``kinds``, normalised with the
    shared continuum rule: (flux, ivar, labels).

    ``hidden_scatter``: the labels the model does not fit (microturbulence, rotation, [C/Fe],
    [N/Fe]) scatter about their mean relations as they do in real stars, so the trained s²
    carries that variance and the test step down-weights the pixels it affects, as a Cannon
    trained on survey spectra would. Without it those pixels look perfectly predictable and
    their star-to-star differences are read as label changes."""
    import dataclasses

    from astra_dagster.methods import continuum
    from astra_dagster.spectra import synth

    if n_train < 1:
        raise CannonError(f"training set size must be >= 1, got {n_train}")
    settings = dataclasses.replace(synth.TRAINING_SETTINGS, vary_hidden=hidden_scatter)
    ts = synth.make_training_set(int(np.ceil(n_train / 0.85)) + 10, seed, settings=settings)
    keep = np.flatnonzero(np.isin(ts.kind, tuple(kinds)))[:n_train]
    flux, ivar = continuum.normalize_arrays(ts.wavelength, ts.flux[keep], ts.ivar[keep])
    return flux, ivar, {k: ts.labels[k][keep] for k in LABELS}


def train_model(*, n_train: int = DEFAULT_TRAINING["n_train"], seed: int = DEFAULT_TRAINING["seed"],
                order: int = 2, regularization: float = 0.0, regions: str = "survey", cv_folds: int = 2,
                hidden_scatter: bool = True, progress: Progress | None = None) -> CannonModel:
    """Train a Cannon model on :func:`training_spectra`. ``regions``: "survey" (the piecewise
    :data:`SURVEY_REGIONS` model) or "none" (one polynomial); ``hidden_scatter`` see there.
    ``progress`` gets a line after the training set, per region and per cross-validation fold
    (it does not change the model)."""
    import time

    from astra_dagster.methods import continuum

    if regions not in ("survey", "none"):
        raise CannonError(f"regions must be 'survey' or 'none', got {regions!r}")
    start = time.perf_counter()
    report = reporter(progress, "thecannon")
    flux, ivar, labels = training_spectra(n_train, seed, hidden_scatter=hidden_scatter)
    report(f"training set: {flux.shape[0]} spectra generated and normalised")
    meta = {"n_train": int(flux.shape[0]), "seed": int(seed), "hidden_scatter": bool(hidden_scatter),
            "continuum": continuum.continuum_fingerprint()}
    model = CannonModel(LABELS, order=order, regularization=regularization, meta=meta,
                        regions=SURVEY_REGIONS if regions == "survey" else None)
    model.train(flux, ivar, labels, cv_folds=cv_folds, progress=report if progress is not None else None)
    model.meta["training_seconds"] = round(time.perf_counter() - start, 2)
    return model


def _value(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def fit_spectra(model: CannonModel, spectra: Sequence[Any]) -> list[dict[str, Any]]:
    """Labels for rest-frame apStar spectra (:class:`~astra_dagster.spectra.spectrum.Spectrum`):
    one dict per spectrum with the ``astra.thecannon`` columns. Spectra the test step cannot fit
    (NO_DATA, e.g. all chips masked) get None labels and their flag bits."""
    from astra_dagster.methods import continuum, hydrogen, mismatch

    if not spectra:
        return []
    normalised = [continuum.normalize(s) for s in spectra]
    flux = np.vstack([s.flux for s in normalised])
    ivar = np.vstack([s.ivar for s in normalised])
    result = model.test(flux, ivar)
    u = result.uncertainties
    fitted = np.all(np.isfinite(result.labels), axis=1)
    best = np.ones_like(flux)
    if fitted.any():
        best[fitted] = model.predict(result.labels[fitted])
    wavelength = normalised[0].wavelength
    rows = []
    for i, s in enumerate(spectra):
        flags = int(result.flags[i])
        if fitted[i] and hydrogen.has_hot_star_lines(wavelength, flux[i], best[i], ivar[i],
                                                     outside_hull=bool(flags & FLAGS["OUTSIDE_HULL"])):
            flags |= FLAGS["HYDROGEN_LINES"]
        if fitted[i] and mismatch.is_poor_match(result.r_chi_sq[i], float(s.meta.get("snr") or np.nan)):
            flags |= FLAGS["POOR_MODEL_MATCH"]
        measured = not flags & FATAL
        row: dict[str, Any] = {"snr": _value(float(s.meta.get("snr") or np.nan))}
        for k, name in enumerate(model.label_names):
            row[name] = _value(result.labels[i, k]) if measured else None
            row[f"u_{name}"] = _value(u[i, k]) if measured else None
        row["r_chi_sq"] = _value(result.r_chi_sq[i])
        row["bitmask_flag"] = flags
        rows.append(row)
    return rows
