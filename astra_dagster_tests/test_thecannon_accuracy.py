"""The Cannon on synthetic APOGEE spectra: trained on the generator's TRAINING_SETTINGS grid,
tested on release-like spectra (different LSF, hidden labels scattering, a smooth continuum,
noise, bad pixels) normalised by the shared continuum code. Asserts the issue's targets for the
giants and dwarfs of the survey population at S/N ≥ 50; the batched test step against the
one-by-one path (speed itself is the bench's)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from astra_dagster.methods import hydrogen
from astra_dagster.methods.metrics import accuracy_bins
from astra_dagster.methods.thecannon import FLAGS, CannonModel, fit_spectra
from astra_dagster.spectra.labelled_sets import LABELS, physical_spectra, release_like_set
from astra_dagster.spectra.spectrum import Spectrum, apstar_wavelength

TARGETS = {"teff": 60.0, "logg": 0.12, "fe_h": 0.08}


@pytest.fixture(scope="module")
def fitted(cannon_model: CannonModel) -> dict:
    model = cannon_model  # model_cache.CANNON_TRAINING, cached on disk
    snr = np.random.default_rng(7).uniform(50.0, 150.0, 220)
    data = release_like_set(220, seed=202, snr=snr)
    return {"model": model, "data": data, "result": model.test(data.flux, data.ivar)}


def test_accuracy_targets_for_giants_and_dwarfs(fitted: dict) -> None:
    data, res = fitted["data"], fitted["result"]
    main = np.isin(data.kind, ("giant", "dwarf"))
    assert main.sum() > 170
    truth = {k: data.labels[k][main] for k in LABELS}
    est = {k: res.labels[main, i] for i, k in enumerate(LABELS)}
    unc = {k: res.uncertainties[main, i] for i, k in enumerate(LABELS)}
    (b,) = accuracy_bins(truth, est, unc, data.snr[main], bins=((50, None),))
    for name, target in TARGETS.items():
        st = b["labels"][name]
        assert st["robust_sigma"] <= target, (name, st)
        assert st["rms"] <= 2.5 * target, (name, st)          # a few rotating warm dwarfs are off
        assert abs(st["bias"]) <= 0.5 * target, (name, st)
        # catastrophic errors, in units of the target (robust σ is ~10 K on these spectra, so
        # 3 robust σ would call a 30 K error an outlier)
        assert np.mean(np.abs(est[name] - truth[name]) > 3 * target) <= 0.05, name
        # formal errors alone give pulls of 10-20 (correlated model mismatch); the
        # cross-validated floors bring them to a few
        assert 0.7 <= st["pull_std"] <= 5.0, (name, st)
    assert np.all(res.flags[main] & (FLAGS["NO_DATA"] | FLAGS["SINGULAR"]) == 0)
    assert np.all(data.continuum_flags == 0)


def test_hot_stars_are_mostly_flagged(fitted: dict) -> None:
    """8000-20000 K stars are far outside the training set. The fit lands on some cool-star
    labels; most get OUTSIDE_HULL or HIGH_CHI2, but at S/N ~50 a weak-lined hot star can pass
    for a metal-poor warm dwarf (r_chi_sq ~2): the flags are a screen, not a classifier."""
    data, res = fitted["data"], fitted["result"]
    hot = data.kind == "hot"
    assert hot.sum() >= 5
    flagged = res.flags[hot] & (FLAGS["OUTSIDE_HULL"] | FLAGS["OUTSIDE_RANGE"] | FLAGS["HIGH_CHI2"]) != 0
    assert flagged.mean() >= 0.75
    assert np.median(res.r_chi_sq[hot]) > 1.5              # giants and dwarfs: median ~1


def test_batched_test_step_matches_and_beats_one_by_one(fitted: dict) -> None:
    """The vectorised test step gives the per-spectrum path's labels, and is faster than it. Both are
    timed here, interleaved, in CPU time of this process (wall time failed once at 1.0x beside a
    full suite on 2 cores), so machine load cancels in the ratio (ms per spectrum: bench/accuracy.py)."""
    model, data = fitted["model"], fitted["data"]
    flux, ivar = data.flux[:24], data.ivar[:24]
    batched, single = [], []
    for _ in range(3):
        batched.append(_timed(model, flux, ivar, chunk=128))
        single.append(_timed(model, flux, ivar, chunk=1))
    a, b = model.test(flux, ivar, chunk=128), model.test(flux, ivar, chunk=1)
    np.testing.assert_allclose(a.labels, b.labels, rtol=1e-6, atol=1e-8)
    assert np.array_equal(a.flags, b.flags)
    # measured 0.65-0.7x on the three-label model (4x with four labels on the line model);
    # a guard against the batched path becoming the slower one, loose enough for a loaded machine
    assert min(batched) < 1.0 * min(single), (batched, single)


def _timed(model: CannonModel, flux: np.ndarray, ivar: np.ndarray, chunk: int) -> float:
    t0 = time.process_time()
    model.test(flux, ivar, chunk=chunk)
    return time.process_time() - t0


def test_hot_stars_fail_the_hydrogen_screen(fitted: dict) -> None:
    """The Brackett lines of most hot stars are deeper than the best cool-star model's, and of no
    giant or dwarf: fit_spectra flags HYDROGEN_LINES and writes no labels for them. In Synspec
    physics a fast-rotating hot star at S/N ~50 can hide its lines (excess 0.2-0.5 %), and then
    the fit lands outside the training hull: no hot star goes unflagged."""
    model, data, res = fitted["model"], fitted["data"], fitted["result"]
    wave = apstar_wavelength()
    caught = np.array([hydrogen.has_hot_star_lines(wave, data.flux[i], model.predict(res.labels[i]), data.ivar[i])
                       for i in range(data.snr.size)])
    hot = data.kind == "hot"
    assert caught[hot].mean() >= 0.5
    assert np.all(caught[hot] | (res.flags[hot] & (FLAGS["OUTSIDE_HULL"] | FLAGS["OUTSIDE_RANGE"]) != 0))
    assert not caught[np.isin(data.kind, ("giant", "dwarf"))].any()

    flux, ivar, flags, _labels, kind, snr = physical_spectra(4, seed=505, snr=80.0, kinds=("hot", "giant"))
    spectra = [Spectrum(wave, flux[i], ivar[i], flags[i], {"frame": "rest", "kind": "stack", "snr": float(snr[i])})
               for i in range(kind.size)]
    rows = fit_spectra(model, spectra)
    for k, row in zip(kind, rows, strict=True):
        screened = bool(row["bitmask_flag"] & FLAGS["HYDROGEN_LINES"])
        if k == "hot":
            assert screened or row["bitmask_flag"] & (FLAGS["OUTSIDE_HULL"] | FLAGS["OUTSIDE_RANGE"]), row
        else:
            assert not screened, row
        assert (row["teff"] is None) == screened and (row["u_logg"] is None) == screened
        assert row["r_chi_sq"] is not None


def test_fit_spectra_writes_no_cool_star_labels_for_most_hot_stars(cannon_model: CannonModel) -> None:
    """Through fit_spectra a hot star of the physical generator lands just outside the training
    hull with Brackett lines 0.3-1 % deeper than the model's; hull plus excess sets
    HYDROGEN_LINES and NULL labels (measured 35 of 48). Cool stars never get it."""
    wave = apstar_wavelength()
    rows, kinds = [], []
    for seed in range(700, 712):
        kind_set = ("hot",) if seed % 2 else ("giant", "dwarf")
        flux, ivar, flags, _labels, kind, snr = physical_spectra(3, seed=seed, snr=float(60 + 40 * (seed % 4)),
                                                                 kinds=kind_set)
        rows += fit_spectra(cannon_model, [
            Spectrum(wave, flux[i], ivar[i], flags[i], {"frame": "rest", "kind": "stack", "snr": float(snr[i])})
            for i in range(kind.size)])
        kinds += list(kind)
    kinds_arr = np.array(kinds)
    screened = np.array([bool(r["bitmask_flag"] & FLAGS["HYDROGEN_LINES"]) for r in rows])
    flagged = np.array([bool(r["bitmask_flag"] & (FLAGS["HYDROGEN_LINES"] | FLAGS["OUTSIDE_HULL"])) for r in rows])
    hot = kinds_arr == "hot"
    assert hot.sum() >= 5 and (~hot).sum() >= 10
    assert screened[hot].mean() >= 0.5, screened[hot]
    assert flagged[hot].all()
    assert not screened[~hot].any()
    assert all(r["teff"] is None for r, s in zip(rows, screened, strict=True) if s)
