"""The Payne's result flags (:data:`FLAGS`), the fit's thresholds and settings, and :class:`PayneError`."""

from __future__ import annotations

from astra_dagster.spectra.spectrum import APSTAR_CDELT1, C_KMS

FLAGS: dict[str, int] = {
    "NO_DATA": 1 << 0,            # too few usable pixels: not fitted
    "NON_FINITE_INPUT": 1 << 1,   # NaN/inf flux or ivar in pixels that carry weight (masked)
    "CONTINUUM_FAILED": 1 << 2,   # at least one chip could not be normalised (its pixels unused)
    "OUTSIDE_RANGE": 1 << 3,      # teff or logg pinned at the edge of the training range: labels None
    "RV_AT_BOUND": 1 << 4,        # the RV offset pinned at ±RV_LIMIT
    "NOT_CONVERGED": 1 << 5,      # least squares stopped on its evaluation budget
    "HIGH_CHI2": 1 << 6,          # reduced χ² above HIGH_CHI2: poor match (e.g. a star out of scope)
    "SINGULAR": 1 << 7,           # JᵀWJ not invertible: no uncertainties
    "AT_BOUND": 1 << 8,           # fe_h or alpha_m pinned at the edge of the training range: a limit
    "HYDROGEN_LINES": 1 << 9,     # Brackett lines far deeper than the best model: a hot star (methods.hydrogen)
    "POOR_MODEL_MATCH": 1 << 10,  # reduced χ² above mismatch.POOR_MATCH_CHI2: not a star the emulator can make
    "OUTSIDE_TRAINING": 1 << 11,  # labels where the training set has no stars (COVERAGE_DISTANCE): extrapolated
}
#: Flags that make the labels meaningless (they are returned as None).
FATAL = (FLAGS["NO_DATA"] | FLAGS["OUTSIDE_RANGE"] | FLAGS["NOT_CONVERGED"] | FLAGS["HYDROGEN_LINES"]
         | FLAGS["POOR_MODEL_MATCH"])
#: Labels whose pinning at a bound means the star is outside the emulator's domain (hot stars,
#: giants above the training branch); the abundance labels of the training set span a narrower
#: range than the data's scatter, so at their bounds the value is a limit, not a failure.
RANGE_LABELS = ("teff", "logg")
#: A spectrum needs this many usable modelled pixels to be fitted.
MIN_PIXELS = 500
#: Reduced χ² above which HIGH_CHI2 is set.
HIGH_CHI2 = 5.0
#: Bound on the fitted RV offset (km/s): spectra are already in the rest frame.
RV_LIMIT = 10.0
#: Scaled label within this distance of ±0.5 counts as at the bound.
BOUND_TOL = 2e-3
#: km/s per apStar pixel (log-linear grid).
KMS_PER_PIXEL = C_KMS * (10.0 ** APSTAR_CDELT1 - 1.0)
#: A fit whose third-nearest training star (among the model's start points, a random 256 of the
#: training labels, in scaled units where each label's range is 1) is farther than this lies where
#: the emulator never saw a star: OUTSIDE_TRAINING, a warning, and the hydrogen screen's lower
#: thresholds for fits outside the training set apply. Measured with the default (CI-size) model
#: on independent generator draws at S/N 40-200: 7 of 388 unflagged giants, dwarfs and YSOs beyond
#: it (metal-poor giants and M dwarfs, labels still good), and all 50 unflagged 8000-19000 K stars,
#: which the emulator fits as [Fe/H] -1.4 to -2.3 stars between 4900 and 6500 K (0.23-0.37);
#: with the lower hydrogen thresholds 71 of 100 hot stars get NULL labels, the rest OUTSIDE_TRAINING.
COVERAGE_DISTANCE = 0.2
#: Starting points tried per spectrum (best by χ² over the start grid).
N_STARTS = 2


class PayneError(ValueError):
    """Bad input to The Payne: unusable training set, wrong model file or array shapes."""


def describe_flags(value: int) -> list[str]:
    """Names of the :data:`FLAGS` bits set in ``value``."""
    return [name for name, bit in FLAGS.items() if int(value) & bit]
