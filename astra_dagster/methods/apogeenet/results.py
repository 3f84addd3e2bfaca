"""Predictions for a batch of spectra (:class:`ApogeeNetResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from astra_dagster.methods.apogeenet.flags import flag_names


@dataclass
class ApogeeNetResult:
    """Per-spectrum results (arrays of length n). NaN where nothing could be measured (see
    ``bitmask_flag``); ``snr`` is the median flux·√ivar over the usable pixels."""

    teff: np.ndarray
    u_teff: np.ndarray
    logg: np.ndarray
    u_logg: np.ndarray
    fe_h: np.ndarray
    u_fe_h: np.ndarray
    bitmask_flag: np.ndarray
    snr: np.ndarray
    #: Monte-Carlo standard deviations alone (before the error floor), in the same units.
    raw_u_teff: np.ndarray = field(default_factory=lambda: np.empty(0))
    raw_u_logg: np.ndarray = field(default_factory=lambda: np.empty(0))
    raw_u_fe_h: np.ndarray = field(default_factory=lambda: np.empty(0))
    #: The mismatch screen's reduced χ² (:func:`.screen.line_chi2`; NaN when not screened).
    line_chi2: np.ndarray = field(default_factory=lambda: np.empty(0))

    def __len__(self) -> int:
        return int(self.teff.size)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per spectrum with the ``astra.apogeenet`` columns (None for NaN)."""
        out = []
        for i in range(len(self)):
            row: dict[str, Any] = {}
            for name in ("snr", "teff", "u_teff", "logg", "u_logg", "fe_h", "u_fe_h"):
                v = float(getattr(self, name)[i])
                row[name] = v if math.isfinite(v) else None
            row["bitmask_flag"] = int(self.bitmask_flag[i])
            row["flag_names"] = flag_names(row["bitmask_flag"])
            out.append(row)
        return out
