"""A strict, narrow FITS reader for the files the spectra asset reads by the million: apStar and
apVisit files, i.e. a primary header and image extensions (tables may follow, unread).

Why not astropy for these: astropy builds an HDU class per header, a Card object per 80
characters and looks up its configuration for every value read; that costs ~5x reading and
sha256-ing the same bytes, and the spectra asset's per-source work is little else (issue #12).

Why this is safe: it reads only what it fully understands, and says so by returning None for
anything else (a truncated file, a value it cannot parse, CONTINUE or HIERARCH cards, scaled
integers, a duplicated keyword, a non-ASCII byte, bytes after the last HDU...). The caller then
reads the file with astropy, whose checks and error messages apply unchanged; a test reads every
file of the malformed corpus, a synthetic release and the real DR17 files both ways and requires
the same spectra or the same error.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

_RECORD = 2880
_CARD = 80
_END = b"END" + b" " * 77

#: BITPIX -> numpy dtype of the stored (big-endian) values, as astropy returns them unscaled.
_DTYPES = {8: np.dtype("u1"), 16: np.dtype(">i2"), 32: np.dtype(">i4"), 64: np.dtype(">i8"),
           -32: np.dtype(">f4"), -64: np.dtype(">f8")}

_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8}\Z")
_COMMENT_TAIL = r"\s*(?:/.*)?\Z"
#: A quote in the comment after a string is refused: astropy then reads ``'' / it's`` as one string.
_STRING = re.compile(r"\s*'((?:[^']|'')*)'\s*(?:/[^']*)?\Z")
#: A logical, an integer or a real (groups 1, 2, 3), then an optional comment.
_OTHER = re.compile(r"\s*(?:([TF])|([+-]?\d+)|([+-]?(?:\d+\.?\d*|\.\d+)(?:[EeDd][+-]?\d+)?))"
                    + _COMMENT_TAIL)
#: astropy reads a string value shaped like "name.x: 1.0" as a record-valued keyword card.
_RECORD_VALUED = re.compile(r"\s*[a-zA-Z_]\w*(?:\.\w+)*:\s")
#: Keywords whose presence changes how astropy returns the data (scaling, blanks, random groups)
#: or the header (HIERARCH keywords): such a file is left to astropy.
_LEFT_TO_ASTROPY = frozenset({"BZERO", "BSCALE", "BLANK", "GROUPS", "HIERARCH"})
#: Cards without a value that astropy also keeps out of key look-ups.
_COMMENTARY = frozenset({"COMMENT", "HISTORY", ""})
_IMAGE_NAXIS_MAX = 3


class PlainHeader(dict):
    """A header's keyword values (the first card of each keyword; astropy's ``get`` semantics)."""


class PlainImage:
    """An image HDU read from memory: ``header`` and ``data`` (None when NAXIS is 0)."""

    def __init__(self, header: PlainHeader, data: np.ndarray | None) -> None:
        self.header = header
        self.data = data


class PlainTable:
    """A table HDU stepped over, not read: only its header (a table is never a spectrum's image)."""

    def __init__(self, header: PlainHeader) -> None:
        self.header = header


def read_plain_images(data: bytes, image_hdus: int) -> list[PlainImage | PlainTable] | None:
    """The HDUs of a FITS file held in memory, or None if this reader does not fully understand it.

    ``image_hdus``: the number of leading HDUs (primary included) that must be images for the
    result to be used; a file with a table among them is left to astropy.
    """
    if not data or len(data) % _RECORD or not data.startswith(b"SIMPLE  = "):
        return None
    hdus: list[PlainImage | PlainTable] = []
    at = 0
    while at < len(data):
        if data[at:at + 10] != (b"XTENSION= " if hdus else b"SIMPLE  = "):
            return None
        parsed = _header_at(data, at)
        if parsed is None:
            return None
        header, data_start = parsed
        hdu = _hdu(header, data, data_start, primary=not hdus)
        if hdu is None:
            return None
        hdu_obj, nbytes = hdu
        if isinstance(hdu_obj, PlainTable) and len(hdus) < image_hdus:
            return None
        hdus.append(hdu_obj)
        at = data_start + -(-nbytes // _RECORD) * _RECORD
        if at > len(data):
            return None  # the data claimed run past the end: astropy names the truncation
    return hdus


def _header_at(data: bytes, start: int) -> tuple[PlainHeader, int] | None:
    """The header that begins at ``start`` and where its data begin, or None."""
    end = None
    for record in range(start, len(data), _RECORD):
        found = data.find(_END, record, record + _RECORD)
        while found >= 0 and (found - record) % _CARD:
            found = data.find(_END, found + 1, record + _RECORD)
        if found >= 0:
            end = found
            break
    if end is None:
        return None
    data_start = end + _RECORD - (end - start) % _RECORD
    if data.count(b" ", end + _CARD, data_start) != data_start - end - _CARD:
        return None  # something after END in the last record
    extension = data.startswith(b"XTENSION= ", start)
    if extension:
        # an extension's header (XTENSION, BITPIX, NAXISn, BUNIT...) is the same in every file of
        # a kind: parsed once per process, by its bytes
        block = data[start:data_start]
        known = _EXTENSION_HEADERS.get(block)
        if known is not None:
            return PlainHeader(known), data_start
    parsed = _parse_header(data, start, end)
    if parsed is not None and extension and len(_EXTENSION_HEADERS) < _EXTENSION_HEADERS_KEPT:
        _EXTENSION_HEADERS[block] = PlainHeader(parsed)
    return None if parsed is None else (parsed, data_start)


#: Parsed extension headers by their bytes (a copy is handed out: callers may change theirs).
_EXTENSION_HEADERS: dict[bytes, PlainHeader] = {}
_EXTENSION_HEADERS_KEPT = 256


def _parse_header(data: bytes, start: int, end: int) -> PlainHeader | None:
    """The keyword values of the cards from ``start`` up to the END card at ``end``, or None."""
    try:
        text = data[start:end].decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.isprintable():
        return None
    header = PlainHeader()
    long_strings: dict[str, list[str]] = {}  # keyword -> its pieces over CONTINUE cards
    card_of: dict[str, str] = {}
    last: str | None = None  # the keyword a CONTINUE card would continue
    for offset in range(0, len(text), _CARD):
        card = text[offset:offset + _CARD]
        parsed = _CARDS.get(card)
        if parsed is None:
            parsed = _card(card)
            if len(_CARDS) < _CARDS_KEPT:
                _CARDS[card] = parsed
        kind, keyword, value = parsed
        if kind is _KEYED:
            if keyword in header:
                return None
            header[keyword] = value
            last = keyword
            card_of[keyword] = card[10:]
        elif kind is _CONTINUED:
            if last is None or not isinstance(header[last], str):
                return None
            long_strings.setdefault(last, [_raw_string(card_of[last])]).append(value)
        elif kind is _NO_VALUE:
            last = None
        else:
            return None
    for keyword, pieces in long_strings.items():
        value = _long_string(pieces)
        if value is None:
            return None
        header[keyword] = value
    return header


#: What one card says, by its 80 characters: most cards of a release's files are the same in
#: every file (SIMPLE, BITPIX, NAXISn, the WCS...), so each is parsed once per process.
_CARDS: dict[str, tuple[object, str | None, Any]] = {}
_CARDS_KEPT = 1 << 14  # ~3 MB; a full cache keeps the cards first seen, the common ones
_KEYED, _CONTINUED, _NO_VALUE, _REFUSED = object(), object(), object(), object()


def _card(card: str) -> tuple[object, str | None, Any]:
    """(kind, keyword, value) of one card: a keyword with its value, a CONTINUE card with its
    string piece, a commentary card, or one this reader refuses."""
    keyword = card[:8].rstrip()
    if keyword == "CONTINUE":
        match = _STRING.match(card[10:]) if card[8:10] == "  " else None
        return (_REFUSED, None, None) if match is None else (_CONTINUED, None, match.group(1))
    if keyword in _LEFT_TO_ASTROPY:
        return _REFUSED, None, None
    if card[8:10] != "= ":
        return (_NO_VALUE, None, None) if keyword in _COMMENTARY else (_REFUSED, None, None)
    if not _KEYWORD.match(keyword):
        return _REFUSED, None, None
    value = _value(card[10:])
    return (_REFUSED, None, None) if value is None else (_KEYED, keyword, value)


def _raw_string(field: str) -> str:
    match = _STRING.match(field)
    assert match is not None  # the card was read as a string already
    return match.group(1)


def _long_string(pieces: list[str]) -> str | None:
    """A string continued over CONTINUE cards, joined as astropy joins it: each piece without its
    trailing blanks and one trailing '&'. A piece with a quote in it is left to astropy, which
    unescapes the joined string a second time."""
    if any("'" in piece for piece in pieces):
        return None
    joined = "".join(piece.rstrip()[:-1] if piece.rstrip().endswith("&") else piece.rstrip()
                     for piece in pieces).rstrip()
    return None if _RECORD_VALUED.match(joined) else joined


def _value(field: str) -> Any:
    """A card's value as astropy returns it, or None when it is not one this reader is sure of."""
    if field.lstrip()[:1] == "'":
        match = _STRING.match(field)
        if match is None:
            return None
        text = match.group(1).replace("''", "'").rstrip()
        return None if _RECORD_VALUED.match(text) else text
    match = _OTHER.match(field)
    if match is None:
        return None
    logical, integer, real = match.groups()
    if logical is not None:
        return logical == "T"
    if integer is not None:
        return int(integer)
    return float(real.replace("D", "E").replace("d", "e"))


def _whole(header: PlainHeader, key: str, low: int) -> int | None:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        return None
    return value


def _hdu(header: PlainHeader, data: bytes, data_start: int, primary: bool
         ) -> tuple[PlainImage | PlainTable, int] | None:
    """The HDU and its data's size in bytes, or None when its structure is not plain."""
    first = next(iter(header), None)
    if primary:
        if first != "SIMPLE" or header["SIMPLE"] is not True:
            return None
        kind = "IMAGE"
    else:
        if first != "XTENSION":
            return None
        kind = header["XTENSION"]
        if kind not in ("IMAGE", "BINTABLE", "TABLE"):
            return None
        if _whole(header, "PCOUNT", 0) is None or header.get("GCOUNT") != 1:
            return None
    bitpix, naxis = header.get("BITPIX"), _whole(header, "NAXIS", 0)
    if isinstance(bitpix, bool) or bitpix not in _DTYPES or naxis is None:
        return None
    axes = [_whole(header, f"NAXIS{i}", 1) for i in range(1, naxis + 1)]
    if any(n is None for n in axes):
        return None
    count = math.prod(axes) if axes else 0  # exact: Python integers
    nbytes = count * abs(bitpix) // 8 + (header["PCOUNT"] if not primary else 0)
    if data_start + nbytes > len(data):
        return None
    if kind != "IMAGE":
        return PlainTable(header), nbytes
    if naxis > _IMAGE_NAXIS_MAX:
        return None
    array = None
    if count:
        array = np.frombuffer(data, dtype=_DTYPES[bitpix], count=count, offset=data_start)
        array = array.reshape(axes[::-1])
    return PlainImage(header, array), nbytes
