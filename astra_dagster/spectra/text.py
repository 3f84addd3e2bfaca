"""Checking strings from outside (manifests, FITS headers) before they reach the database.

PostgreSQL ``text`` refuses NUL, psycopg refuses what is not valid UTF-8 (lone surrogates from a
JSON ``"\\ud800"``, bytes smuggled in with ``surrogateescape``), and control characters or
megabyte "ids" make every later report unreadable. Each is refused here with one line that
names the source (file, entry) and the field; the value is shown escaped, briefly.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

#: Longest accepted value per kind of field (characters).
MAX_ID = 128  # source ids: 2MASS ids are 18, SDSS ids and Gaia DR3 ids 19 or fewer
MAX_NAME = 128  # release names, formats, header keywords such as TELESCOP
MAX_PATH = 1024


class UnsafeTextError(ValueError):
    """A string from outside is unfit for the database; the message names source and field."""


def _preview(value: str) -> str:
    shown = ascii(value[:40])
    return shown + (f"... ({len(value)} characters)" if len(value) > 40 else "")


def text_problem(value: str, max_length: int) -> str | None:
    """Why ``value`` may not reach the database, or None when it may."""
    if value.isascii() and value.isprintable():  # the common case: no control character possible
        return None if len(value) <= max_length else f"is {len(value)} characters long (at most {max_length})"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid UTF-8 (character {exc.start}: {value[exc.start]!a})"
    if "\x00" in value:
        return f"contains a NUL character (at {value.index(chr(0))})"
    for i, char in enumerate(value):
        # Cc: C0/C1 controls (tab, newline, ESC...); Cf: invisible format characters such as the
        # right-to-left override, which make an id display as another.
        if unicodedata.category(char) in ("Cc", "Cf") or char in "\u2028\u2029":
            return f"contains control character U+{ord(char):04X} (at {i})"
    if len(value) > max_length:
        return f"is {len(value)} characters long (at most {max_length})"
    return None


def checked_text(value: Any, *, where: str, field: str, max_length: int = MAX_NAME,
                 identifier: bool = False) -> str:
    """``value`` as a string fit for the database, else :class:`UnsafeTextError`.

    ``identifier``: also refuse empty values and surrounding blanks (``"2M1 "`` and ``"2M1"``
    would otherwise be two sources). Integers are accepted as their decimal text (numeric ids).
    """
    if isinstance(value, int) and not isinstance(value, bool) and identifier:
        value = str(value)
    if not isinstance(value, str):
        raise UnsafeTextError(f"{where}: {field} must be a string, got {type(value).__name__}")
    problem = text_problem(value, max_length)
    if problem is None and identifier:
        if not value.strip():
            problem = "is empty"
        elif value != value.strip():
            problem = "has leading or trailing blanks"
    if problem is not None:
        raise UnsafeTextError(f"{where}: {field} {problem}: {_preview(value)}")
    return value


def checked_number(value: Any, *, where: str, field: str, lo: float, hi: float) -> float | None:
    """None, or a finite number in [lo, hi] as a float; else :class:`UnsafeTextError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnsafeTextError(f"{where}: {field} must be a number, got {_preview(str(value))}")
    number = float(value)
    if not math.isfinite(number) or not lo <= number <= hi:
        raise UnsafeTextError(f"{where}: {field} {number!r} is outside [{lo:g}, {hi:g}]")
    return number
