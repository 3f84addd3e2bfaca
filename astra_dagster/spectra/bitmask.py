"""The APOGEE_PIXMASK pixel bitmask (bit numbers as in the APOGEE data-reduction pipeline)."""

from __future__ import annotations

import numpy as np

PIXMASK_BITS: dict[str, int] = {
    "BADPIX": 0,
    "CRPIX": 1,
    "SATPIX": 2,
    "UNFIXABLE": 3,
    "BADDARK": 4,
    "BADFLAT": 5,
    "BADERR": 6,
    "NOSKY": 7,
    "LITTROW_GHOST": 8,
    "PERSIST_HIGH": 9,
    "PERSIST_MED": 10,
    "PERSIST_LOW": 11,
    "SIG_SKYLINE": 12,
    "SIG_TELLURIC": 13,
    "NOT_ENOUGH_PSF": 14,
    "FERRE_MASK": 16,
}

#: Pixels that must never be used: bits 0-7 and 14.
BAD_PIXELS = 16639
#: The stricter mask Doppler uses: BAD_PIXELS plus SIG_SKYLINE.
DOPPLER_BAD_PIXELS = 20735


def flag(*names: str) -> int:
    """The integer with the named bits set, e.g. ``flag("BADPIX", "CRPIX") == 3``."""
    value = 0
    for name in names:
        value |= 1 << PIXMASK_BITS[name]
    return value


def is_bad(pixel_flags: np.ndarray, mask: int = BAD_PIXELS) -> np.ndarray:
    """Boolean array, True where any bit of ``mask`` is set."""
    return (np.asarray(pixel_flags, dtype=np.int64) & mask) != 0
