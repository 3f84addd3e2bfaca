"""APOGEENet's labels, result flags (:class:`ApogeeNetFlag`) and :class:`ApogeeNetError`."""

from __future__ import annotations

import enum

#: Labels the network predicts, in output order (Teff is learnt as log10 Teff).
LABELS: tuple[str, ...] = ("teff", "logg", "fe_h")


class ApogeeNetError(ValueError):
    """Inputs the network cannot take at all (wrong shapes, unusable training data, bad files)."""


class ApogeeNetFlag(enum.IntFlag):
    """Bits of :attr:`ApogeeNetResult.bitmask_flag`. ``FATAL`` bits leave the labels NaN."""

    TEFF_OUT_OF_RANGE = 1 << 0    # predicted Teff outside the trained range
    LOGG_OUT_OF_RANGE = 1 << 1    # predicted logg outside the trained range
    FE_H_OUT_OF_RANGE = 1 << 2    # predicted [Fe/H] outside the trained range
    NON_FINITE_INPUT = 1 << 3     # NaN/inf flux or ivar where data were expected (masked)
    MOSTLY_MASKED = 1 << 4        # fewer than min_good_fraction of the chip pixels usable: NaN
    NO_FLUX = 1 << 5              # no usable pixel at all, or median flux <= 0: NaN
    FE_H_UNRELIABLE = 1 << 6      # predicted Teff outside FE_H_RELIABLE_TEFF: [Fe/H] weakly constrained
    POOR_MODEL_MATCH = 1 << 7     # lines where the training set has none (screen.line_chi2): NaN


FATAL_FLAGS = ApogeeNetFlag.MOSTLY_MASKED | ApogeeNetFlag.NO_FLUX
#: Predicted Teff range where [Fe/H] is trusted: above it metal lines are few and weak in
#: broad profiles, below it molecules blanket the spectrum (APOGEENet flags < 3200 K too).
FE_H_RELIABLE_TEFF = (3200.0, 8000.0)


def flag_names(flags: int) -> list[str]:
    """Names of the bits set in ``flags``."""
    return [f.name for f in ApogeeNetFlag if flags & f and f.name]
