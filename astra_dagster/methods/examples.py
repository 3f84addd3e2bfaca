"""The example computation of Astra's database chapter: seeded normal draws."""

from __future__ import annotations

import time

import numpy as np


def random_samples(seed: int, draws: int = 1, delay_time: int = 0) -> np.ndarray:
    """Wait ``delay_time`` seconds, then draw ``draws`` standard-normal samples with ``seed``.

    Same numbers as ``np.random.seed(seed); np.random.normal(size=draws)``, without touching
    NumPy's global random state.
    """
    if draws < 0:
        raise ValueError(f"draws must be >= 0, got {draws}")
    if delay_time < 0:
        raise ValueError(f"delay_time must be >= 0, got {delay_time}")
    time.sleep(delay_time)
    return np.random.RandomState(seed).normal(size=draws)
