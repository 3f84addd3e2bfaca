"""bench/accuracy.py's RV statistics: the Cramér–Rao comparison per visit and the issue #10
targets, on draws whose answer is known."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from astra_dagster.methods.metrics import accuracy_bins


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("bench_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _visits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Cool visits with bounds 0.005-0.1 km/s and errors drawn from exactly those bounds."""
    rng = np.random.default_rng(seed)
    snr = rng.uniform(20.0, 400.0, n)
    crb = 2.0 / snr
    return snr, crb, rng.normal(size=n) * crb, ["giant"] * n


def test_efficient_method_passes_and_systematics_fail(bench) -> None:
    snr, crb, delta, kinds = _visits(400, 1)
    verdicts = bench.rv_targets(delta, crb, crb, snr, kinds)
    assert [t["pass"] for t in verdicts] == [True] * 5
    spread = verdicts[2]["value"]
    assert spread == pytest.approx(1.0, abs=0.1)

    # A 20 m/s template-mismatch floor: the rms targets still pass, the per-visit ones do not.
    floor = np.random.default_rng(2).normal(size=snr.size) * 0.02
    verdicts = bench.rv_targets(delta + floor, crb, np.hypot(crb, 0.02), snr, kinds)
    assert [t["pass"] for t in verdicts] == [True, True, False, False, True]

    # A visit without a velocity is a catastrophic error, not a missing value.
    delta[0] = np.nan
    verdicts = bench.rv_targets(delta, crb, crb, snr, kinds)
    assert not verdicts[3]["pass"] and "1 without" in verdicts[3]["target"]


def test_crb_weighted_ratio_rests_on_the_hot_star(bench) -> None:
    """One fast rotator (σ_CRB 3 km/s) among 99 cool visits: rms/CRB is that one draw
    (n_eff ≈ 1), while Δ/σ_CRB weights every visit alike and says the method is efficient."""
    snr, crb, delta, _ = _visits(100, 3)
    snr[:] = 60.0
    crb[0], delta[0] = 3.0, 0.6       # the hot star's draw happened to be 0.2 σ
    delta[1] = np.nan                  # a failed fit: its bound must not enter crb_rms
    crb[1] = 50.0
    bins = accuracy_bins({"vrel": np.zeros(100)}, {"vrel": delta}, None, snr)
    bench.add_information_limit(bins, "vrel", list(crb), list(snr), list(delta))
    st = next(b for b in bins if b["snr_lo"] == 50)["labels"]["vrel"]
    assert st["crb_n_eff"] == pytest.approx(1.0, abs=0.05)
    assert st["rms_over_crb"] == pytest.approx(0.2, abs=0.05)
    assert st["crb_rms"] < 0.31   # without the failed visit's 50 km/s
    assert st["z_crb"]["n"] == 99
    assert st["z_crb"]["rms"] == pytest.approx(1.0, abs=0.2)
