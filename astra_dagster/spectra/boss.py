"""BOSS ``spec`` / spec-lite files: HDU1 COADD table (loglam, flux, ivar, and/or masks, wdisp)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from astra_dagster.spectra.apogee import open_fits
from astra_dagster.spectra.errors import SpectrumFormatError
from astra_dagster.spectra.spectrum import Spectrum

_COLUMNS = ("loglam", "flux", "ivar")


def read_spec_lite(path: str | os.PathLike[str]) -> Spectrum:
    """The co-added BOSS spectrum: vacuum wavelengths, barycentric frame (bc = 0)."""
    path = Path(path)
    with open_fits(path) as hdul:
        if len(hdul) < 2 or not hasattr(hdul[1], "columns"):
            raise SpectrumFormatError(path, "HDU 1 (COADD table) missing")
        table = hdul[1].data
        names = [c.lower() for c in hdul[1].columns.names]
        missing = [c for c in _COLUMNS if c not in names]
        if missing:
            raise SpectrumFormatError(path, f"COADD table lacks column(s) {', '.join(missing)}")
        loglam = np.asarray(table["loglam"], dtype=float)
        flux = np.asarray(table["flux"], dtype=float)
        ivar = np.asarray(table["ivar"], dtype=float)
        or_mask = np.asarray(table["or_mask"], dtype=np.int64) if "or_mask" in names else np.zeros(flux.size, int)
        primary = hdul[0].header
        spall = hdul[2].data if len(hdul) > 2 and hasattr(hdul[2], "columns") else None
    if np.any(ivar < 0):
        raise SpectrumFormatError(path, "negative inverse variance")
    if not np.any(np.isfinite(flux) & (ivar > 0)):
        raise SpectrumFormatError(path, "all-NaN (or unusable) flux")
    if np.any(np.diff(loglam) <= 0):
        raise SpectrumFormatError(path, "loglam is not increasing")
    snr = float(spall["SN_MEDIAN_ALL"][0]) if spall is not None and "SN_MEDIAN_ALL" in spall.names else None
    ivar = np.where(np.isfinite(flux) & np.isfinite(ivar), ivar, 0.0)
    meta = {"frame": "observed", "kind": "stack", "format": "specLite", "instrument": "boss",
            "path": str(path), "index": 0, "snr": snr, "bc": 0.0,  # BOSS spectra are barycentric
            "mjd": primary.get("MJD"), "fiber": primary.get("FIBERID"),
            "telescope": primary.get("TELESCOP"), "ra": primary.get("RA"), "dec": primary.get("DEC"),
            "source_id": str(primary.get("CATALOGID") or f"{primary.get('PLATEID')}-{primary.get('MJD')}-"
                             f"{primary.get('FIBERID')}")}
    return Spectrum(10.0**loglam, flux, ivar, or_mask, meta)
