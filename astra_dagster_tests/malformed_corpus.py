"""A corpus of malformed inputs, built at test time into one release folder with a manifest.

Every case is one source whose file is derived from a good apStar or apVisit whose OBJID is the
case's own source id, so the case gets past the "holds source X, not Y" check and reaches the
check it is about. Each case carries the phrase its source's error must contain. A few good
sources ride along to show the batch goes on.

Manifest-level faults that registration refuses by design (path traversal, duplicated ids...)
are in :data:`REFUSED_MANIFESTS`: each makes a release of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from astropy.io import fits

from astra_dagster.spectra.apogee import write_apstar, write_apvisit
from astra_dagster.spectra.manifest import ReleaseFile, ReleaseSource, file_entry, write_manifest
from astra_dagster_tests import fixtures_bad_fits as fx

#: Writes a case's files for ``source_id`` under the release folder; returns its manifest entries.
Builder = Callable[[Path, str], list[ReleaseFile]]


@dataclass(frozen=True)
class Case:
    name: str
    expected: str  # a phrase of this case's own check: a generic error does not contain it
    build: Builder


GOOD_IDS = [f"2M0000000{i}+0000000" for i in range(1, 4)]
BLOCK = 2880  # a FITS record


def source_id(n: int) -> str:
    return f"2M0910{n:04d}+0000000"


# ------------------------------------------------------------------------------------- helpers


def _star_path(release: Path, sid: str) -> Path:
    path = release / "apStar" / f"apStar-{sid}.fits"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _visit_path(release: Path, sid: str) -> Path:
    path = release / "apVisit" / f"apVisit-{sid}-59001.fits"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _entry(release: Path, path: Path, fmt: str = "apStar") -> list[ReleaseFile]:
    return [file_entry(release, path, fmt)]


def star(change: Callable[[np.ndarray, np.ndarray, np.ndarray, dict], None]) -> Builder:
    """A good 2-visit apStar of the source with its arrays/header changed before writing."""
    def build(release: Path, sid: str) -> list[ReleaseFile]:
        flux, sigma, mask, header = fx.apstar_arrays(2)
        header["OBJID"] = sid
        change(flux, sigma, mask, header)
        path = _star_path(release, sid)
        write_apstar(path, flux, sigma, mask, header)
        return _entry(release, path)
    return build


def visit(change: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict], None]) -> Builder:
    """A good apVisit of the source with its arrays/header changed before writing."""
    def build(release: Path, sid: str) -> list[ReleaseFile]:
        wave, flux, sigma, mask, header = fx.apvisit_arrays()
        header["OBJID"] = sid
        change(wave, flux, sigma, mask, header)
        path = _visit_path(release, sid)
        write_apvisit(path, wave, flux, sigma, mask, header)
        return _entry(release, path, "apVisit")
    return build


def hdus(edit: Callable[[fits.HDUList], fits.HDUList | None], fmt: str = "apStar") -> Builder:
    """A good file of the source, its HDUs edited with astropy (which writes what we ask)."""
    def build(release: Path, sid: str) -> list[ReleaseFile]:
        if fmt == "apStar":
            path = fx.write_good_apstar(_star_path(release, sid), 2, sid)
        else:
            path = fx.write_good_apvisit(_visit_path(release, sid), sid)
        with fits.open(path) as hdul:
            hdul.readall()
            out = edit(hdul) or hdul
            out.writeto(path, overwrite=True, output_verify="ignore")
        return _entry(release, path, fmt)
    return build


def raw(edit: Callable[[bytes], bytes], fmt: str = "apStar") -> Builder:
    """A good file of the source, its bytes edited (what astropy would refuse to write)."""
    def build(release: Path, sid: str) -> list[ReleaseFile]:
        if fmt == "apStar":
            path = fx.write_good_apstar(_star_path(release, sid), 2, sid)
        else:
            path = fx.write_good_apvisit(_visit_path(release, sid), sid)
        path.write_bytes(edit(path.read_bytes()))
        return _entry(release, path, fmt)
    return build


def card(data: bytes, keyword: str, value: str, hdu: int = 0) -> bytes:
    """Replace the value of header card ``keyword`` in HDU ``hdu`` (value columns 11-80)."""
    start = 0
    for _ in range(hdu + 1):
        at = data.index(keyword.ljust(8).encode() + b"= ", start)
        start = at + 80
    new = value.encode().ljust(70)[:70]
    return data[:at + 10] + new + data[at + 80:]


def _drop_last_end(data: bytes) -> bytes:
    """The last header's END card blanked: that header never ends."""
    at = data.rindex(b"END" + b" " * 77)
    return data[:at] + b" " * 80 + data[at + 80:]


def bytes_of(content: bytes) -> Builder:
    """A file of the source holding ``content`` only (OBJID cannot matter: nothing is readable)."""
    def build(release: Path, sid: str) -> list[ReleaseFile]:
        path = _star_path(release, sid)
        path.write_bytes(content)
        return _entry(release, path)
    return build


def entries(change: Callable[[Path, list[ReleaseFile]], list[ReleaseFile]], base: Builder | None = None
            ) -> Builder:
    """A good file of the source whose manifest entries (or file, afterwards) are changed."""
    def build(release: Path, sid: str) -> list[ReleaseFile]:
        made = (base or star(lambda *a: None))(release, sid)
        return change(release, made)
    return build


# ----------------------------------------------------------------------------- array changes


def _set(name: str, value: object) -> Callable[..., None]:
    def change(*arrays_and_header) -> None:
        arrays_and_header[-1][name] = value
    return change


def _rows(n: int) -> Callable[[fits.HDUList], fits.HDUList]:
    def edit(hdul: fits.HDUList) -> fits.HDUList:
        return fits.HDUList([h.copy() for h in hdul[:n]])
    return edit


def _replace_hdu(index: int, make: Callable[[fits.HDUList], fits.hdu.base.ExtensionHDU]
                 ) -> Callable[[fits.HDUList], fits.HDUList]:
    def edit(hdul: fits.HDUList) -> fits.HDUList:
        out = [h.copy() for h in hdul]
        out[index] = make(hdul)
        return fits.HDUList(out)
    return edit


def _huge_claim(naxis: dict[str, int]) -> Builder:
    """HDU 1's header claims an absurdly large array; the data is the good file's (truncated)."""
    def edit(data: bytes) -> bytes:
        for key, value in naxis.items():
            data = card(data, key, f"{value:>20}", hdu=1)
        return data
    return raw(edit)


def _symlink_outside(release: Path, sid: str) -> list[ReleaseFile]:
    outside = release.parent / f"outside-{sid}.fits"
    fx.write_good_apstar(outside, 2, sid)
    path = _star_path(release, sid)
    os.symlink(outside, path)
    return _entry(release, path)


def _directory(release: Path, sid: str) -> list[ReleaseFile]:
    path = _star_path(release, sid)
    path.mkdir()
    return [ReleaseFile(str(path.relative_to(release)), "apStar", "0" * 64, 0)]


def _missing(release: Path, made: list[ReleaseFile]) -> list[ReleaseFile]:
    (release / made[0].path).unlink()
    return made


def _other_format(release: Path, sid: str) -> list[ReleaseFile]:
    path = fx.write_good_apstar(_star_path(release, sid), 2, sid)
    return _entry(release, path, "apVisit")


def _nan(a: np.ndarray, where: tuple) -> None:
    a[where] = np.nan


def _fill(a: np.ndarray, value: float) -> None:
    a[...] = value


CASES: list[Case] = [
    # --- bytes that are not (all of) a FITS file
    Case("empty-file", "empty file (0 bytes)", bytes_of(b"")),
    Case("text-not-fits", "No SIMPLE card found", bytes_of(b"this is not a FITS file\n" * 200)),
    Case("random-bytes", "No SIMPLE card found",
         bytes_of(np.random.default_rng(1).bytes(3 * BLOCK))),
    Case("zero-bytes", "No SIMPLE card found", bytes_of(bytes(3 * BLOCK))),
    Case("html-error-page", "No SIMPLE card found",
         bytes_of(b"<html><body>502 Bad Gateway</body></html>\n")),
    Case("truncated-half", "truncated", raw(lambda d: d[:len(d) // 2])),
    Case("truncated-in-header", "truncated: 1000 bytes is not a whole number", raw(lambda d: d[:1000])),
    Case("truncated-last-record", "truncated", raw(lambda d: d[:-BLOCK])),
    Case("truncated-one-byte", "truncated", raw(lambda d: d[:-1])),
    Case("no-end-card", "null bytes instead of spaces", raw(_drop_last_end)),
    Case("bitpix-invalid", "non-ASCII characters", raw(lambda d: card(d, "BITPIX", f"{7:>20}", hdu=1))),
    Case("naxis1-negative", "non-ASCII characters", raw(lambda d: card(d, "NAXIS1", f"{-8575:>20}", hdu=1))),
    # --- HDUs missing or of the wrong kind
    Case("primary-only", "only a primary HDU", hdus(_rows(1))),
    Case("missing-error-and-mask", "HDU 2 (flux error) missing", hdus(_rows(2))),
    Case("missing-mask", "HDU 3 (pixel mask) missing", hdus(_rows(3))),
    Case("empty-flux-hdu", "HDU 1 (flux) missing", hdus(_replace_hdu(1, lambda h: fits.ImageHDU(
        header=fits.Header([("CTYPE1", "LOG-LINEAR")]))))),
    Case("flux-hdu-is-a-table", "HDU 1 (flux) is a table", hdus(_replace_hdu(1, lambda h: fits.BinTableHDU.from_columns(
        [fits.Column("x", "E", array=np.arange(5.0))])))),
    Case("mask-is-float-with-nan", "value(s) that are not bit flags", hdus(_replace_hdu(
        3, lambda h: fits.ImageHDU(np.full(h[3].data.shape, np.nan), header=h[3].header)))),
    # --- wrong lengths and dimensions
    Case("wrong-naxis1", "NAXIS1 is 8000", hdus(lambda h: fits.HDUList(
        [h[0].copy()] + [fits.ImageHDU(x.data[:, :8000]) for x in h[1:]]))),
    Case("error-shape-differs", "differ in shape", hdus(_replace_hdu(2, lambda h: fits.ImageHDU(
        h[2].data[:2], header=h[2].header)))),
    Case("mask-shape-differs", "differ in shape", hdus(_replace_hdu(3, lambda h: fits.ImageHDU(
        h[3].data[:3], header=h[3].header)))),
    Case("rows-do-not-match-nvisits", "rows for NVISITS=5", star(_set("NVISITS", 5))),
    Case("three-dimensional-flux", "flux has 3 dimensions", hdus(lambda h: fits.HDUList(
        [h[0].copy()] + [fits.ImageHDU(np.stack([x.data, x.data]), header=x.header) for x in h[1:]]))),
    Case("one-pixel-rows", "NAXIS1 is 1", hdus(lambda h: fits.HDUList(
        [h[0].copy()] + [fits.ImageHDU(x.data[:, :1]) for x in h[1:]]))),
    # --- huge arrays: headers claiming absurd sizes, refused before any allocation
    Case("huge-naxis2-claim", "HDU 2 claims 8575 x 1000000000 pixels (at most", _huge_claim({"NAXIS2": 10**9})),
    Case("huge-naxis1-claim", "HDU 2 claims 1099511627776 x 4 pixels (at most", _huge_claim({"NAXIS1": 2**40})),
    Case("nvisits-absurd", "NVISITS=1000000000", star(_set("NVISITS", 10**9))),
    # --- NaN / inf flux, zero / negative / NaN flux errors
    Case("all-nan-flux", "all-NaN", star(lambda f, s, m, h: _fill(f, np.nan))),
    Case("all-zero-flux", "all-NaN (or inf, or empty) flux in row 0", star(lambda f, s, m, h: _fill(f, 0.0))),
    Case("all-inf-flux", "all-NaN (or inf, or empty) flux", star(lambda f, s, m, h: _fill(f, np.inf))),
    Case("nan-flux-pixels", "non-finite flux (NaN or inf) at 60 pixel(s) of row 0", star(lambda f, s, m, h: _nan(f, (slice(None), slice(200, 260))))),
    Case("inf-flux-pixel", "non-finite flux (NaN or inf) at 1 pixel(s) of row 1", star(lambda f, s, m, h: f.__setitem__((1, 300), np.inf))),
    Case("minus-inf-flux-pixel", "non-finite flux (NaN or inf) at 1 pixel(s) of row 3", star(lambda f, s, m, h: f.__setitem__((3, 400), -np.inf))),
    Case("negative-sigma", "negative flux error", star(lambda f, s, m, h: s.__setitem__((2, slice(500, 520)), -1.0))),
    Case("all-negative-sigma", "negative flux error", star(lambda f, s, m, h: _fill(s, -5.0))),
    Case("zero-sigma-everywhere", "no pixel with a positive finite flux error",
         star(lambda f, s, m, h: _fill(s, 0.0))),
    Case("inf-sigma-everywhere", "no pixel with a positive finite flux error",
         star(lambda f, s, m, h: _fill(s, np.inf))),
    Case("nan-sigma-everywhere", "non-finite flux error (NaN) at 8575 pixel(s)",
         star(lambda f, s, m, h: _fill(s, np.nan))),
    Case("zero-sigma-one-row", "no pixel with a positive finite flux error in row 3",
         star(lambda f, s, m, h: s.__setitem__(3, 0.0))),
    Case("nan-sigma-pixels", "non-finite flux error (NaN) at 10 pixel(s)", star(lambda f, s, m, h: _nan(s, (0, slice(10, 20))))),
    # --- absurd headers
    Case("wrong-crval1", "wavelength grid CRVAL1=", hdus(lambda h: h[1].header.__setitem__("CRVAL1", 4.2))),
    Case("wrong-cdelt1", "CDELT1=0.0001", hdus(lambda h: h[1].header.__setitem__("CDELT1", 1e-4))),
    Case("nvisits-negative", "header NVISITS -3 is not a positive number", star(_set("NVISITS", -3))),
    Case("nvisits-not-a-number", "header NVISITS 'two' is not a whole number", star(_set("NVISITS", "two"))),
    Case("nvisits-fractional", "header NVISITS 2.5 is not a whole number", star(_set("NVISITS", 2.5))),
    Case("objid-of-another-source", "holds source 2M55555555+5555555, not",
         star(_set("OBJID", "2M55555555+5555555"))),
    Case("objid-control-character", "Unparsable card (OBJID)",
         raw(lambda d: d.replace(b"+0000000'", b"+000000\x07'", 1))),
    Case("telescop-overlong", "header TELESCOP is 300 characters long", star(_set("TELESCOP", "t" * 300))),
    Case("telescop-escape", "Unparsable card (TELESCOP)", raw(lambda d: d.replace(b"'apo25m  '", b"'ap\x1bo25m '", 1))),
    Case("snr-overflows-real", "header snr 1e+300 is outside", star(_set("SNR", 1e300))),
    Case("snr-nan", "Unparsable card (SNR)", raw(lambda d: card(d, "SNR", f"{'NAN':>20}"))),
    Case("jd-absurd", "header mjd 1000000000000000019884624838656 is outside", star(_set("JD1", 1e30))),
    Case("fiber-absurd", "header fiber 1000000000000 is outside", star(_set("FIBER1", 10**12))),
    # --- apVisit files
    Case("apvisit-truncated", "truncated", raw(lambda d: d[:len(d) // 2], "apVisit")),
    Case("apvisit-missing-wavelength", "HDU 4 (wavelength) missing", hdus(_rows(4), "apVisit")),
    Case("apvisit-two-chips", "NAXIS1/NAXIS2 are (4096, 2), an apVisit has", hdus(lambda h: fits.HDUList(
        [h[0].copy()] + [fits.ImageHDU(x.data[:2], header=x.header) for x in h[1:]]), "apVisit")),
    Case("apvisit-wavelength-not-monotonic", "not monotonic",
         visit(lambda w, f, s, m, h: w.__setitem__((1, 100), w[1, 50]))),
    Case("apvisit-nan-wavelength", "not monotonic and finite",
         visit(lambda w, f, s, m, h: w.__setitem__((2, 7), np.nan))),
    Case("apvisit-all-nan-flux", "all-NaN", visit(lambda w, f, s, m, h: _fill(f, np.nan))),
    Case("apvisit-nan-flux-pixels", "non-finite flux (NaN or inf) at 9 pixel(s)", visit(lambda w, f, s, m, h: _nan(f, (0, slice(0, 9))))),
    Case("apvisit-negative-sigma", "negative flux error", visit(lambda w, f, s, m, h: s.__setitem__((1, 5), -2.0))),
    Case("apvisit-zero-sigma", "no pixel with a positive finite flux error",
         visit(lambda w, f, s, m, h: _fill(s, 0.0))),
    Case("apvisit-error-shape-differs", "differ in shape", hdus(_replace_hdu(2, lambda h: fits.ImageHDU(
        h[2].data[:, :2048], header=h[2].header)), "apVisit")),
    Case("apvisit-mjd-not-a-number", "header MJD5 'soon' is not a whole number", visit(_set("MJD5", "soon"))),
    Case("apvisit-fiber-absurd", "header fiber 1000000000000 is outside", visit(_set("FIBERID", 10**12))),
    # --- the manifest and the file disagree (found when the source's files are read)
    Case("wrong-sha256", "content differs from the manifest",
         entries(lambda r, m: [replace(m[0], sha256="f" * 64)])),
    Case("wrong-size", "content differs from the manifest", entries(lambda r, m: [replace(m[0], size=m[0].size + 1)])),
    Case("missing-file", "listed in the manifest but missing", entries(_missing)),
    Case("no-files", "lists no files for this source", entries(lambda r, m: [])),
    Case("file-is-a-directory", "listed in the manifest but not a regular file", _directory),
    Case("symlink-outside-release", "resolves outside the release folder", _symlink_outside),
    Case("format-differs-from-manifest", "holds an apStar file but the manifest says apVisit", _other_format),
]


@dataclass(frozen=True)
class Corpus:
    release: Path
    #: source id -> case
    cases: dict[str, Case]
    good: list[str]
    #: spectra each good source holds
    good_rows: int


def build_corpus(root: Path, name: str = "corpus") -> Corpus:
    """The release folder ``root/name``: every case of :data:`CASES` plus :data:`GOOD_IDS`."""
    release = root / name
    release.mkdir(parents=True)
    sources = []
    for n, sid in enumerate(GOOD_IDS):
        files = [file_entry(release, fx.write_good_apstar(_star_path(release, sid), 2, sid, n), "apStar"),
                 file_entry(release, fx.write_good_apvisit(_visit_path(release, sid), sid, n), "apVisit")]
        sources.append(ReleaseSource(sid, tuple(files), ra=float(n), dec=0.0))
    cases = {}
    for n, case in enumerate(CASES, start=1):
        sid = source_id(n)
        cases[sid] = case
        sources.append(ReleaseSource(sid, tuple(case.build(release, sid))))
    write_manifest(release, name, sources, seed=0)
    return Corpus(release, cases, list(GOOD_IDS), good_rows=5)  # 2 stacks + 2 visits + 1 apVisit


# ------------------------------------------------------------------ refused at registration


def _payload(name: str, files: list[dict], extra_sources: list[dict] | None = None) -> dict:
    return {"format": "astra-release/1", "release": name, "sources": [
        {"source_id": "2M00000001+0000000", "files": files}] + (extra_sources or [])}


def _file(path: str, fmt: str = "apStar", size: int = 1) -> dict:
    return {"path": path, "format": fmt, "sha256": "0" * 64, "size": size}


#: name -> (manifest payload, phrase of the one-line refusal)
REFUSED_MANIFESTS: dict[str, tuple[dict, str]] = {
    "path-traversal": (_payload("t1", [_file("../../etc/passwd")]), "must be relative to the release folder"),
    "path-traversal-inside": (_payload("t2", [_file("apStar/../../x.fits")]),
                              "must be relative to the release folder"),
    "absolute-path": (_payload("t3", [_file("/etc/passwd")]), "must be relative to the release folder"),
    "duplicated-source-id": (_payload("t4", [_file("apStar/a.fits")], [
        {"source_id": "2M00000001+0000000", "files": [_file("apStar/b.fits")]}]), "listed twice"),
    "duplicated-file-in-source": (_payload("t5", [_file("apStar/a.fits"), _file("apStar/a.fits")]),
                                  "apStar/a.fits listed twice"),
    "file-in-two-sources": (_payload("t6", [_file("apStar/a.fits")], [
        {"source_id": "2M00000002+0000000", "files": [_file("apStar/a.fits")]}]), "apStar/a.fits listed twice"),
    "unknown-format": (_payload("t7", [_file("apStar/a.fits", "apSpec")]), "unknown format"),
    "negative-size": (_payload("t8", [_file("apStar/a.fits", size=-1)]), "size must be a non-negative integer"),
}
