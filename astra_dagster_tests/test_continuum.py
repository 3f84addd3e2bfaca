"""Pseudo-continuum normalisation shared by the label methods (astra_dagster.methods.continuum)."""

from __future__ import annotations

import numpy as np
import pytest

from astra_dagster.methods import continuum as cn
from astra_dagster.spectra import synth
from astra_dagster.spectra.bitmask import flag
from astra_dagster.spectra.spectrum import APSTAR_NPIX, Spectrum, apstar_wavelength

WAVE = apstar_wavelength()
CHIP = cn.chip_index()
STARS = [  # teff, logg, fe_h, alpha_m: a K giant, an M giant, a G dwarf, an M dwarf, a metal-poor giant
    (4600.0, 2.5, -0.1, 0.05), (3700.0, 1.0, -0.3, 0.1), (5700.0, 4.4, 0.1, 0.0),
    (3500.0, 4.8, 0.0, 0.0), (4900.0, 2.6, -1.6, 0.3),
]


@pytest.fixture(scope="module")
def normalised_truth() -> np.ndarray:
    """Noiseless release-like spectra normalised by their true continuum (n, 8575)."""
    return np.array([synth.synthesize(dict(zip(("teff", "logg", "fe_h", "alpha_m"), s, strict=True)), WAVE,
                                      synth.RELEASE_SETTINGS, fiber=100) for s in STARS])


def physical(norm: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multiply by a Planck-like continuum and a random smooth per-chip throughput."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(norm)
    for i, s in enumerate(STARS[:norm.shape[0]]):
        cont = synth.continuum({"teff": s[0], "logg": s[1], "fe_h": s[2], "alpha_m": s[3]}, WAVE)
        thr = np.ones(APSTAR_NPIX)
        for lo, hi in cn.CHIPS:
            x = np.linspace(-1, 1, hi - lo + 1)
            thr[lo:hi + 1] = np.exp(rng.normal(0, 0.1)) * (1 + rng.normal(0, 0.05) * x + rng.normal(0, 0.04) * x * x)
        out[i] = 830.0 * norm[i] * cont * thr
    return out, np.where(CHIP >= 0, 1e4, 0.0)[None, :] / out**2 * np.median(out, axis=1, keepdims=True) ** 2


def test_continuum_pixels_rule_is_deterministic_and_covers_every_chip() -> None:
    mask = cn.continuum_pixels()
    assert mask is cn.continuum_pixels()            # cached
    assert mask.shape == (APSTAR_NPIX,) and not mask.flags.writeable
    assert not mask[CHIP < 0].any()                # never in a gap
    for lo, hi in cn.CHIPS:
        chip = mask[lo:hi + 1]
        assert abs(chip.sum() - cn.SEGMENT_FRACTION * (hi - lo + 1)) <= cn.N_SEGMENTS
        # every tenth of the chip holds continuum pixels, so the polynomial is anchored at both ends
        assert all(seg.any() for seg in np.array_split(chip, cn.N_SEGMENTS))
    # chosen pixels really are near the continuum of the reference panel
    depth = 1.0 - cn._reference_panel()[:, mask]
    assert np.median(depth) < 0.01
    assert len(cn.continuum_fingerprint()) == 16


def test_physical_and_true_normalisation_agree(normalised_truth: np.ndarray) -> None:
    """The same star with and without a smooth continuum × throughput normalises to the same
    pseudo-continuum spectrum (so training spectra and data are treated identically)."""
    flux, ivar = physical(normalised_truth)
    a, ia = cn.normalize_arrays(WAVE, flux, ivar)
    b, _ = cn.normalize_arrays(WAVE, normalised_truth, np.where(CHIP >= 0, 1e8, 0.0)[None, :].repeat(len(STARS), 0))
    inside = CHIP >= 0
    diff = (a - b)[:, inside]
    assert np.sqrt(np.mean(diff**2)) < 3e-4
    assert np.abs(diff).max() < 5e-3
    # the pseudo-continuum sits just below the true one (no pixel is truly continuum)
    assert -0.03 < np.median(b[:, inside] - normalised_truth[:, inside]) < 0.02
    # ivar scales with the continuum squared: σ relative to the normalised flux is unchanged
    rel_in = 1.0 / np.sqrt(ivar[:, inside]) / flux[:, inside]
    rel_out = 1.0 / np.sqrt(ia[:, inside]) / a[:, inside]
    np.testing.assert_allclose(rel_out, rel_in, rtol=1e-10)
    # outside the chips: flux 1, ivar 0
    assert np.all(a[:, ~inside] == 1.0) and np.all(ia[:, ~inside] == 0.0)


def test_scale_invariance_and_noise(normalised_truth: np.ndarray) -> None:
    flux, ivar = physical(normalised_truth[:2], seed=3)
    a, _ = cn.normalize_arrays(WAVE, flux, ivar)
    b, _ = cn.normalize_arrays(WAVE, flux * 1e-5, ivar * 1e10)
    np.testing.assert_allclose(a, b, rtol=1e-9)
    rng = np.random.default_rng(1)
    noisy = flux + rng.normal(size=flux.shape) / np.sqrt(np.where(ivar > 0, ivar, 1.0))
    c, _ = cn.normalize_arrays(WAVE, noisy, ivar)
    for lo, hi in cn.CHIPS:
        # at S/N 100 the continuum level of a chip moves by ~1/(100 √N_cont) ≈ 1e-3, not more
        assert abs(np.mean(c[:, lo:hi + 1] - a[:, lo:hi + 1])) < 3e-3


def test_bad_pixels_and_unflagged_spikes(normalised_truth: np.ndarray) -> None:
    flux, ivar = physical(normalised_truth[:1])
    clean, _ = cn.normalize_arrays(WAVE, flux, ivar)
    flags = np.zeros(flux.shape, dtype=np.int64)
    cont_px = np.flatnonzero(cn.continuum_pixels())
    flags[0, cont_px[::7]] = flag("BADPIX")             # flagged garbage on continuum pixels
    flux2 = flux.copy()
    flux2[0, cont_px[::7]] *= 3.0
    spikes = cont_px[3::11]
    flux2[0, spikes] *= 1.5                             # unflagged spikes (cosmic rays, sky residuals)
    flux2[0, 5000] = np.nan
    fit = cn.fit_continuum(WAVE, flux2, ivar, flags)
    norm, nivar = fit.apply(flux2, ivar)
    assert fit.flags[0] == 0
    assert np.all(nivar[0, cont_px[::7]] == 0.0)        # masked by bit
    assert nivar[0, 5000] == 0.0 and norm[0, 5000] == 1.0   # NaN flux: masked, filled
    # every spike was clipped: the fit used exactly the unflagged, unspiked continuum pixels
    usable = cn.continuum_pixels() & (flags[0] == 0)
    usable[spikes] = False
    per_chip = [int(usable[lo:hi + 1].sum()) for lo, hi in cn.CHIPS]
    assert fit.n_continuum[0].tolist() == per_chip
    good = (CHIP >= 0) & (flags[0] == 0)
    good[spikes] = False
    good[5000] = False
    # losing a seventh of the continuum pixels moves the pseudo-continuum by < 0.3 % at worst
    assert np.abs(norm[0, good] - clean[0, good]).max() < 3e-3
    assert np.sqrt(np.mean((norm[0, good] - clean[0, good]) ** 2)) < 1e-3
    # a custom mask: SIG_SKYLINE is not bad by default but can be
    sky = np.zeros_like(flags)
    sky[0, 1000:1010] = flag("SIG_SKYLINE")
    assert cn.normalize_arrays(WAVE, flux, ivar, sky)[1][0, 1005] > 0
    assert cn.normalize_arrays(WAVE, flux, ivar, sky, mask=flag("SIG_SKYLINE"))[1][0, 1005] == 0


def test_chip_without_continuum_is_flagged_not_fitted(normalised_truth: np.ndarray) -> None:
    flux, ivar = physical(normalised_truth[:2])
    flags = np.zeros(flux.shape, dtype=np.int64)
    lo, hi = cn.CHIPS[1]
    flags[0, lo:hi - 200] = flag("BADPIX")              # most of the green chip of star 0
    norm, nivar, cflags = cn.normalize_arrays(WAVE, flux, ivar, flags, return_flags=True)
    assert cflags.tolist() == [cn.CHIP_FLAGS["green"], 0]
    assert cn.failed_chips(cflags[0]) == ["green"]
    assert np.all(nivar[0, lo:hi + 1] == 0.0) and np.all(norm[0, lo:hi + 1] == 1.0)
    blue = slice(cn.CHIPS[0][0], cn.CHIPS[0][1] + 1)
    assert np.all(nivar[0, blue] > 0) and np.all(nivar[1, lo:hi + 1] > 0)
    # a spectrum with nothing usable: every chip flagged, no exception
    _, ivar0, f0 = cn.normalize_arrays(WAVE, flux[:1], np.zeros_like(ivar[:1]), return_flags=True)
    assert f0[0] == 7 and not ivar0.any()


def test_normalize_spectrum_and_bad_input(normalised_truth: np.ndarray) -> None:
    flux, ivar = physical(normalised_truth[:1])
    spec = Spectrum(WAVE, flux[0], ivar[0], np.zeros(APSTAR_NPIX, dtype=np.int64),
                    {"frame": "rest", "path": "apStar-x.fits", "snr": 100.0})
    out = cn.normalize(spec)
    np.testing.assert_allclose(out.flux, cn.normalize_arrays(WAVE, flux, ivar)[0][0])
    assert out.meta["continuum_flags"] == 0 and out.meta["normalized"] is True
    assert out.meta["snr"] == 100.0 and "normalized" not in spec.meta   # copy, input untouched
    with pytest.raises(ValueError, match=r"apStar-x\.fits.*rest-frame"):
        cn.normalize(Spectrum(WAVE, flux[0], ivar[0], np.zeros(APSTAR_NPIX), {"frame": "observed",
                                                                              "path": "apStar-x.fits"}))
    shifted = WAVE * (1 + 30.0 / 299792.458)
    with pytest.raises(ValueError, match="not the rest-frame apStar grid"):
        cn.normalize(Spectrum(shifted, flux[0], ivar[0], np.zeros(APSTAR_NPIX), {"path": "apVisit-y.fits"}))
    with pytest.raises(ValueError, match="8575-pixel apStar grid"):
        cn.normalize_arrays(WAVE[:100], flux[:, :100], ivar[:, :100])
    with pytest.raises(ValueError, match="pixel_flags"):
        cn.normalize_arrays(WAVE, flux, ivar, np.zeros(10))
