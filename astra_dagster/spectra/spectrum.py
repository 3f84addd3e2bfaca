"""The one in-memory spectrum type that every reader returns and every method takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: APOGEE rest-frame log-linear grid used by apStar / mwmStar / ASPCAP (vacuum Å).
APSTAR_CRVAL1 = 4.179
APSTAR_CDELT1 = 6e-6
APSTAR_NPIX = 8575

#: Speed of light in km/s.
C_KMS = 299792.458


def apstar_wavelength() -> np.ndarray:
    """The 8575-pixel apStar rest-frame vacuum wavelength grid in Å (a fresh copy: callers may
    change it in place)."""
    return _APSTAR_WAVELENGTH.copy()


# computed once: 8575 powers of ten cost ~20x the copy, and every apStar row and model asks
_APSTAR_WAVELENGTH = 10.0 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * np.arange(APSTAR_NPIX))
_APSTAR_WAVELENGTH.flags.writeable = False


@dataclass
class Spectrum:
    """A single 1-D spectrum (one visit or one stack row).

    Arrays share one shape ``(n_pixels,)`` and are sorted by ascending wavelength; multi-chip
    data (apVisit) are concatenated chip by chip in ascending wavelength order.

    ``ivar`` is ``1/σ²`` where flux and σ are finite and σ > 0, else 0 (chip gaps, NaN). APOGEE's
    convention of inflating σ of bad pixels then gives ivar ≈ 0 by itself. ``pixel_flags`` keeps
    the raw ``APOGEE_PIXMASK`` bits (0 when the format has none) so each method picks its own mask.

    ``meta`` carries what the methods and the tables need, with these keys when known:
    ``frame`` ("rest" | "observed"), ``kind`` ("visit" | "stack"), ``snr``, ``mjd``, ``jd``,
    ``bc`` (barycentric correction, km/s), ``telescope``, ``fiber``, ``source_id``, ``path``,
    ``index`` (row or HDU index in the file), ``ra``, ``dec``, ``instrument`` ("apogee" | "boss").
    """

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    pixel_flags: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.wavelength = np.asarray(self.wavelength, dtype=float)
        self.flux = np.asarray(self.flux, dtype=float)
        self.ivar = np.asarray(self.ivar, dtype=float)
        self.pixel_flags = np.asarray(self.pixel_flags, dtype=np.int64)
        n = self.wavelength.shape
        for name in ("flux", "ivar", "pixel_flags"):
            if getattr(self, name).shape != n:
                raise ValueError(
                    f"Spectrum.{name} has shape {getattr(self, name).shape}, wavelength has {n}"
                )

    @property
    def n_pixels(self) -> int:
        return int(self.wavelength.size)

    @property
    def snr(self) -> float | None:
        value = self.meta.get("snr")
        return None if value is None else float(value)
