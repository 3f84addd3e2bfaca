"""Small valid and deliberately broken apStar/apVisit files, written at test time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from astra_dagster.spectra.apogee import write_apstar, write_apvisit
from astra_dagster.spectra.spectrum import APSTAR_NPIX, apstar_wavelength


def apstar_arrays(nvisits: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    nrow = 1 if nvisits == 1 else nvisits + 2
    wave = apstar_wavelength()
    lines = 1 - 0.3 * np.exp(-0.5 * ((wave[None, :] - np.array([15300, 15800, 16300, 16800])[:, None]) / 1.5) ** 2)
    flux = 800.0 * np.prod(lines, axis=0)[None, :] * np.ones((nrow, 1)) + rng.normal(0, 5, (nrow, APSTAR_NPIX))
    sigma = np.full_like(flux, 5.0)
    mask = np.zeros(flux.shape, dtype=np.int64)
    mask[:, 100:110] = 1  # BADPIX
    header = {"OBJID": "2M00000001+0000001", "NVISITS": nvisits, "SNR": 160.0, "TELESCOP": "apo25m",
              "RA": 10.0, "DEC": 20.0}
    for v in range(1, nvisits + 1):
        header.update({f"SNRVIS{v}": 100.0 + v, f"JD{v}": 2459000.5 + v, f"BC{v}": 10.0 * v,
                       f"FIBER{v}": 100 + v, f"SFILE{v}": f"apVisit-{v}.fits"})
    return flux, sigma, mask, header


def apvisit_arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    ranges = [(16955.0, 16473.0), (16435.0, 15857.0), (15810.0, 15142.0)]  # red, green, blue
    wave = np.array([np.linspace(a, b, 4096) for a, b in ranges])
    flux = 500.0 + rng.normal(0, 5, wave.shape)
    sigma = np.full_like(flux, 5.0)
    mask = np.zeros(wave.shape, dtype=np.int16)
    header = {"OBJID": "2M00000001+0000001", "JD-MID": 2459001.7, "MJD5": 59001, "BC": 12.5,
              "SNR": 100.0, "FIBERID": 101, "TELESCOP": "apo25m", "RA": 10.0, "DEC": 20.0}
    return wave, flux, sigma, mask, header


def write_good_apstar(path: Path, nvisits: int = 2, source_id: str | None = None, seed: int = 0) -> Path:
    flux, sigma, mask, header = apstar_arrays(nvisits, seed)
    if source_id:
        header["OBJID"] = source_id
    write_apstar(path, flux, sigma, mask, header)
    return path


def write_good_apvisit(path: Path, source_id: str | None = None, seed: int = 0, mjd: int = 59001) -> Path:
    wave, flux, sigma, mask, header = apvisit_arrays(seed)
    if source_id:
        header["OBJID"] = source_id
    header["MJD5"] = mjd
    write_apvisit(path, wave, flux, sigma, mask, header)
    return path


def write_truncated(path: Path) -> Path:
    write_good_apstar(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_not_fits(path: Path) -> Path:
    path.write_bytes(b"this is not a FITS file\n" * 200)
    return path


def write_missing_hdu(path: Path) -> Path:
    """An apStar without its flux-error and mask HDUs."""
    write_good_apstar(path)
    with fits.open(path) as hdul:
        fits.HDUList([hdul[0].copy(), hdul[1].copy()]).writeto(path, overwrite=True)
    return path


def write_wrong_naxis1(path: Path) -> Path:
    flux, sigma, mask, header = apstar_arrays()
    hdus = [fits.PrimaryHDU()]
    for key, value in header.items():
        hdus[0].header[key] = value
    hdus += [fits.ImageHDU(a[:, :8000]) for a in (flux, sigma, mask)]
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def write_all_nan_flux(path: Path) -> Path:
    flux, sigma, mask, header = apstar_arrays()
    flux[:] = np.nan
    write_apstar(path, flux, sigma, mask, header)
    return path


def write_negative_sigma(path: Path) -> Path:
    flux, sigma, mask, header = apstar_arrays()
    sigma[2, 500:520] = -1.0
    write_apstar(path, flux, sigma, mask, header)
    return path


BAD_FILES = {
    "truncated": (write_truncated, "truncated"),
    "not FITS": (write_not_fits, "not a readable FITS file"),
    "missing HDU": (write_missing_hdu, "HDU 2 (flux error) missing"),
    "wrong NAXIS1": (write_wrong_naxis1, "NAXIS1 is 8000"),
    "all-NaN flux": (write_all_nan_flux, "all-NaN"),
    "negative sigma": (write_negative_sigma, "negative flux error"),
}
