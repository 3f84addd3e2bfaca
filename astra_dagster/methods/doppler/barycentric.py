"""Barycentric velocity correction at APO and LCO (astropy, offline), and the one a visit uses."""

from __future__ import annotations

import math
import warnings

import numpy as np

from astra_dagster.methods.doppler.flags import DopplerError, DopplerFlag
from astra_dagster.spectra.spectrum import Spectrum

#: Observatory locations (lon °, lat °, height m) given explicitly so astropy needs no site
#: registry download.
SITES: dict[str, tuple[float, float, float]] = {
    "apo": (-105.8203, 32.7803, 2788.0),
    "lco": (-70.6926, -29.0146, 2380.0),
}


def _site_for(telescope: str | None) -> tuple[float, float, float]:
    name = (telescope or "").lower()
    if name.startswith("lco") or "lco" in name:
        return SITES["lco"]
    if name.startswith("apo") or "apo" in name or name == "":
        return SITES["apo"]
    raise DopplerError(f"unknown telescope {telescope!r}: expected an apo* or lco* name")


def barycentric_correction(ra: float, dec: float, jd: float, telescope: str | None = "apo25m") -> float:
    """Barycentric velocity correction (km/s) for a star seen from APO or LCO at ``jd`` (UTC).

    Uses astropy offline: explicit site coordinates and no IERS download (the bundled IERS-B
    table; beyond it astropy's predictions, good to m/s).
    """
    from astropy import units as u
    from astropy.coordinates import EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    if not all(np.isfinite([ra, dec, jd])):
        raise DopplerError(f"barycentric correction needs finite ra/dec/jd, got {ra}, {dec}, {jd}")
    lon, lat, height = _site_for(telescope)
    iers.conf.auto_download = False
    location = EarthLocation.from_geodetic(lon=lon * u.deg, lat=lat * u.deg, height=height * u.m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # IERS-range warnings: offline by design, m/s level
        corr = SkyCoord(ra * u.deg, dec * u.deg).radial_velocity_correction(
            "barycentric", obstime=Time(jd, format="jd", scale="utc"), location=location
        )
    return float(corr.to(u.km / u.s).value)


def _barycentric(spectrum: Spectrum, flags: int) -> tuple[float, int]:
    meta = spectrum.meta
    if str(meta.get("frame", "observed")) == "rest":
        return 0.0, flags | DopplerFlag.REST_FRAME
    bc = meta.get("bc")
    if bc is not None and np.isfinite(float(bc)):
        return float(bc), flags
    try:
        ra, dec, jd = (float(meta[k]) for k in ("ra", "dec", "jd"))
        return barycentric_correction(ra, dec, jd, meta.get("telescope")), flags | DopplerFlag.BC_COMPUTED
    except (KeyError, TypeError, ValueError, DopplerError):
        return math.nan, flags | DopplerFlag.NO_BC
