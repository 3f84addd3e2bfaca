"""Accuracy statistics against known truth, per S/N bin (how the papers report label quality).

Every method's bench uses :func:`accuracy_bins`; its output is the ``bins`` list of contract 6
in ARCHITECTURE.md::

    [{"snr_lo": 50, "snr_hi": 100, "n": k,
      "labels": {"teff": {"bias": b, "rms": r, "robust_sigma": s, "outlier_frac": f, "pull_std": p}, ...}},
     ...]

Per label and bin, with Δ = estimate − truth over the spectra whose Δ is finite:

* ``bias``: mean Δ; ``rms``: √(mean Δ²);
* ``robust_sigma``: 1.4826 × median |Δ − median Δ| (the normal σ for Gaussian Δ, blind to outliers);
* ``outlier_frac``: fraction of the bin's spectra that are outliers: |Δ − median Δ| > 3 robust σ,
  *or* no finite estimate at all (a failed fit is a catastrophic error, not a missing value).
  Δ is measured from the median so that a bias is reported as a bias, not as outliers;
* ``pull_std``: standard deviation of Δ/σ over the spectra with a finite σ > 0 (1 when the
  uncertainties are calibrated); None when fewer than two such spectra or no uncertainties.

An empty bin (or a label without a single finite Δ in it) gives None for every statistic. A
spectrum whose S/N is not finite is in no bin; one whose truth is not finite is left out of
that label's statistics. The last bin's ``snr_hi`` is None (open).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: S/N bins of contract 6: [lo, hi) with an open last bin.
SNR_BINS: tuple[tuple[float, float | None], ...] = ((10, 20), (20, 50), (50, 100), (100, None))

STAT_NAMES = ("bias", "rms", "robust_sigma", "outlier_frac", "pull_std")


def robust_sigma(x: np.ndarray) -> float:
    """1.4826 × the median absolute deviation from the median (NaN for no finite values)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def label_stats(delta: np.ndarray, sigma: np.ndarray | None = None) -> dict[str, float | None]:
    """The five statistics of residuals Δ (see the module docstring); ``sigma`` the reported
    uncertainties, same shape, or None."""
    delta = np.asarray(delta, dtype=float).ravel()
    finite = np.isfinite(delta)
    if not finite.any():
        return dict.fromkeys(STAT_NAMES)
    d = delta[finite]
    med = float(np.median(d))
    rs = robust_sigma(d)
    far = np.abs(d - med) > 3.0 * rs if rs > 0 else np.abs(d - med) > 0
    outliers = (int(far.sum()) + int((~finite).sum())) / delta.size
    pull_std = None
    if sigma is not None:
        s = np.asarray(sigma, dtype=float).ravel()
        if s.shape != delta.shape:
            raise ValueError(f"uncertainties have shape {s.shape}, residuals {delta.shape}")
        s = s[finite]
        ok = np.isfinite(s) & (s > 0)
        if ok.sum() >= 2:
            pull_std = float(np.std(d[ok] / s[ok]))
    return {"bias": float(np.mean(d)), "rms": float(np.sqrt(np.mean(d**2))), "robust_sigma": rs,
            "outlier_frac": float(outliers), "pull_std": pull_std}


def accuracy_bins(
    truth: Mapping[str, Sequence[float]],
    estimate: Mapping[str, Sequence[float]],
    uncertainty: Mapping[str, Sequence[float]] | None,
    snr: Sequence[float],
    bins: Sequence[tuple[float, float | None]] = SNR_BINS,
) -> list[dict[str, Any]]:
    """Statistics per S/N bin for every label in ``truth`` (see the module docstring).

    ``truth``, ``estimate`` (and ``uncertainty``, which may lack labels or be None) map label
    names to per-spectrum sequences of one length, the length of ``snr``. Bins are [lo, hi);
    hi None means open. Raises ValueError for a label missing from ``estimate`` or mismatched
    lengths.
    """
    snr_a = np.asarray(snr, dtype=float)
    n = snr_a.size
    arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    for name in truth:
        if name not in estimate:
            raise ValueError(f"estimate lacks label {name!r} (has {sorted(estimate)})")
        t = np.asarray(truth[name], dtype=float)
        e = np.asarray(estimate[name], dtype=float)
        u = None
        if uncertainty is not None and name in uncertainty:
            u = np.asarray(uncertainty[name], dtype=float)
        for what, a in (("truth", t), ("estimate", e), ("uncertainty", u)):
            if a is not None and a.shape != (n,):
                raise ValueError(f"{what} of {name!r} has shape {a.shape}, snr has ({n},)")
        arrays[name] = (t, e, u)
    out = []
    for lo, hi in bins:
        with np.errstate(invalid="ignore"):
            in_bin = np.isfinite(snr_a) & (snr_a >= lo) & ((snr_a < hi) if hi is not None else True)
        labels = {}
        for name, (t, e, u) in arrays.items():
            keep = in_bin & np.isfinite(t)   # no truth, no verdict: such spectra are left out
            labels[name] = label_stats(e[keep] - t[keep], None if u is None else u[keep])
        out.append({"snr_lo": lo, "snr_hi": hi, "n": int(in_bin.sum()), "labels": labels})
    return out
