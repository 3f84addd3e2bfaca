"""APOGEE ``apStar`` and ``apVisit`` files (DR17 layout): readers, validation and writers.

apStar (rest frame, log-linear grid CRVAL1 4.179 / CDELT1 6e-6 / 8575 px): HDU1 flux, HDU2 σ,
HDU3 APOGEE_PIXMASK; rows ``[pixel-weighted stack, global-weighted stack, visit 1..N]`` when
NVISITS > 1. With NVISITS == 1 DR17 files have two rows of which only the first holds data; it is
returned as the single (stack) spectrum.

apVisit (observed frame): HDU1 flux, HDU2 σ, HDU3 mask, HDU4 wavelength, each 3 chips × 4096 with
row 0 the red chip and wavelength decreasing along each row; returned as one spectrum with chips
concatenated in ascending wavelength.

The data-reduction pipeline's radial velocities (VHELIO, VRAD, RV tables...) are never put in a
spectrum's ``meta``: our RV method must measure them. :func:`drp_radial_velocity` exposes them
for comparisons only.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from astra_dagster.spectra.errors import SpectrumFormatError
from astra_dagster.spectra.plain_fits import PlainImage
from astra_dagster.spectra.spectrum import (
    APSTAR_CDELT1,
    APSTAR_CRVAL1,
    APSTAR_NPIX,
    Spectrum,
    apstar_wavelength,
)

_APSTAR_HDUS = {1: "flux", 2: "flux error", 3: "pixel mask"}
_APVISIT_HDUS = {1: "flux", 2: "flux error", 3: "pixel mask", 4: "wavelength"}
#: Header keywords holding the pipeline's RV measurements: kept out of Spectrum.meta.
_DRP_RV_KEYS = ("VHELIO", "VSCATTER", "VERR", "VERR_MED", "VRAD", "VREL", "RV_TEFF", "RV_LOGG",
                "RV_FEH", "RV_ALPHA", "RV_CARB", "RV_CHI2", "CCFWHM", "AUTOFWHM")
_MJD_ZERO = 2400000.5
#: Most pixels one HDU may claim: far above any APOGEE file (an apStar of 300 visits has 2.6
#: million), far below what would exhaust memory. Checked on the header, before any allocation.
MAX_PIXELS = 2**27
_FITS_RECORD = 2880


@contextmanager
def open_fits(path: str | os.PathLike[str], data: bytes | None = None) -> Iterator[fits.HDUList]:
    """Open a FITS file, turning every astropy complaint (truncation, corrupt header) into a
    SpectrumFormatError that names the file.

    ``data``: the file's bytes, already read (and hashed) by the caller: parsed from memory, so
    the file is read once, and what is parsed is what was checked."""
    path = Path(path)
    if data is None and not path.is_file():
        raise SpectrumFormatError(path, "file not found")
    size = path.stat().st_size if data is None else len(data)
    if size == 0:
        raise SpectrumFormatError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # astropy only *warns* about truncated files
            with fits.open(path if data is None else io.BytesIO(data), memmap=False) as hdul:
                yield hdul
    except SpectrumFormatError:
        raise
    except Exception as exc:  # astropy raises OSError, ValueError, VerifyError, warnings...
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        huge = _huge_claim(path)
        if huge is not None:  # astropy seeks past the claimed data and fails with EINVAL
            raise SpectrumFormatError(path, huge) from None
        if "truncated" in text:
            text = f"truncated: {text}"
        elif size % _FITS_RECORD and _starts_as_fits(path):
            # FITS files are whole 2880-byte records: a cut inside a header reads as a bad header
            text = f"truncated: {size} bytes is not a whole number of 2880-byte records; {text}"
        raise SpectrumFormatError(path, f"not a readable FITS file ({text})") from exc


def _huge_claim(path: Path) -> str | None:
    """Which HDU's header claims more than MAX_PIXELS pixels, read from the raw header cards
    (astropy itself cannot get past such a header)."""
    try:
        with open(path, "rb") as handle:
            for index in range(1000):
                cards: dict[str, str] = {}
                while "END" not in cards:
                    block = handle.read(_FITS_RECORD)
                    if len(block) < _FITS_RECORD:
                        return None
                    for at in range(0, _FITS_RECORD, 80):
                        card = block[at:at + 80].decode("ascii", "replace")
                        cards.setdefault(card[:8].strip(), card[10:].split("/")[0].strip())
                naxis = [int(cards.get(f"NAXIS{i}", "0")) for i in range(1, int(cards.get("NAXIS", "0")) + 1)]
                pixels = int(np.prod([float(n) for n in naxis])) if naxis else 0
                if pixels > MAX_PIXELS:
                    return f"HDU {index} claims {' x '.join(map(str, naxis))} pixels (at most {MAX_PIXELS})"
                nbytes = (pixels * abs(int(cards.get("BITPIX", "8"))) // 8 + int(cards.get("PCOUNT", "0"))
                          ) * int(cards.get("GCOUNT", "1"))
                handle.seek(-(-nbytes // _FITS_RECORD) * _FITS_RECORD, os.SEEK_CUR)
    except (OSError, ValueError):
        return None
    return None


def _starts_as_fits(path: Path) -> bool:
    # only a file that begins as FITS (not compressed, not some other content) was cut short
    with open(path, "rb") as handle:
        return handle.read(10) == b"SIMPLE  = "


def _image(hdul: fits.HDUList, index: int, name: str, path: Path) -> np.ndarray:
    if len(hdul) <= index:
        raise SpectrumFormatError(path, f"HDU {index} ({name}) missing")
    hdu = hdul[index]
    if not isinstance(hdu, fits.ImageHDU | fits.PrimaryHDU | fits.CompImageHDU | PlainImage):
        raise SpectrumFormatError(path, f"HDU {index} ({name}) is a table, not an image")
    naxis = [hdu.header.get(f"NAXIS{i}", 0) for i in range(1, int(hdu.header.get("NAXIS", 0) or 0) + 1)]
    if naxis and int(math.prod(float(n) for n in naxis)) > MAX_PIXELS:
        raise SpectrumFormatError(
            path, f"HDU {index} ({name}) claims {' x '.join(str(n) for n in naxis)} pixels (at most {MAX_PIXELS})")
    if hdu.data is None:
        raise SpectrumFormatError(path, f"HDU {index} ({name}) missing")
    try:
        return np.asarray(hdul[index].data)
    except Exception as exc:
        raise SpectrumFormatError(path, f"HDU {index} ({name}) unreadable: {exc}") from exc


def _good_if_clean(flux: np.ndarray, sigma: np.ndarray) -> np.ndarray | None:
    """The pixels with data (finite flux and σ, σ > 0) of rows (the last axis) that pass every
    check of :func:`_ivar_checked` and hold a finite non-zero flux, in fewer passes over the
    pixels; None when any row fails one (the row-by-row checks then name it).

    The common file has the same finite pixels in flux and σ, no σ < 0 and good pixels in every
    row: checking that over all rows at once costs a third of checking it row by row."""
    finite = np.isfinite(sigma)
    with np.errstate(invalid="ignore"):
        if not np.array_equal(finite, np.isfinite(flux)) or np.any(sigma < 0):
            return None
        good = finite & (sigma > 0)
        if not np.all(np.any(good, axis=-1)) or not np.all(np.any(finite & (flux != 0), axis=-1)):
            return None
    return good


def _inverse_square(sigma: np.ndarray, good: np.ndarray) -> np.ndarray:
    """1/σ² where ``good``, else 0 (a masked ``np.divide(..., where=)`` costs ~4x this)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ivar = np.square(sigma, dtype=float)
        np.reciprocal(ivar, out=ivar)
    np.copyto(ivar, 0.0, where=~good)
    return ivar


def _ivar_checked(flux: np.ndarray, sigma: np.ndarray, path: Path, where: str) -> np.ndarray:
    finite_flux, finite_sigma = np.isfinite(flux), np.isfinite(sigma)
    with np.errstate(invalid="ignore", over="ignore"):
        if np.any(sigma < 0):
            raise SpectrumFormatError(path, f"negative flux error (σ < 0) in {where}")
        # DR17 and our generator mark a pixel without data by NaN in both flux and σ; a
        # non-finite value in only one of them is a broken file, not a gap
        lone_flux = ~finite_flux & finite_sigma
        if np.any(lone_flux):
            raise SpectrumFormatError(
                path, f"non-finite flux (NaN or inf) at {int(lone_flux.sum())} pixel(s) of {where} "
                "whose flux error is finite")
        lone_sigma = np.isnan(sigma) & finite_flux
        if np.any(lone_sigma):
            raise SpectrumFormatError(
                path, f"non-finite flux error (NaN) at {int(lone_sigma.sum())} pixel(s) of {where} "
                "whose flux is finite")
        good = finite_flux & finite_sigma & (sigma > 0)
        if not np.any(good):
            raise SpectrumFormatError(path, f"no pixel with a positive finite flux error in {where}")
    return _inverse_square(sigma, good)


def _header_float(header: fits.Header, key: str) -> float | None:
    value = header.get(key)
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _header_count(header: fits.Header, key: str, path: Path, default: int | None) -> int | None:
    """A header value that must be a whole number (NVISITS, MJD5), else one line naming it."""
    value = header.get(key, default)
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise SpectrumFormatError(path, f"header {key} {value!r} is not a whole number")
    return int(value)


def _pixel_mask(mask: np.ndarray, path: Path, convert: bool = True) -> np.ndarray:
    # A float mask with NaN would cast to -2**63 (every bit set) without a word
    if not np.issubdtype(mask.dtype, np.integer):
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(mask) | (mask != np.round(mask)) | (mask < 0)
        if np.any(bad):
            raise SpectrumFormatError(
                path, f"pixel mask ({mask.dtype}) holds {int(bad.sum())} value(s) that are not bit flags")
    return mask.astype(np.int64) if convert else mask


def _source_id(header: fits.Header) -> str | None:
    for key in ("APOGEE_ID", "OBJID", "OBJECT"):
        value = header.get(key)
        if value:
            return str(value).strip()
    return None


# ---------------------------------------------------------------------------- apStar


def _check_apstar_grid(hdul: fits.HDUList, path: Path) -> None:
    for header in (hdul[1].header, hdul[0].header):
        crval, cdelt = header.get("CRVAL1"), header.get("CDELT1")
        if crval is not None and cdelt is not None:
            if abs(float(crval) - APSTAR_CRVAL1) > 1e-9 or abs(float(cdelt) - APSTAR_CDELT1) > 1e-12:
                raise SpectrumFormatError(
                    path, f"wavelength grid CRVAL1={crval} CDELT1={cdelt}, expected "
                    f"{APSTAR_CRVAL1}/{APSTAR_CDELT1} (not an apStar grid)")
            return


def read_apstar(path: str | os.PathLike[str]) -> list[Spectrum]:
    """Every spectrum of an apStar file: stacks first, then visits (rest frame)."""
    path = Path(path)
    with open_fits(path) as hdul:
        parts = apstar_parts(hdul, path)
    return apstar_spectra(path, *parts)


def apstar_parts(hdul: fits.HDUList, path: Path) -> tuple[fits.Header, np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`apstar_spectra` needs of an open apStar file (its header and images)."""
    flux, sigma, mask = (_image(hdul, i, name, path) for i, name in _APSTAR_HDUS.items())
    _check_apstar_grid(hdul, path)
    return hdul[0].header, flux, sigma, mask


def apstar_spectra(path: Path, header: fits.Header, flux: np.ndarray, sigma: np.ndarray,
                   mask: np.ndarray) -> list[Spectrum]:
    """The spectra of an apStar file from :func:`apstar_parts` (after the file is closed)."""
    return _apstar(path, header, flux, sigma, mask, arrays=True)


def apstar_meta(path: Path, header: fits.Header, flux: np.ndarray, sigma: np.ndarray,
                mask: np.ndarray) -> list[dict[str, Any]]:
    """The ``meta`` of each spectrum :func:`apstar_spectra` returns, after the same checks of every
    pixel, without building the spectra's arrays (registration keeps only the descriptions)."""
    return _apstar(path, header, flux, sigma, mask, arrays=False)


def _apstar(path: Path, header: fits.Header, flux: np.ndarray, sigma: np.ndarray, mask: np.ndarray,
            arrays: bool) -> list[Any]:
    if flux.ndim > 2:
        raise SpectrumFormatError(path, f"flux has {flux.ndim} dimensions {flux.shape}, an apStar has 1 or 2")
    flux, sigma, mask = (np.atleast_2d(a) for a in (flux, sigma, mask))
    if flux.shape[-1] != APSTAR_NPIX:
        raise SpectrumFormatError(path, f"NAXIS1 is {flux.shape[-1]}, an apStar row has {APSTAR_NPIX} pixels")
    if not (flux.shape == sigma.shape == mask.shape):
        raise SpectrumFormatError(
            path, f"flux {flux.shape}, error {sigma.shape} and mask {mask.shape} differ in shape")
    nvisits = _header_count(header, "NVISITS", path, 1)
    if nvisits < 1:
        raise SpectrumFormatError(path, f"header NVISITS {nvisits} is not a positive number of visits")
    mask = _pixel_mask(mask, path, convert=arrays)
    nrow = flux.shape[0]
    if nvisits > 1 and nrow != nvisits + 2:
        raise SpectrumFormatError(path, f"{nrow} rows for NVISITS={nvisits} (expected {nvisits + 2})")
    rows = [0] if nvisits == 1 else list(range(nrow))
    common = {"frame": "rest", "format": "apStar", "path": str(path), "nvisits": nvisits,
              "source_id": _source_id(header), "telescope": header.get("TELESCOP"),
              "ra": _header_float(header, "RA"), "dec": _header_float(header, "DEC")}
    # checked for all rows at once (the row-by-row checks name a failing row); converted only
    # for spectra (the checks read the stored values alike)
    used = slice(0, 1) if nvisits == 1 else slice(None)
    fluxes, sigmas = (a[used].astype(float) if arrays else _as_stored(a[used]) for a in (flux, sigma))
    good = _good_if_clean(fluxes, sigmas)
    ivars = None if good is None or not arrays else _inverse_square(sigmas, good)
    wavelength = apstar_wavelength() if arrays else None
    spectra = []
    for row in rows:
        f = fluxes[row]
        if good is None:
            if not np.any(np.isfinite(f) & (f != 0)):
                raise SpectrumFormatError(path, f"all-NaN (or inf, or empty) flux in row {row}")
            ivar = _ivar_checked(f, sigmas[row], path, f"row {row}")
        else:
            ivar = ivars[row] if arrays else None
        meta: dict[str, Any] = dict(common, index=row)
        if nvisits == 1 or row < 2:
            meta.update(kind="stack", snr=_header_float(header, "SNR"))
        else:
            visit = row - 1
            jd = _header_float(header, f"JD{visit}")
            meta.update(kind="visit", snr=_header_float(header, f"SNRVIS{visit}"), jd=jd,
                        mjd=None if jd is None else int(jd - _MJD_ZERO),
                        bc=_header_float(header, f"BC{visit}"),
                        fiber=header.get(f"FIBER{visit}"), sfile=header.get(f"SFILE{visit}"))
        spectra.append(Spectrum(wavelength, f, ivar, mask[row], meta) if arrays else meta)
    return spectra


def _as_stored(a: np.ndarray) -> np.ndarray:
    """The values for checks only: a float image at its stored precision in native byte order
    (finiteness, sign and zero read the same as in float64; one byte-swapping copy costs less
    than swapping in every check), any other converted to float64."""
    return a.astype(a.dtype.newbyteorder("=")) if a.dtype.kind == "f" else a.astype(float)


def write_apstar(
    path: str | os.PathLike[str],
    flux: np.ndarray,
    sigma: np.ndarray,
    pixel_flags: np.ndarray,
    header: Mapping[str, Any],
) -> None:
    """Write an apStar-layout file (HDUs 0-3) atomically; byte-identical for identical inputs."""
    flux, sigma, pixel_flags = (np.atleast_2d(np.asarray(a)) for a in (flux, sigma, pixel_flags))
    if flux.shape[-1] != APSTAR_NPIX or not (flux.shape == sigma.shape == pixel_flags.shape):
        raise ValueError(f"apStar arrays must share a shape (nrow, {APSTAR_NPIX}); got "
                         f"{flux.shape}, {sigma.shape}, {pixel_flags.shape}")
    primary = fits.PrimaryHDU()
    wcs = {"CRVAL1": (APSTAR_CRVAL1, "Start log10(wavelength)"),
           "CDELT1": (APSTAR_CDELT1, "Dispersion in log10(wavelength)"),
           "CRPIX1": (1, "Pixel of starting wavelength"),
           "CTYPE1": ("LOG-LINEAR", "Logarithmic wavelength scale"),
           "DC-FLAG": (1, "Logarithmic wavelength scale"), "NWAVE": (APSTAR_NPIX, "Number of wavelengths")}
    _set_cards(primary.header, wcs)
    _set_cards(primary.header, header)
    hdus = [primary]
    for data, bunit in ((flux.astype(np.float64), "Flux (10^-17 erg/s/cm^2/Ang)"),
                        (sigma.astype(np.float64), "Flux error (10^-17 erg/s/cm^2/Ang)"),
                        (pixel_flags.astype(np.int64), "APOGEE_PIXMASK")):
        hdu = fits.ImageHDU(data)
        for key, value in wcs.items():
            hdu.header[key] = value
        hdu.header["BUNIT"] = bunit
        hdus.append(hdu)
    _write_atomic(fits.HDUList(hdus), Path(path))


# ---------------------------------------------------------------------------- apVisit


def read_apvisit(path: str | os.PathLike[str]) -> Spectrum:
    """An apVisit spectrum in the observed frame, chips concatenated in ascending wavelength."""
    path = Path(path)
    with open_fits(path) as hdul:
        parts = apvisit_parts(hdul, path)
    return apvisit_spectrum(path, *parts)


def apvisit_parts(hdul: fits.HDUList, path: Path) -> tuple[fits.Header, np.ndarray, np.ndarray, np.ndarray,
                                                           np.ndarray]:
    """What :func:`apvisit_spectrum` needs of an open apVisit file (its header and images)."""
    flux, sigma, mask, wave = (_image(hdul, i, name, path) for i, name in _APVISIT_HDUS.items())
    return hdul[0].header, flux, sigma, mask, wave


def apvisit_spectrum(path: Path, header: fits.Header, flux: np.ndarray, sigma: np.ndarray, mask: np.ndarray,
                     wave: np.ndarray) -> Spectrum:
    """The spectrum of an apVisit file from :func:`apvisit_parts` (after the file is closed)."""
    return _apvisit(path, header, flux, sigma, mask, wave, arrays=True)


def apvisit_meta(path: Path, header: fits.Header, flux: np.ndarray, sigma: np.ndarray, mask: np.ndarray,
                 wave: np.ndarray) -> dict[str, Any]:
    """The ``meta`` of :func:`apvisit_spectrum`'s spectrum, after the same checks of every pixel,
    without building the spectrum's arrays."""
    return _apvisit(path, header, flux, sigma, mask, wave, arrays=False)


def _apvisit(path: Path, header: fits.Header, flux: np.ndarray, sigma: np.ndarray, mask: np.ndarray,
             wave: np.ndarray, arrays: bool) -> Any:
    shapes = {a.shape for a in (flux, sigma, mask, wave)}
    if len(shapes) != 1:
        raise SpectrumFormatError(
            path, f"flux, error, mask and wavelength differ in shape: {sorted(shapes)}")
    if flux.ndim != 2 or flux.shape[0] != 3 or flux.shape[1] not in (2048, 4096):
        raise SpectrumFormatError(
            path, f"NAXIS1/NAXIS2 are {flux.shape[::-1]}, an apVisit has 4096 (or 2048) x 3")
    mask = _pixel_mask(mask, path, convert=arrays)
    # chips ordered (blue, green, red), each in ascending wavelength, checked in that order
    # (an integer image is converted first: its differences would wrap around; for spectra, to
    # native float64 once, as big-endian arithmetic costs a byte swap per operation)
    wave = wave.astype(float) if arrays else _as_stored(wave)
    with np.errstate(invalid="ignore"):
        step = np.diff(wave, axis=1)
        monotonic = np.isfinite(wave).all(axis=1) & (np.all(step < 0, axis=1) | np.all(step > 0, axis=1))
        # a finite monotonic row's smallest value is at one of its ends
        low = np.minimum(wave[:, 0], wave[:, -1]) if monotonic.all() else np.nanmin(wave, axis=1)
        order = np.argsort(low)
    for chip in order:
        if not monotonic[chip]:
            raise SpectrumFormatError(path, f"wavelength of chip row {chip} is not monotonic and finite")
    npix = wave.shape[1]
    slices = [(i * npix, (i + 1) * npix) for i in range(len(order))]
    descending = step[:, 0] < 0
    if not arrays:
        # the checks below read the pixels in any order: no copy for them
        flux_all, sigma_all = _as_stored(flux).ravel(), _as_stored(sigma).ravel()
    elif list(order) == [2, 1, 0] and descending.all():
        # DR17's own layout (row 0 red, wavelength decreasing): the whole image read backwards,
        # converted in one copy per array
        pick = slice(None, None, -1)
        w, flux_all, sigma_all, m = (np.ascontiguousarray(a.ravel()[pick], dtype=dtype) for a, dtype in
                                     ((wave, float), (flux, float), (sigma, float), (mask, np.int64)))
    else:
        rows = [np.arange(chip * npix, (chip + 1) * npix)[::-1 if descending[chip] else 1] for chip in order]
        pick = np.concatenate(rows)
        w, flux_all, sigma_all, m = (a.ravel()[pick].astype(dtype) for a, dtype in
                                     ((wave, float), (flux, float), (sigma, float), (mask, np.int64)))
    good = _good_if_clean(flux_all, sigma_all)
    if good is None:
        if not np.any(np.isfinite(flux_all) & (flux_all != 0)):
            raise SpectrumFormatError(path, "all-NaN (or empty) flux")
        ivar = _ivar_checked(flux_all, sigma_all, path, "the visit")
    else:
        ivar = _inverse_square(sigma_all, good) if arrays else None
    jd = _header_float(header, "JD-MID")
    mjd = _header_count(header, "MJD5", path, None)
    meta = {"frame": "observed", "kind": "visit", "format": "apVisit", "path": str(path), "index": 0,
            "snr": _header_float(header, "SNR"), "jd": jd,
            "mjd": int(mjd) if mjd is not None else (None if jd is None else int(jd - _MJD_ZERO)),
            "bc": _header_float(header, "BC"), "telescope": header.get("TELESCOP"),
            "fiber": header.get("FIBERID"), "ra": _header_float(header, "RA"),
            "dec": _header_float(header, "DEC"), "source_id": _source_id(header),
            "chip_slices": slices}
    return Spectrum(w, flux_all, ivar, m, meta) if arrays else meta


def write_apvisit(
    path: str | os.PathLike[str],
    wavelength: np.ndarray,
    flux: np.ndarray,
    sigma: np.ndarray,
    pixel_flags: np.ndarray,
    header: Mapping[str, Any],
) -> None:
    """Write an apVisit-layout file (HDUs 0-4; arrays (3, 4096), row 0 red, wavelength decreasing)."""
    arrays = [np.asarray(a) for a in (flux, sigma, pixel_flags, wavelength)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 2 or arrays[0].shape[0] != 3:
        raise ValueError(f"apVisit arrays must share a shape (3, npix); got {[a.shape for a in arrays]}")
    primary = fits.PrimaryHDU()
    _set_cards(primary.header, header)
    hdus = [primary]
    for data, dtype, bunit in ((arrays[0], np.float32, "Flux (10^-17 erg/s/cm^2/Ang)"),
                               (arrays[1], np.float32, "Flux error (10^-17 erg/s/cm^2/Ang)"),
                               (arrays[2], np.int16, "APOGEE_PIXMASK"),
                               (arrays[3], np.float64, "Wavelength (Angstrom, vacuum)")):
        hdu = fits.ImageHDU(data.astype(dtype))
        hdu.header["BUNIT"] = bunit
        hdus.append(hdu)
    _write_atomic(fits.HDUList(hdus), Path(path))


# ---------------------------------------------------------------------------- shared


def _set_cards(header: fits.Header, cards: Mapping[str, Any]) -> None:
    # DR17 files name the object OBJID; APOGEE_ID (9 characters) would need a HIERARCH card.
    for key, value in cards.items():
        header["OBJID" if key == "APOGEE_ID" else key] = value


def _write_atomic(hdul: fits.HDUList, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    hdul.writeto(tmp, overwrite=True, output_verify="exception")
    tmp.replace(path)


def read_header_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What registration needs, from headers only (no pixel data is read)."""
    path = Path(path)
    with open_fits(path) as hdul:
        header = hdul[0].header
        if len(hdul) < 2:
            raise SpectrumFormatError(path, "HDU 1 (flux) missing")
        shape = (hdul[1].header.get("NAXIS2", 1), hdul[1].header.get("NAXIS1"))
    is_visit = "JD-MID" in header or (shape[0] == 3 and shape[1] in (2048, 4096) and "NVISITS" not in header)
    if is_visit:
        return {"format": "apVisit", "source_id": _source_id(header), "rows": 1, "kinds": ["visit"],
                "snr": [_header_float(header, "SNR")], "mjd": [header.get("MJD5")],
                "telescope": header.get("TELESCOP")}
    nvisits = int(header.get("NVISITS", 1) or 1)
    kinds = ["stack"] if nvisits == 1 else ["stack", "stack"] + ["visit"] * nvisits
    snr = [_header_float(header, "SNR")] * (1 if nvisits == 1 else 2)
    snr += [_header_float(header, f"SNRVIS{v}") for v in range(1, nvisits + 1)] if nvisits > 1 else []
    jds = [_header_float(header, f"JD{v}") for v in range(1, nvisits + 1)]
    return {"format": "apStar", "source_id": _source_id(header), "rows": len(kinds), "kinds": kinds,
            "snr": snr, "nvisits": nvisits, "telescope": header.get("TELESCOP"),
            "mjd": [None if jd is None else int(jd - _MJD_ZERO) for jd in jds]}


def drp_radial_velocity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The data-reduction pipeline's own RV values in the header (for comparisons only)."""
    with open_fits(path) as hdul:
        header = hdul[0].header
        values = {k.lower(): _header_float(header, k) for k in _DRP_RV_KEYS if k in header}
        nvisits = int(header.get("NVISITS", 0) or 0)
        for v in range(1, nvisits + 1):
            for key in (f"VHELIO{v}", f"VRAD{v}", f"VERR{v}"):
                if key in header:
                    values[key.lower()] = _header_float(header, key)
    return values
