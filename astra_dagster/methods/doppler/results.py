"""Results of the RV fits: :class:`VisitRV` for one spectrum, :class:`StarRV` for the visits of one star."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from astra_dagster.methods.doppler.flags import FATAL_FLAGS, flag_names


@dataclass
class VisitRV:
    """Result for one spectrum. NaN marks what could not be measured (see ``flags``)."""

    vrel: float
    u_vrel: float
    teff: float
    u_teff: float
    logg: float
    u_logg: float
    fe_h: float
    u_fe_h: float
    chisq: float
    bc: float
    vhelio: float
    flags: int
    snr: float
    template: str = ""
    n_pixels: int = 0
    ccf_vrel: float = math.nan
    #: Velocity error of the coarse correlation peak (its χ² curvature), km/s.
    u_ccf_vrel: float = math.nan
    vsini: float = 0.0
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the velocity was measured."""
        return not (self.flags & FATAL_FLAGS)

    @property
    def flag_names(self) -> list[str]:
        return flag_names(self.flags)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["flag_names"] = self.flag_names
        return out


@dataclass
class StarRV:
    """Joint fit over the visits of one star: common labels, one velocity per visit."""

    visits: list[VisitRV]
    vhelio: float
    u_vhelio: float
    vscatter: float
    teff: float
    u_teff: float
    logg: float
    u_logg: float
    fe_h: float
    u_fe_h: float
    chisq: float
    n_visits: int
    n_good_visits: int
    flags: int
    template: str = ""
    vsini: float = 0.0
    message: str = ""

    @property
    def flag_names(self) -> list[str]:
        return flag_names(self.flags)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["visits"] = [v.to_dict() for v in self.visits]
        out["flag_names"] = self.flag_names
        return out
