"""The templates' systematic error floors, added in quadrature to the statistical errors."""

from __future__ import annotations

import numpy as np

from astra_dagster.methods.doppler.emulator import Emulator

#: Quantities with a calibrated error floor, in the order of the fit parameters.
FLOOR_NAMES: tuple[str, str, str, str] = ("teff", "logg", "fe_h", "vrel")


def error_floors(emulator: Emulator) -> dict[str, float]:
    """The emulator's systematic error floors (template mismatch), added in quadrature to the
    statistical errors: ``emulator.meta["error_floors"]``, 0 where uncalibrated."""
    stored = emulator.meta.get("error_floors") or {}
    out = {}
    for name in FLOOR_NAMES:
        value = stored.get(name)
        out[name] = float(value) if value is not None and np.isfinite(value) else 0.0
    return out


def _floor_vector(emulator: Emulator) -> np.ndarray:
    floors = error_floors(emulator)
    return np.array([floors[n] for n in FLOOR_NAMES])
