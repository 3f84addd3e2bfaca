"""Read any supported spectrum file: the format is told from the file's HDUs and headers."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from astra_dagster.spectra import apogee
from astra_dagster.spectra.apogee import open_fits
from astra_dagster.spectra.errors import SpectrumFormatError
from astra_dagster.spectra.plain_fits import read_plain_images
from astra_dagster.spectra.spectrum import Spectrum

#: The HDUs the APOGEE readers take images from (primary + 4 for apVisit, + 3 for apStar): a
#: table among them is a file for astropy (its checks say "a table, not an image").
_APVISIT_IMAGES = 5


def detect_format(path: str | os.PathLike[str]) -> str:
    """'apStar', 'apVisit', 'mwmStar', 'mwmVisit' or 'specLite', from the headers."""
    path = Path(path)
    with open_fits(path) as hdul:
        return format_of(hdul, path)


def format_of(hdul: Any, path: Path) -> str:
    """:func:`detect_format` of a file already open (an astropy HDUList)."""
    primary = hdul[0].header
    first = hdul[1] if len(hdul) > 1 else None
    if first is None:
        raise SpectrumFormatError(path, "only a primary HDU: no spectrum in it")
    columns = [c.lower() for c in first.columns.names] if hasattr(first, "columns") else []
    if "loglam" in columns and "flux" in columns:
        return "specLite"
    if columns and {"flux", "ivar"} <= set(columns):
        kind = str(primary.get("ASTRA_FT", primary.get("FILETYPE", ""))).lower()
        return "mwmVisit" if "visit" in kind or "in_stack" in columns else "mwmStar"
    shape = first.header.get("NAXIS2", 1), first.header.get("NAXIS1")
    if len(hdul) >= 5 and shape[0] == 3 and shape[1] in (2048, 4096) and "NVISITS" not in primary:
        return "apVisit"
    log_linear = "LOG-LINEAR" in (first.header.get("CTYPE1"), primary.get("CTYPE1"))
    if "NVISITS" in primary or log_linear:
        return "apStar"
    raise SpectrumFormatError(
        path, "unknown spectrum format (not apStar, apVisit, mwmStar/Visit or spec-lite)")


def read_spectra(path: str | os.PathLike[str], expected_format: str | None = None,
                 data: bytes | None = None, *, plain_reader: bool = True) -> list[Spectrum]:
    """Every spectrum in the file, whatever its (supported) format.

    ``expected_format`` (the manifest's): a file of another format is refused; one whose format
    cannot be told is read as that format, so its error says what it lacks (a missing HDU, a
    wrong shape) rather than only "unknown format". ``data``: the file's bytes, when the caller
    has read them already (to hash them): parsed from memory instead of read again, by
    :mod:`~astra_dagster.spectra.plain_fits` where that reader understands the whole file
    (``plain_reader=False``: by astropy always; the same spectra, for comparisons).
    """
    return _read(path, expected_format, data, plain_reader, arrays=True)


def read_spectra_meta(path: str | os.PathLike[str], expected_format: str | None = None,
                      data: bytes | None = None, *, plain_reader: bool = True) -> list[dict[str, Any]]:
    """The ``meta`` of every spectrum :func:`read_spectra` returns, after the same checks of the
    file, its headers and every pixel, and with the same errors: what registering a file needs.
    apStar and apVisit files skip building the spectra's float64 arrays and inverse variances,
    most of their cost after reading and hashing."""
    return _read(path, expected_format, data, plain_reader, arrays=False)


def _read(path: str | os.PathLike[str], expected_format: str | None, data: bytes | None,
          plain_reader: bool, arrays: bool) -> list[Any]:
    from astropy.io.fits.verify import VerifyError

    try:
        return _read_spectra(Path(path), expected_format, data, plain_reader, arrays)
    except VerifyError as exc:
        # astropy parses a card only when it is read: a control character in a header value
        # surfaces here, after the file opened fine.
        raise SpectrumFormatError(path, f"unparsable header ({str(exc).splitlines()[0]})") from None


def _read_spectra(path: Path, expected_format: str | None, data: bytes | None,
                  plain_reader: bool, arrays: bool) -> list[Any]:
    # One open for the format and the APOGEE readers' images (header parsing, not the I/O, is
    # most of a file's cost); the reader's checks run after the file is closed, as alone.
    plain = read_plain_images(data, _APVISIT_IMAGES) if plain_reader and data is not None else None
    with nullcontext(plain) if plain is not None else open_fits(path, data) as hdul:
        try:
            fmt = format_of(hdul, path)
        except SpectrumFormatError as exc:
            if expected_format is None or not exc.problem.startswith("unknown spectrum format"):
                raise
            fmt = expected_format
        if expected_format is not None and fmt != expected_format:
            raise SpectrumFormatError(path, f"holds an {fmt} file but the manifest says {expected_format}")
        if fmt == "apStar":
            star = apogee.apstar_parts(hdul, path)
        elif fmt == "apVisit":
            visit = apogee.apvisit_parts(hdul, path)
    if fmt == "apStar":
        return apogee.apstar_spectra(path, *star) if arrays else apogee.apstar_meta(path, *star)
    if fmt == "apVisit":
        return [apogee.apvisit_spectrum(path, *visit) if arrays else apogee.apvisit_meta(path, *visit)]
    if fmt in ("mwmStar", "mwmVisit"):
        from astra_dagster.spectra.mwm import read_mwm

        spectra = read_mwm(path)
    else:
        from astra_dagster.spectra.boss import read_spec_lite

        spectra = [read_spec_lite(path)]
    return spectra if arrays else [spectrum.meta for spectrum in spectra]
