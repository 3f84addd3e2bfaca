"""SDSS-V Milky Way Mapper ``mwmStar`` / ``mwmVisit`` files (Astra's own products).

HDU0 is the source header; HDU1 BOSS/APO, HDU2 BOSS/LCO, HDU3 APOGEE/APO, HDU4 APOGEE/LCO, each a
binary table with one row per spectrum (``flux``, ``ivar``, ``pixel_flags``; mwmVisit rows also
``in_stack``), wavelength from the header cards CRVAL/CDELT/NPIXELS (log10, rest frame, vacuum).
An empty HDU has ``DATASUM == "0"``. The writer exists for tests: no real file is at hand.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from astra_dagster.spectra.apogee import _write_atomic, open_fits
from astra_dagster.spectra.errors import SpectrumFormatError
from astra_dagster.spectra.spectrum import Spectrum

#: (instrument, observatory) of HDUs 1-4.
HDU_LAYOUT = {1: ("boss", "apo"), 2: ("boss", "lco"), 3: ("apogee", "apo"), 4: ("apogee", "lco")}
#: Log-linear grids: (CRVAL, CDELT, NPIXELS).
GRIDS = {"apogee": (4.179, 6e-6, 8575), "boss": (3.5523, 1e-4, 4648)}


def read_mwm(path: str | os.PathLike[str]) -> list[Spectrum]:
    """Every spectrum in every non-empty instrument HDU (rest frame)."""
    path = Path(path)
    spectra: list[Spectrum] = []
    with open_fits(path) as hdul:
        primary = hdul[0].header
        kind = "visit" if "visit" in str(primary.get("FILETYPE", "")).lower() else "stack"
        for index, (instrument, observatory) in HDU_LAYOUT.items():
            if len(hdul) <= index:
                raise SpectrumFormatError(path, f"HDU {index} ({instrument}/{observatory}) missing")
            hdu = hdul[index]
            if str(hdu.header.get("DATASUM", "")) == "0" or hdu.data is None or len(hdu.data) == 0:
                continue
            crval = hdu.header.get("CRVAL", GRIDS[instrument][0])
            cdelt = hdu.header.get("CDELT", GRIDS[instrument][1])
            npix = hdu.header.get("NPIXELS", GRIDS[instrument][2])
            wavelength = 10.0 ** (float(crval) + float(cdelt) * np.arange(int(npix)))
            for row_number, row in enumerate(hdu.data):
                flux = np.asarray(row["flux"], dtype=float)
                ivar = np.asarray(row["ivar"], dtype=float)
                if flux.size != wavelength.size:
                    raise SpectrumFormatError(path, f"HDU {index} row {row_number}: {flux.size} pixels, "
                                                    f"header says {wavelength.size}")
                if np.any(ivar < 0):
                    raise SpectrumFormatError(path, f"HDU {index} row {row_number}: negative inverse variance")
                if not np.any(np.isfinite(flux) & (ivar > 0)):
                    raise SpectrumFormatError(path, f"HDU {index} row {row_number}: all-NaN flux")
                names = row.array.names
                flags = (np.asarray(row["pixel_flags"], dtype=np.int64) if "pixel_flags" in names
                         else np.zeros(flux.size, np.int64))
                meta: dict[str, Any] = {
                    "frame": "rest", "kind": kind, "format": "mwmVisit" if kind == "visit" else "mwmStar",
                    "instrument": instrument, "telescope": f"{observatory}25m", "path": str(path),
                    "index": index * 1000 + row_number, "source_id": primary.get("SDSS_ID"),
                    "ra": primary.get("RA"), "dec": primary.get("DEC"),
                }
                for key in ("snr", "mjd", "in_stack"):
                    if key in names:
                        meta[key] = row[key].item() if hasattr(row[key], "item") else row[key]
                spectra.append(Spectrum(wavelength, flux, np.where(np.isfinite(flux), ivar, 0.0), flags, meta))
    if not spectra:
        raise SpectrumFormatError(path, "no spectra in any of HDUs 1-4")
    return spectra


def write_mwm(
    path: str | os.PathLike[str],
    header: Mapping[str, Any],
    rows_by_hdu: Mapping[int, Sequence[Mapping[str, Any]]],
    *,
    visit: bool = False,
) -> None:
    """Write an mwmStar (or mwmVisit) file; ``rows_by_hdu`` maps HDU 1-4 to rows with flux, ivar,
    pixel_flags and optional snr/mjd/in_stack."""
    primary = fits.PrimaryHDU()
    for key, value in header.items():
        primary.header[key] = value
    primary.header["FILETYPE"] = "mwmVisit" if visit else "mwmStar"
    hdus: list[fits.hdu.base.ExtensionHDU] = [primary]
    for index, (instrument, observatory) in HDU_LAYOUT.items():
        crval, cdelt, npix = GRIDS[instrument]
        rows = rows_by_hdu.get(index, [])
        columns = [
            fits.Column("flux", f"{npix}E", array=np.array([r["flux"] for r in rows]).reshape(-1, npix)),
            fits.Column("ivar", f"{npix}E", array=np.array([r["ivar"] for r in rows]).reshape(-1, npix)),
            fits.Column("pixel_flags", f"{npix}K",
                        array=np.array([r["pixel_flags"] for r in rows], dtype=np.int64).reshape(-1, npix)),
            fits.Column("snr", "E", array=np.array([r.get("snr", np.nan) for r in rows])),
            fits.Column("mjd", "J", array=np.array([r.get("mjd", 0) for r in rows])),
        ]
        if visit:
            columns.append(fits.Column("in_stack", "L", array=np.array([r.get("in_stack", True) for r in rows])))
        hdu = fits.BinTableHDU.from_columns(columns, name=f"{instrument.upper()}/{observatory.upper()}")
        hdu.header.update({"CRVAL": crval, "CDELT": cdelt, "NPIXELS": npix})
        if not rows:
            hdu.header["DATASUM"] = "0"
        hdus.append(hdu)
    _write_atomic(fits.HDUList(hdus), Path(path))
