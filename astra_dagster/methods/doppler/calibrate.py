"""Calibration of the error floors of a template set from spectra with known velocity and labels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from astra_dagster.methods.doppler.emulator import Emulator
from astra_dagster.methods.doppler.fit import fit_visit
from astra_dagster.methods.doppler.flags import DopplerError
from astra_dagster.methods.doppler.floors import FLOOR_NAMES
from astra_dagster.methods.doppler.prepare import as_emulators
from astra_dagster.spectra.spectrum import Spectrum


def calibrate_error_floors(
    templates: Emulator | Sequence[Emulator],
    spectra: Sequence[tuple[Spectrum, float, Sequence[float]]], *, noise_free: bool = True,
) -> dict[str, float]:
    """Systematic error floors of a template set from spectra with known velocity and labels.

    ``spectra`` holds (spectrum, true vrel, true (Teff, logg, [Fe/H])). They should be
    renderings of stars the templates were not trained on, with hidden labels (rotation,
    macroturbulence, C, N, α) scattering as in real stars: what their errors show beyond noise
    is template mismatch. For noise-free spectra (the default) the floor is the robust σ
    (1.4826 MAD) of the errors; otherwise the median formal error is removed in quadrature.
    """
    emulators = as_emulators(templates)
    saved = [e.meta.pop("error_floors", None) for e in emulators]
    try:
        # Every fit counts: the floors measure template mismatch, not which fits pass the RV checks.
        results = [(fit_visit(s, emulators, reject_doubtful=False), v, lab) for s, v, lab in spectra]
    finally:
        for e, value in zip(emulators, saved, strict=True):
            if value is not None:
                e.meta["error_floors"] = value
    good = [(r, v, lab) for r, v, lab in results if r.ok]
    if len(good) < 10:
        raise DopplerError(f"calibrate_error_floors: only {len(good)} of {len(results)} spectra gave a velocity")
    delta = {
        "teff": [r.teff - lab[0] for r, _, lab in good], "logg": [r.logg - lab[1] for r, _, lab in good],
        "fe_h": [r.fe_h - lab[2] for r, _, lab in good], "vrel": [r.vrel - v for r, v, _ in good],
    }
    formal = {"teff": [r.u_teff for r, _, _ in good], "logg": [r.u_logg for r, _, _ in good],
              "fe_h": [r.u_fe_h for r, _, _ in good], "vrel": [r.u_vrel for r, _, _ in good]}
    floors = {}
    for name in FLOOR_NAMES:
        d = np.asarray(delta[name])
        robust = 1.4826 * float(np.median(np.abs(d - np.median(d))))
        if noise_free:
            floors[name] = robust
        else:
            floors[name] = math.sqrt(max(robust**2 - float(np.median(formal[name])) ** 2, 0.0))
    return floors
