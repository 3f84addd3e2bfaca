"""Test-step results of a Cannon model for a batch of spectra (:class:`CannonResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CannonResult:
    """Test-step results for n spectra. ``labels`` (n, K) physical units, ``covariance``
    (n, K, K), ``r_chi_sq`` (objective χ² per degree of freedom), ``chi_sq`` (objective, with
    s²), ``n_pixels`` (usable pixels), ``flags`` (bits of :data:`FLAGS`), ``region`` (index of
    the piece that fitted the star, -1 if none); rows flagged NO_DATA are NaN."""

    label_names: tuple[str, ...]
    labels: np.ndarray
    covariance: np.ndarray
    r_chi_sq: np.ndarray
    chi_sq: np.ndarray
    n_pixels: np.ndarray
    flags: np.ndarray
    region: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def uncertainties(self) -> np.ndarray:
        """(n, K) square roots of the covariance diagonals."""
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.diagonal(self.covariance, axis1=1, axis2=2))

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{name: (n,), "u_" + name: (n,)}`` for every label, plus r_chi_sq and flags."""
        u = self.uncertainties
        out: dict[str, np.ndarray] = {}
        for k, name in enumerate(self.label_names):
            out[name] = self.labels[:, k]
            out[f"u_{name}"] = u[:, k]
        out["r_chi_sq"] = self.r_chi_sq
        out["flags"] = self.flags
        return out

    def __len__(self) -> int:
        return int(self.labels.shape[0])
