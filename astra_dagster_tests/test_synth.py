"""The instrument and populations of the synthetic generator, and its physics-lite line model
(``model="lines"``): physics trends, RV shifts, noise, training sets. The physical model's own
tests are in test_physical_model.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from astra_dagster.spectra import synth
from astra_dagster.spectra.spectrum import C_KMS, apstar_wavelength

GIANT = {"teff": 4500.0, "logg": 2.5, "fe_h": 0.0, "alpha_m": 0.0}
# the line model under the release and training instruments
LINES_RELEASE = dataclasses.replace(synth.RELEASE_SETTINGS, model="lines")
LINES_TRAINING = dataclasses.replace(synth.TRAINING_SETTINGS, model="lines")
WAVE = apstar_wavelength()
CHIPS = synth.chip_mask(WAVE)


def flux(labels: dict, **kw) -> np.ndarray:
    return synth.synthesize(labels, WAVE, kw.pop("settings", LINES_TRAINING), **kw)


def test_deterministic_finite_and_normalised() -> None:
    a = synth.synthesize(GIANT, WAVE, LINES_RELEASE, rv_kms=12.0, fiber=77)
    b = synth.synthesize(GIANT, WAVE, LINES_RELEASE, rv_kms=12.0, fiber=77)
    assert np.array_equal(a, b)
    assert np.all(np.isfinite(a))
    assert a.min() > 0.2 and a.max() < 1.01
    # Blanketing of a solar-metallicity K giant, calibrated against Doppler's Synspec emulator
    # (26-33 % of chip pixels below 0.9 there).
    frac = np.mean(a[CHIPS] < 0.9)
    assert 0.18 < frac < 0.36, frac


def test_rv_shift_matches_resampled_rest_frame() -> None:
    v = 41.7
    shifted = flux(GIANT, rv_kms=v)
    rest_on_obs = synth.synthesize(GIANT, WAVE / (1 + v / C_KMS), LINES_TRAINING)
    assert np.max(np.abs(shifted - rest_on_obs)[CHIPS]) < 3e-3
    # and the shift is recovered by a χ² fit against the rest-frame model to < 0.01 km/s
    good = CHIPS & (WAVE > 15200) & (WAVE < 16900)

    def chi2(trial: float) -> float:
        model = synth.synthesize(GIANT, WAVE[good] / (1 + trial / C_KMS), LINES_TRAINING)
        return float(np.sum((shifted[good] - model) ** 2))

    fit = minimize_scalar(chi2, bounds=(v - 3, v + 3), method="bounded", options={"xatol": 1e-4})
    assert abs(fit.x - v) < 0.01, fit.x


def test_label_sensitivities_are_physical() -> None:
    base = flux(GIANT)
    d_alpha = flux({**GIANT, "alpha_m": 0.2}) - base
    d_feh = flux({**GIANT, "fe_h": 0.2}) - base
    d_logg = flux({**GIANT, "logg": 3.0}) - base
    for d in (d_alpha, d_feh, d_logg):
        assert np.sqrt(np.mean(d[CHIPS] ** 2)) > 3e-3  # each is measurable at S/N ~100
    # more metals / α → deeper lines overall
    assert d_alpha[CHIPS].mean() < 0 and d_feh[CHIPS].mean() < 0
    # [α/Fe] has its own features, not a rescaled copy of the [Fe/H] response
    cos = np.dot(d_alpha[CHIPS], d_feh[CHIPS]) / np.linalg.norm(d_alpha[CHIPS]) / np.linalg.norm(d_feh[CHIPS])
    assert cos < 0.8, cos
    # molecules and low-excitation lines fade with temperature
    fracs = [np.mean(flux({**GIANT, "teff": t, "logg": 4.5 if t > 5000 else 2.0})[CHIPS] < 0.9)
             for t in (3800, 4500, 5200, 6200)]
    assert fracs == sorted(fracs, reverse=True), fracs
    assert fracs[0] > 0.4 and fracs[-1] < 0.15


def test_brackett_lines_peak_in_hot_stars() -> None:
    br11 = np.argmin(np.abs(WAVE - 16811.1))
    window = np.abs(WAVE - 16811.1) < 25.0
    step = np.gradient(WAVE)
    depth, ew = {}, {}
    for t in (5000, 7000, 9500, 20000):
        f = flux({"teff": t, "logg": 4.0, "fe_h": 0.0, "alpha_m": 0.0, "vsini": 10.0})
        depth[t], ew[t] = 1 - f[br11], np.sum((1 - f[window]) * step[window])
    assert depth[5000] < 0.1 < depth[9500], depth
    # equivalent width (Å) peaks near 10,000 K, as the Balmer-like series does
    assert ew[9500] > ew[7000] and ew[9500] > ew[20000], ew
    assert 3.0 < ew[9500] < 6.0, ew
    # Stark wings grow with gravity: the flux 8 Å from the line centre is lower in the dwarf
    wing = np.argmin(np.abs(WAVE - 16803.0))
    hot = {"teff": 9500.0, "fe_h": 0.0, "alpha_m": 0.0, "vsini": 10.0}
    assert flux({**hot, "logg": 4.5})[wing] < flux({**hot, "logg": 3.0})[wing]


def test_broadening_and_resolution() -> None:
    narrow = flux({**GIANT, "vsini": 1.0})
    wide = flux({**GIANT, "vsini": 40.0})
    # rotation fills in the lines but conserves their equivalent width (normalised kernel)
    assert np.std(wide[CHIPS]) < 0.8 * np.std(narrow[CHIPS])
    assert abs(np.mean(1 - wide[CHIPS]) - np.mean(1 - narrow[CHIPS])) < 2e-3
    low_r = synth.synthesize(GIANT, WAVE, synth.SynthesisSettings(resolution=15000.0, model="lines"))
    assert np.std(low_r[CHIPS]) < np.std(synth.synthesize(GIANT, WAVE, synth.SynthesisSettings(model="lines"))[CHIPS])
    r = [synth.fiber_resolving_power(f) for f in (1, 75, 150, 225, 300)]
    assert 20000 < min(r) < 21000 and 23500 < max(r) < 24000
    with pytest.raises(ValueError, match="fiber 0"):
        synth.fiber_resolving_power(0)


def test_release_and_training_settings_differ_slightly() -> None:
    rel = synth.synthesize(GIANT, WAVE, LINES_RELEASE, fiber=20)
    tra = synth.synthesize(GIANT, WAVE, LINES_TRAINING)
    rms = np.sqrt(np.mean((rel - tra)[CHIPS] ** 2))
    assert 1e-3 < rms < 0.03, rms
    # the asymmetric LSF is centred as a Gaussian fit sees it: no velocity offset between the two
    good = CHIPS

    def chi2(v: float) -> float:
        model = synth.synthesize(GIANT, WAVE[good] / (1 + v / C_KMS), LINES_TRAINING)
        return float(np.sum((rel[good] - model) ** 2))

    assert abs(minimize_scalar(chi2, bounds=(-2, 2), method="bounded").x) < 0.03


def test_continuum_shape() -> None:
    w = np.array([15100.0, 16000.0, 17000.0])
    c45 = synth.continuum(GIANT, w)
    c37 = synth.continuum({**GIANT, "teff": 3700.0, "logg": 1.0}, w)
    assert c45[1] == pytest.approx(1.0)
    # H⁻-flattened ratios quoted from the Synspec emulator (blackbody alone: 0.73 and 0.76)
    assert c45[2] / c45[0] == pytest.approx(0.80, abs=0.02)
    assert c37[2] / c37[0] == pytest.approx(0.92, abs=0.03)
    hot = synth.continuum({"teff": 12000.0, "logg": 4.0, "fe_h": 0.0, "alpha_m": 0.0}, w)
    assert hot[0] > hot[1] > hot[2]


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="alpha_m"):
        synth.synthesize({"teff": 4500, "logg": 2, "fe_h": 0}, WAVE, LINES_RELEASE)
    with pytest.raises(ValueError, match="teff"):
        synth.synthesize({**GIANT, "teff": 1000.0}, WAVE, LINES_RELEASE)
    with pytest.raises(ValueError, match="logg"):
        synth.synthesize({**GIANT, "logg": float("nan")}, WAVE, LINES_RELEASE)
    with pytest.raises(ValueError, match="outside the generator's range"):
        synth.synthesize(GIANT, np.linspace(14000, 15000, 10), LINES_RELEASE)
    with pytest.raises(ValueError, match="rv_kms"):
        synth.synthesize(GIANT, WAVE, LINES_RELEASE, rv_kms=5000.0)
    with pytest.raises(ValueError, match="model"):
        synth.SynthesisSettings(model="blackbody")
    # the default (physical) model names its own range
    with pytest.raises(ValueError, match="teff=3000"):
        synth.synthesize({**GIANT, "teff": 3000.0}, WAVE)
    with pytest.raises(ValueError, match="population"):
        synth.draw_labels(3, np.random.default_rng(0), population="martians")


def test_label_distribution() -> None:
    labels, kind = synth.draw_labels_with_kind(4000, np.random.default_rng(5))
    assert set(labels) == set(synth.ALL_LABELS)
    frac = {k: np.mean(kind == k) for k in ("giant", "dwarf", "hot", "yso")}
    assert 0.58 < frac["giant"] < 0.66 and 0.24 < frac["dwarf"] < 0.32
    assert 0.03 < frac["hot"] < 0.07 and 0.03 < frac["yso"] < 0.07
    g = kind == "giant"
    # drawn from the DR17 RGB sample (medians 4460 K, logg 2.0, [Fe/H] -0.28, [α/Fe] 0.08)
    assert 4350 < np.median(labels["teff"][g]) < 4650
    assert 1.8 < np.median(labels["logg"][g]) < 2.5
    assert -0.35 < np.median(labels["fe_h"][g]) < -0.05
    assert np.percentile(labels["alpha_m"][g], 95) > 0.2  # the high-α sequence exists
    hot = kind == "hot"
    assert labels["teff"][hot].min() >= 8000 and labels["teff"][hot].max() <= 20000
    yso = kind == "yso"
    assert np.all(labels["teff"][yso] < 5000) and np.all(labels["logg"][yso] < 4.4)
    # every star can be rendered by the physical model
    from astra_dagster.spectra.physical import in_grid

    assert in_grid(labels["teff"], labels["logg"], labels["fe_h"]).all()
    uniform = synth.draw_labels(500, np.random.default_rng(2), population="uniform")
    assert in_grid(uniform["teff"], uniform["logg"], uniform["fe_h"]).all()
    assert uniform["logg"][uniform["teff"] > 6000].min() >= 3.5  # the grid's hole is avoided
    fixed = synth.draw_labels(50, np.random.default_rng(1), population="giants", hidden_scatter=False)
    rel = synth.hidden_label_relations(fixed["teff"], fixed["logg"], fixed["fe_h"])
    for name in ("vmicro", "vmacro", "c_fe", "n_fe"):
        assert np.array_equal(fixed[name], rel[name])


def test_make_training_set_noiseless_and_noisy() -> None:
    ts = synth.make_training_set(12, seed=3)
    assert ts.flux.shape == ts.ivar.shape == (12, WAVE.size)
    assert np.array_equal(ts.wavelength, WAVE)
    assert set(ts.labels) == set(synth.ALL_LABELS) and ts.label_names == synth.CARRIED_LABELS["physical"]
    assert ts.label_array().shape == (12, 3)
    assert np.all(ts.ivar[:, ~CHIPS] == 0) and np.all(ts.ivar[:, CHIPS] == synth.NOISELESS_IVAR)
    assert np.all(np.isfinite(ts.flux))
    again = synth.make_training_set(12, seed=3)
    assert np.array_equal(ts.flux, again.flux)
    other = synth.make_training_set(12, seed=4)
    assert not np.allclose(ts.labels["teff"], other.labels["teff"])
    noisy = synth.make_training_set(12, seed=3, snr=50.0)
    assert np.array_equal(noisy.labels["teff"], ts.labels["teff"])  # same stars, noise added
    pulls = ((noisy.flux - ts.flux) * np.sqrt(noisy.ivar))[:, CHIPS]
    assert np.std(pulls) == pytest.approx(1.0, abs=0.02)
    # the hidden labels sit on their relations in the training preset
    rel = synth.hidden_label_relations(ts.labels["teff"], ts.labels["logg"], ts.labels["fe_h"])
    assert np.allclose(ts.labels["vmicro"], rel["vmicro"])


def test_training_set_on_a_custom_grid() -> None:
    wave = 10 ** (np.log10(15000.0) + 2e-6 * np.arange(30000))
    ts = synth.make_training_set(3, seed=9, wavelength=wave, population="dwarfs")
    assert ts.flux.shape == (3, wave.size)
    assert np.all(ts.labels["logg"] > 3.3)
