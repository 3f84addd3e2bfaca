"""Accuracy statistics per S/N bin (astra_dagster.methods.metrics, contract 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astra_dagster.methods.metrics import SNR_BINS, accuracy_bins, label_stats, robust_sigma


def test_label_stats_known_numbers() -> None:
    delta = np.array([1.0, -1.0, 2.0, -2.0, 0.0, 100.0])
    st = label_stats(delta, np.full(6, 2.0))
    assert st["bias"] == pytest.approx(100.0 / 6)
    assert st["rms"] == pytest.approx(np.sqrt((1 + 1 + 4 + 4 + 0 + 1e4) / 6))
    # median 0.5, |Δ - 0.5| = 0.5 0.5 1.5 1.5 2.5 99.5 → MAD 1.5
    assert st["robust_sigma"] == pytest.approx(1.4826 * 1.5)
    assert st["outlier_frac"] == pytest.approx(1 / 6)          # only the 100
    assert st["pull_std"] == pytest.approx(np.std(delta / 2.0))
    assert robust_sigma(np.array([np.nan, 1.0, 3.0])) == pytest.approx(1.4826)


def test_outliers_are_measured_from_the_median_and_failures_count() -> None:
    rng = np.random.default_rng(0)
    d = 5.0 + rng.normal(0.0, 1.0, 10000)                  # a pure bias is not an outlier
    st = label_stats(d)
    assert st["bias"] == pytest.approx(5.0, abs=0.05)
    assert st["robust_sigma"] == pytest.approx(1.0, rel=0.03)
    assert st["outlier_frac"] == pytest.approx(0.0027, abs=0.0015)   # the Gaussian 3σ tail
    assert st["pull_std"] is None
    d[:100] = np.nan                                        # failed fits are catastrophic errors
    assert label_stats(d)["outlier_frac"] == pytest.approx(0.01 + 0.0027, abs=0.0015)
    assert label_stats(np.array([np.nan, np.nan])) == dict.fromkeys(
        ("bias", "rms", "robust_sigma", "outlier_frac", "pull_std"))


def test_accuracy_bins_structure_and_binning() -> None:
    snr = np.array([10.0, 19.99, 20.0, 49.0, 50.0, 99.0, 100.0, 500.0, np.nan, 5.0])
    truth = {"teff": np.full(10, 5000.0), "logg": np.full(10, 2.5)}
    est = {"teff": truth["teff"] + np.arange(10), "logg": truth["logg"] + 0.1}
    unc = {"teff": np.ones(10)}                             # no logg uncertainties
    bins = accuracy_bins(truth, est, unc, snr)
    assert [(b["snr_lo"], b["snr_hi"], b["n"]) for b in bins] == [(10, 20, 2), (20, 50, 2), (50, 100, 2),
                                                                  (100, None, 2)]
    assert bins[0]["labels"]["teff"]["bias"] == pytest.approx(0.5)      # Δ = 0, 1
    assert bins[3]["labels"]["teff"]["bias"] == pytest.approx(6.5)      # Δ = 6, 7
    assert bins[3]["labels"]["teff"]["pull_std"] == pytest.approx(0.5)
    assert bins[1]["labels"]["logg"]["pull_std"] is None
    assert set(bins[2]["labels"]["teff"]) == {"bias", "rms", "robust_sigma", "outlier_frac", "pull_std"}
    json.dumps(bins)                                        # plain JSON (contract 6)
    empty = accuracy_bins(truth, est, None, np.full(10, 15.0), bins=SNR_BINS)
    assert empty[1]["n"] == 0 and empty[1]["labels"]["teff"]["rms"] is None
    # spectra without a true value are left out of that label, not counted as failures
    truth_nan = {"teff": np.where(np.arange(10) < 5, np.nan, 5000.0)}
    st = accuracy_bins(truth_nan, est, None, np.full(10, 60.0))[2]["labels"]["teff"]
    assert st["bias"] == pytest.approx(7.0) and st["outlier_frac"] == 0.0


def test_accuracy_bins_bad_input() -> None:
    with pytest.raises(ValueError, match="estimate lacks label 'logg'"):
        accuracy_bins({"logg": [1.0]}, {"teff": [1.0]}, None, [50.0])
    with pytest.raises(ValueError, match=r"estimate of 'teff' has shape \(2,\)"):
        accuracy_bins({"teff": [1.0]}, {"teff": [1.0, 2.0]}, None, [50.0])
