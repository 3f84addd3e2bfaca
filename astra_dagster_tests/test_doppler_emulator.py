"""Emulator building blocks: polynomial Jacobian, Cannon training, persistence, wavelength
conversion, template conversion and the numpy-only unpickler (no network needed)."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest

from astra_dagster.methods.doppler.emulator import (
    APOGEE_RESOLUTION,
    TEMPLATE_LOG10_STEP,
    Emulator,
    EmulatorError,
    _NumpyOnlyUnpickler,
    air_to_vacuum,
    convert_cannon_model,
    cubic_exponents,
    read_cannon_pickle,
    template_log10_grid,
    train_cannon,
    vacuum_to_air,
)
from astra_dagster.spectra.spectrum import APSTAR_CDELT1, APSTAR_CRVAL1, C_KMS, apstar_wavelength
from astra_dagster.spectra.toy_templates import toy_emulator, toy_flux


def _random_emulator(seed: int = 0, n_pix: int = 50) -> Emulator:
    rng = np.random.default_rng(seed)
    return Emulator(
        name="random", log10_start=4.2, log10_step=TEMPLATE_LOG10_STEP,
        theta=rng.normal(size=(n_pix, 20)), exponents=cubic_exponents(),
        fiducials=np.array([4500.0, 2.5, -0.3]), scales=np.array([1500.0, 3.0, 1.5]),
        ranges=np.array([[3500.0, 6500.0], [0.0, 5.0], [-2.0, 0.5]]),
    )


def test_cubic_exponents_are_the_20_monomials_of_degree_up_to_three() -> None:
    e = cubic_exponents()
    assert e.shape == (20, 3)
    assert len({tuple(r) for r in e}) == 20
    assert tuple(e[0]) == (0, 0, 0)
    assert set(e.sum(axis=1)) == {0, 1, 2, 3}


def test_flux_and_jacobian_match_finite_differences() -> None:
    em = _random_emulator()
    labels = np.array([4800.0, 3.1, -0.7])
    flux, jac = em.flux_and_jacobian(labels)
    assert np.allclose(flux, em.flux(labels))
    steps = np.array([0.5, 1e-4, 1e-4])
    for k in range(3):
        dp = np.zeros(3)
        dp[k] = steps[k]
        numeric = (em.flux(labels + dp) - em.flux(labels - dp)) / (2 * steps[k])
        assert np.allclose(jac[:, k], numeric, rtol=1e-5, atol=1e-9)
    # Many label triples at once give the same rows as one at a time.
    many = np.array([[4000.0, 1.0, -1.0], [6000.0, 4.0, 0.2]])
    assert np.allclose(em.flux(many)[1], em.flux(many[1]))


def test_train_cannon_recovers_an_exact_cubic_model() -> None:
    truth = _random_emulator(seed=3, n_pix=40)
    rng = np.random.default_rng(4)
    labels = np.column_stack([rng.uniform(3500, 6500, 200), rng.uniform(0, 5, 200),
                              rng.uniform(-2, 0.5, 200)])
    flux = truth.flux(labels)
    model = train_cannon(flux, labels, name="t", log10_start=4.2, log10_step=TEMPLATE_LOG10_STEP,
                         ridge=0.0)
    test = np.array([[4100.0, 1.7, -1.2], [6300.0, 4.6, 0.4]])
    assert np.allclose(model.flux(test), truth.flux(test), atol=1e-8)
    assert np.all(model.s2 < 1e-15)
    assert model.ranges[0, 0] == pytest.approx(labels[:, 0].min())
    # Noisy training with per-pixel ivar: s2 measures only scatter beyond the noise.
    noisy = flux + rng.normal(0, 0.01, flux.shape)
    model2 = train_cannon(noisy, labels, name="t", log10_start=4.2, log10_step=TEMPLATE_LOG10_STEP,
                          ivar=np.full(flux.shape, 1e4))
    assert np.max(np.abs(model2.flux(test) - truth.flux(test))) < 0.02
    assert np.median(model2.s2) < 2e-5


def test_train_cannon_rejects_bad_training_sets() -> None:
    with pytest.raises(EmulatorError, match="too few"):
        train_cannon(np.ones((10, 5)), np.ones((10, 3)), name="x", log10_start=4.2, log10_step=1e-6)
    bad = np.ones((50, 5))
    bad[3, 2] = np.nan
    with pytest.raises(EmulatorError, match="non-finite"):
        train_cannon(bad, np.random.default_rng(0).normal(size=(50, 3)), name="x",
                     log10_start=4.2, log10_step=1e-6)


def test_save_and_load_round_trip(tmp_path) -> None:
    em = _random_emulator()
    em.s2 = np.linspace(0, 1e-4, em.n_pixels)
    em.meta["note"] = "round trip"
    path = em.save(tmp_path / "em.npz")
    back = Emulator.load(path)
    assert back.name == em.name and back.meta == em.meta
    assert np.array_equal(back.theta, em.theta) and np.array_equal(back.s2, em.s2)
    assert np.allclose(back.wavelength, em.wavelength)
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(EmulatorError, match=r"junk\.npz"):
        Emulator.load(tmp_path / "junk.npz")


def test_template_grid_is_phased_with_the_apstar_grid() -> None:
    start, n = template_log10_grid()
    grid = start + TEMPLATE_LOG10_STEP * np.arange(n)
    assert 10 ** grid[0] <= 14950.0 and 10 ** grid[-1] >= 17150.0
    # Every apStar pixel is exactly every third template pixel.
    k = (np.log10(apstar_wavelength()) - start) / TEMPLATE_LOG10_STEP
    assert np.allclose(k, np.round(k), atol=1e-6)
    assert np.all(np.round(k).astype(int) % 3 == round((APSTAR_CRVAL1 - start) / TEMPLATE_LOG10_STEP) % 3)
    assert pytest.approx(APSTAR_CDELT1) == TEMPLATE_LOG10_STEP * 3


def test_air_vacuum_conversion() -> None:
    # n(air) at 1.6 µm is 1.000273: vacuum wavelengths are ~4.37 Å (82 km/s) longer.
    vac = air_to_vacuum(np.array([15000.0, 16000.0, 17000.0]))
    shift_kms = (vac / np.array([15000.0, 16000.0, 17000.0]) - 1) * C_KMS
    assert np.all((shift_kms > 81.5) & (shift_kms < 82.3))
    lam = np.linspace(15000, 17000, 11)
    assert np.allclose(air_to_vacuum(vacuum_to_air(lam)), lam, atol=1e-8)


def test_convert_cannon_model_shifts_to_vacuum_and_convolves_to_apogee_resolution() -> None:
    # One Gaussian-free "line": a narrow box in the constant term at 16000 Å (air).
    disp = np.arange(14000.0, 18000.0, 0.1)
    theta = np.zeros((disp.size, 20))
    theta[:, 0] = 1.0
    line = np.abs(disp - 16000.0) < 0.05
    theta[line, 0] = 0.0
    labels = np.column_stack([np.linspace(3500, 8000, 30), np.linspace(0, 5, 30), np.linspace(-2, 0.5, 30)])
    terms = [[(i, 1)] for i in range(3)] + [[(0, 2.0)]] * 16
    data = {"theta": theta, "dispersion": disp, "wavevac": False,
            "vectorizer": ("PolynomialVectorizer", {"terms": terms}), "training_set_labels": labels}
    em = convert_cannon_model(data, "box")
    flux = em.flux(labels[0])
    depth = 1 - flux
    centre = np.sum(em.wavelength * depth) / np.sum(depth)
    assert centre == pytest.approx(air_to_vacuum(np.array([16000.0]))[0], abs=0.02)
    # Second moment of the convolved line: the LSF σ (the 0.1 Å box adds ~0.03 Å in quadrature).
    sigma = np.sqrt(np.sum(depth * (em.wavelength - centre) ** 2) / np.sum(depth))
    expected = centre / APOGEE_RESOLUTION / 2.3548
    assert sigma == pytest.approx(expected, rel=0.02)
    # Equivalent width is conserved by the convolution (0.1 Å box).
    ew = np.sum(depth * np.gradient(em.wavelength))
    assert ew == pytest.approx(0.1 * 1.000273, rel=0.05)
    assert em.exponents.shape == (20, 3)
    assert np.allclose(em.ranges[:, 0], labels.min(axis=0))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unpickler_only_allows_numpy_arrays(tmp_path) -> None:
    good = {"theta": np.arange(6.0).reshape(3, 2), "vectorizer": ("PolynomialVectorizer", {"terms": []}),
            "x": np.float64(2.5)}
    path = tmp_path / "good.pkl"
    path.write_bytes(pickle.dumps(good, protocol=2))
    back = read_cannon_pickle(path)
    assert np.array_equal(back["theta"], good["theta"]) and back["x"] == 2.5
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"theta": _Evil()}))
    with pytest.raises(EmulatorError, match=r"posix\.system|os\.system|nt\.system"):
        read_cannon_pickle(evil)
    # numpy 1.x pickles name numpy.core.multiarray; it is mapped to numpy._core.
    cls = _NumpyOnlyUnpickler(io.BytesIO(b"")).find_class("numpy.core.multiarray", "_reconstruct")
    assert cls is np._core.multiarray._reconstruct
    not_model = tmp_path / "list.pkl"
    not_model.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(EmulatorError, match="not a Cannon model"):
        read_cannon_pickle(not_model)


def test_toy_emulator_reproduces_its_line_list() -> None:
    em = toy_emulator()
    for labels in ([4000.0, 1.0, -1.5], [6000.0, 4.5, 0.3]):
        lab = np.array(labels)
        assert np.max(np.abs(em.flux(lab) - toy_flux(em.wavelength, lab))) < 0.01
    coarse = em.coarse_labels()
    assert len(coarse) >= 5
    assert np.all(coarse >= em.ranges[:, 0]) and np.all(coarse <= em.ranges[:, 1])
