"""The Cannon's result flags (:data:`FLAGS`), test-step thresholds and :class:`CannonError`."""

from __future__ import annotations

FLAGS: dict[str, int] = {
    "OUTSIDE_HULL": 1 << 0,
    "OUTSIDE_RANGE": 1 << 1,
    "MOSTLY_MASKED": 1 << 2,
    "NO_DATA": 1 << 3,
    "NOT_CONVERGED": 1 << 4,
    "HIGH_CHI2": 1 << 5,
    "SINGULAR": 1 << 6,
    "OUTSIDE_REGION": 1 << 7,
    "HYDROGEN_LINES": 1 << 8,
    "POOR_MODEL_MATCH": 1 << 9,   # reduced χ² above mismatch.POOR_MATCH_CHI2: not a star the model can make
}
#: Flags whose labels are not a measurement (written as None).
FATAL = FLAGS["NO_DATA"] | FLAGS["HYDROGEN_LINES"] | FLAGS["POOR_MODEL_MATCH"]
#: A spectrum needs at least this many usable modelled pixels to be fitted.
MIN_PIXELS = 100
#: Reduced χ² above which HIGH_CHI2 is set.
HIGH_CHI2 = 5.0
#: Scaled labels are kept within ±LABEL_LIMIT during the test step (5 × the 95 % width of the
#: training labels around the median: far outside any sensible model, but finite).
LABEL_LIMIT = 5.0

def describe_flags(value: int) -> list[str]:
    """Names of the :data:`FLAGS` bits set in ``value``."""
    return [name for name, bit in FLAGS.items() if int(value) & bit]


class CannonError(ValueError):
    """Bad input to a Cannon model (the message names the problem and the counts)."""
