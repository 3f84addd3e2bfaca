"""Accuracy statistics against known truth, per S/N bin (the papers' way of reporting).

For each label and bin: bias (mean Δ), rms, robust σ (1.4826 × median absolute deviation about
the median), outlier fraction (|Δ − median| > 3 robust σ) and pull std (std of Δ/σ over the
spectra with a finite uncertainty; 1 means the uncertainties are calibrated).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SNR_BINS: tuple[tuple[float, float | None], ...] = ((10, 20), (20, 50), (50, 100), (100, None))


def label_stats(delta: np.ndarray, sigma: np.ndarray | None = None) -> dict[str, float | None]:
    """Statistics of residuals Δ = estimate − truth (non-finite Δ are ignored)."""
    delta = np.asarray(delta, dtype=float)
    good = np.isfinite(delta)
    d = delta[good]
    if d.size == 0:
        return {"bias": None, "rms": None, "robust_sigma": None, "outlier_frac": None, "pull_std": None}
    median = float(np.median(d))
    robust = float(1.4826 * np.median(np.abs(d - median)))
    outliers = float(np.mean(np.abs(d - median) > 3 * robust)) if robust > 0 else 0.0
    pull_std = None
    if sigma is not None:
        s = np.asarray(sigma, dtype=float)[good]
        ok = np.isfinite(s) & (s > 0)
        if ok.sum() >= 2:
            pull_std = float(np.std(d[ok] / s[ok]))
    return {"bias": float(np.mean(d)), "rms": float(np.sqrt(np.mean(d**2))), "robust_sigma": robust,
            "outlier_frac": outliers, "pull_std": pull_std}


def accuracy_bins(
    truth: Mapping[str, Sequence[float]],
    estimate: Mapping[str, Sequence[float]],
    uncertainty: Mapping[str, Sequence[float]] | None,
    snr: Sequence[float],
    bins: Sequence[tuple[float, float | None]] = SNR_BINS,
) -> list[dict[str, Any]]:
    """``[{"snr_lo", "snr_hi", "n", "labels": {name: stats}}]`` for every label in ``truth``."""
    snr = np.asarray(snr, dtype=float)
    out = []
    for lo, hi in bins:
        in_bin = (snr >= lo) & (snr < hi if hi is not None else np.isfinite(snr))
        labels = {}
        for name in truth:
            t = np.asarray(truth[name], dtype=float)[in_bin]
            e = np.asarray(estimate[name], dtype=float)[in_bin]
            u = (np.asarray(uncertainty[name], dtype=float)[in_bin]
                 if uncertainty is not None and name in uncertainty else None)
            labels[name] = label_stats(e - t, u)
        out.append({"snr_lo": lo, "snr_hi": hi, "n": int(in_bin.sum()), "labels": labels})
    return out
