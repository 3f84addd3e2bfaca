"""The Doppler-style RV fit on analytic toy spectra (no network): accuracy, error calibration,
the per-star joint fit, barycentric corrections and bad input."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from astra_dagster.methods.doppler import (
    FATAL_FLAGS,
    DopplerError,
    DopplerFlag,
    StarRV,
    VisitRV,
    barycentric_correction,
    fit_star,
    fit_visit,
)
from astra_dagster.spectra.bitmask import flag
from astra_dagster.spectra.spectrum import Spectrum
from astra_dagster.spectra.toy_templates import toy_emulator, toy_visit


@pytest.fixture(scope="module")
def emulator():
    return toy_emulator()


def _labels(rng: np.random.Generator) -> np.ndarray:
    return np.array([rng.uniform(3800, 6200), rng.uniform(0.5, 4.5), rng.uniform(-1.5, 0.3)])


@pytest.mark.parametrize(("snr", "max_rms"), [(20, 0.1), (60, 0.05)])
def test_rv_accuracy_and_error_calibration(emulator, snr: float, max_rms: float) -> None:
    rng = np.random.default_rng(int(snr))
    dv, pulls, dlab = [], [], []
    for i in range(30):
        labels = _labels(rng)
        v = float(rng.normal(0, 150))
        result = fit_visit(toy_visit(labels, v, snr, rng, continuum_seed=i), emulator)
        assert result.ok, result.to_dict()
        dv.append(result.vrel - v)
        pulls.append((result.vrel - v) / result.u_vrel)
        dlab.append([result.teff - labels[0], result.logg - labels[1], result.fe_h - labels[2]])
    dv_arr, dlab_arr = np.array(dv), np.array(dlab)
    assert np.sqrt(np.mean(dv_arr**2)) < max_rms
    assert 0.7 < np.std(pulls) < 1.5
    rms = np.sqrt(np.mean(dlab_arr**2, axis=0))
    assert rms[0] < 150 and rms[1] < 0.25 and rms[2] < 0.15


def test_visit_result_fields(emulator) -> None:
    rng = np.random.default_rng(3)
    spec = toy_visit(np.array([4600.0, 2.4, -0.3]), -37.0, 80, rng, bc=12.5)
    result = fit_visit(spec, emulator)
    assert isinstance(result, VisitRV)
    assert result.flags == 0 and result.flag_names == []
    assert result.vrel == pytest.approx(-37.0, abs=0.1)
    assert result.bc == 12.5 and result.vhelio == pytest.approx(result.vrel + 12.5)
    assert 0 < result.u_vrel < 0.1 and result.u_teff > 0 and result.u_logg > 0 and result.u_fe_h > 0
    assert result.snr == 80 and 0.7 < result.chisq < 1.3
    assert result.template == "toy" and result.n_pixels > 8000
    assert abs(result.ccf_vrel + 37.0) < 2.0
    d = result.to_dict()
    assert d["vhelio"] == result.vhelio and d["flag_names"] == []


def test_large_velocities_within_the_search_range(emulator) -> None:
    rng = np.random.default_rng(11)
    for v in (-870.0, 640.0):
        result = fit_visit(toy_visit(np.array([4500.0, 2.0, -0.5]), v, 50, rng), emulator)
        assert result.ok and result.vrel == pytest.approx(v, abs=0.15)


def test_fit_star_joint_labels_and_mean_velocity(emulator) -> None:
    rng = np.random.default_rng(5)
    labels = np.array([4700.0, 2.6, -0.4])
    v_bary = 23.4
    bcs = [-21.0, 3.0, 17.5, 28.0]
    visits = [toy_visit(labels, v_bary - bc, snr, rng, bc=bc, continuum_seed=k)
              for k, (bc, snr) in enumerate(zip(bcs, (30, 45, 60, 25), strict=True))]
    star = fit_star(visits, emulator)
    assert isinstance(star, StarRV)
    assert star.n_visits == 4 and star.n_good_visits == 4
    assert star.vhelio == pytest.approx(v_bary, abs=4 * star.u_vhelio)
    assert star.u_vhelio < 0.05
    assert 0 <= star.vscatter < 0.2
    for visit, bc in zip(star.visits, bcs, strict=True):
        assert visit.teff == star.teff and visit.bc == bc
        assert visit.vrel == pytest.approx(v_bary - bc, abs=5 * visit.u_vrel)
    # Common labels from all visits beat a single S/N 25 visit's error.
    single = fit_visit(visits[3], emulator)
    assert star.u_teff < single.u_teff
    assert abs(star.teff - labels[0]) < 4 * star.u_teff + 30
    assert abs(star.logg - labels[1]) < 0.1 and abs(star.fe_h - labels[2]) < 0.05


def test_fit_star_keeps_bad_visits_flagged(emulator) -> None:
    rng = np.random.default_rng(6)
    labels = np.array([4300.0, 1.8, -0.2])
    good = [toy_visit(labels, 10.0, 50, rng, continuum_seed=k) for k in range(2)]
    dead = toy_visit(labels, 10.0, 50, rng)
    dead.ivar[:] = 0.0
    star = fit_star([*good, dead], emulator)
    assert star.n_visits == 3 and star.n_good_visits == 2
    assert math.isnan(star.visits[2].vrel) and star.visits[2].flags & DopplerFlag.LOW_GOOD_PIXELS
    assert star.vhelio == pytest.approx(10.0, abs=0.1)
    none = fit_star([dead], emulator)
    assert math.isnan(none.vhelio) and none.flags & DopplerFlag.NO_GOOD_VISITS
    with pytest.raises(DopplerError, match="at least one visit"):
        fit_star([], emulator)


def test_barycentric_correction_offline_matches_the_drp() -> None:
    # apVisit-r13-9518-57729-104 (APO 2.5 m): header BC = -14.5807887971 km/s.
    bc = barycentric_correction(6.111105, 53.688282, 2457729.70782, "apo25m")
    assert bc == pytest.approx(-14.5808, abs=0.02)
    # The same star seen from LCO at the same instant differs by the diurnal term only.
    lco = barycentric_correction(6.111105, 53.688282, 2457729.70782, "lco25m")
    assert 0.001 < abs(lco - bc) < 0.5
    with pytest.raises(DopplerError, match="telescope"):
        barycentric_correction(6.1, 53.7, 2457729.7, "keck")


def test_bc_computed_when_missing_and_rest_frame_inputs(emulator) -> None:
    rng = np.random.default_rng(8)
    spec = toy_visit(np.array([4600.0, 2.4, -0.3]), 5.0, 60, rng, bc=None)
    spec.meta.update(ra=6.111105, dec=53.688282, jd=2457729.70782)
    result = fit_visit(spec, emulator)
    assert result.flags & DopplerFlag.BC_COMPUTED
    assert result.bc == pytest.approx(-14.5808, abs=0.02)
    assert result.vhelio == pytest.approx(result.vrel + result.bc)
    no_coords = toy_visit(np.array([4600.0, 2.4, -0.3]), 5.0, 60, rng, bc=None)
    result = fit_visit(no_coords, emulator)
    assert result.flags & DopplerFlag.NO_BC and math.isnan(result.vhelio) and result.ok
    rest = toy_visit(np.array([4600.0, 2.4, -0.3]), 0.3, 60, rng, bc=7.0)
    rest.meta["frame"] = "rest"
    result = fit_visit(rest, emulator)
    assert result.flags & DopplerFlag.REST_FRAME
    assert result.bc == 0.0 and result.vhelio == result.vrel
    assert result.vrel == pytest.approx(0.3, abs=0.1)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _spec(rng: np.random.Generator, v: float = 20.0, snr: float = 50) -> Spectrum:
    return toy_visit(np.array([4500.0, 2.2, -0.4]), v, snr, rng)


def test_too_few_good_pixels_gives_a_flagged_nan_result(emulator) -> None:
    rng = np.random.default_rng(20)
    spec = _spec(rng)
    spec.pixel_flags[300:] |= flag("BADPIX")
    result = fit_visit(spec, emulator)
    assert result.flags & DopplerFlag.LOW_GOOD_PIXELS and not result.ok
    assert all(math.isnan(getattr(result, k)) for k in ("vrel", "u_vrel", "teff", "logg", "fe_h", "vhelio"))
    assert "usable pixels" in result.message and "toy[0]" in result.message


def test_a_fully_masked_chip_is_flagged_and_the_rest_still_fitted(emulator) -> None:
    rng = np.random.default_rng(21)
    spec = _spec(rng)
    a, b = spec.meta["chip_slices"][1]
    spec.ivar[a:b] = 0.0
    result = fit_visit(spec, emulator)
    assert result.flags & DopplerFlag.CHIP_MASKED and result.ok
    assert result.vrel == pytest.approx(20.0, abs=0.15)
    # Masking with the Doppler bitmask (SIG_SKYLINE is in it) works the same way.
    spec = _spec(rng)
    spec.pixel_flags[a:b] |= flag("SIG_SKYLINE")
    result = fit_visit(spec, emulator)
    assert result.flags & DopplerFlag.CHIP_MASKED and result.vrel == pytest.approx(20.0, abs=0.15)


def test_non_finite_values_are_masked_and_flagged(emulator) -> None:
    rng = np.random.default_rng(22)
    spec = _spec(rng)
    spec.flux[::37] = np.nan
    spec.ivar[5::41] = np.inf
    result = fit_visit(spec, emulator)
    assert result.flags & DopplerFlag.NONFINITE_INPUT and result.ok
    assert result.vrel == pytest.approx(20.0, abs=0.15) and np.isfinite(result.chisq)
    # NaN in pixels that already carry no weight (apStar chip gaps) is not bad input.
    gaps = _spec(rng)
    gaps.flux[:200] = np.nan
    gaps.ivar[:200] = 0.0
    assert not fit_visit(gaps, emulator).flags & DopplerFlag.NONFINITE_INPUT
    spec.flux[:] = np.nan
    result = fit_visit(spec, emulator)
    assert result.flags & DopplerFlag.LOW_GOOD_PIXELS and math.isnan(result.vrel)


def test_correlation_peak_at_the_edge_of_the_search_range(emulator) -> None:
    rng = np.random.default_rng(23)
    result = fit_visit(_spec(rng, v=150.0), emulator, vrange=100.0)
    assert result.flags & DopplerFlag.CCF_EDGE and not result.ok
    assert math.isnan(result.vrel) and "edge" in result.message
    # The same star inside the range is fine.
    assert fit_visit(_spec(rng, v=90.0), emulator, vrange=100.0).vrel == pytest.approx(90.0, abs=0.2)


def test_noise_only_spectrum_has_no_signal(emulator) -> None:
    rng = np.random.default_rng(24)
    spec = _spec(rng)
    spec.flux[:] = 900.0 + rng.normal(0, 900.0 / 50, spec.n_pixels)
    result = fit_visit(spec, emulator)
    assert result.flags & DopplerFlag.NO_SIGNAL and math.isnan(result.vrel)
    assert result.flags & FATAL_FLAGS


def test_outliers_are_rejected(emulator) -> None:
    rng = np.random.default_rng(25)
    spec = _spec(rng, snr=80)
    spikes = rng.choice(spec.n_pixels, 60, replace=False)
    spec.flux[spikes] *= 3.0  # sky-line-like residuals, unflagged
    spec.flux[spikes[:20] + 1] *= 0.2  # and some deep unflagged dropouts
    result = fit_visit(spec, emulator)
    assert result.ok and result.vrel == pytest.approx(20.0, abs=0.1) and result.chisq < 1.5


def test_unusable_input_raises_dopplererror(emulator) -> None:
    rng = np.random.default_rng(26)
    with pytest.raises(DopplerError, match="expected a Spectrum"):
        fit_visit(np.ones(10), emulator)
    boss = Spectrum(np.linspace(3600, 10000, 4000), np.ones(4000), np.ones(4000), np.zeros(4000))
    with pytest.raises(DopplerError, match="outside the templates"):
        fit_visit(boss, emulator)
    spec = _spec(rng)
    spec.wavelength[10] = spec.wavelength[9]
    with pytest.raises(DopplerError, match="increase"):
        fit_visit(spec, emulator)
    with pytest.raises(DopplerError, match="Emulator"):
        fit_visit(_spec(rng), [])
    with pytest.raises(DopplerError, match="vrange"):
        fit_visit(_spec(rng), emulator, vrange=-5)


# --------------------------------------------------------------------------------------------
# RVs the fit does not trust (issue #11): BAD_RV, NaN velocity, the reason in the message
# --------------------------------------------------------------------------------------------

def test_rv_doubt_thresholds() -> None:
    from astra_dagster.methods.doppler.fit import _rv_doubts

    # Fitted RV vs the CCF peak: beyond max(10 km/s, 5σ of the peak).
    assert _rv_doubts(9.9, 0.0, 0.1, 1.0, 100.0) == 0
    assert _rv_doubts(10.1, 0.0, 0.1, 1.0, 100.0) == DopplerFlag.CCF_MISMATCH
    assert _rv_doubts(30.0, 0.0, 8.0, 1.0, 100.0) == 0  # a broad-lined star's wide peak
    assert _rv_doubts(41.0, 0.0, 8.0, 1.0, 100.0) == DopplerFlag.CCF_MISMATCH
    # Residuals beyond the noise: √(χ² − 1)/S/N above 5 % of the continuum; a high χ² from a
    # bright star's small template mismatch is not one.
    assert _rv_doubts(0.0, 0.0, 0.1, 60.0, 300.0) == 0  # 2.6 %
    assert _rv_doubts(0.0, 0.0, 0.1, 2.1, 20.0) == DopplerFlag.POOR_MATCH  # 5.2 %
    assert _rv_doubts(0.0, 0.0, 0.1, 50.0, math.nan) == 0  # no S/N: not judged
    # Far from the coarse peak but at the fitted template's own peak (a hot star the coarse
    # grid's nearest template correlates 20 km/s off): no mismatch; the own peak is computed
    # only when the coarse one disagrees.
    calls: list[int] = []

    def own(v: float) -> Callable[[], tuple[float, float] | None]:
        def peak() -> tuple[float, float] | None:
            calls.append(1)
            return (v, 2.0)
        return peak

    assert _rv_doubts(20.0, 0.0, 2.0, 1.0, 100.0, own(17.0)) == 0
    assert _rv_doubts(20.0, 0.0, 2.0, 1.0, 100.0, own(-5.0)) == DopplerFlag.CCF_MISMATCH
    assert _rv_doubts(20.0, 0.0, 2.0, 1.0, 100.0, lambda: None) == DopplerFlag.CCF_MISMATCH
    calls.clear()
    assert _rv_doubts(5.0, 0.0, 2.0, 1.0, 100.0, own(50.0)) == 0 and not calls


def test_hot_family_is_rendered_slower_than_hot_stars() -> None:
    """A fit can broaden a template, never sharpen it: the hot family's training stars rotate
    slower than the release's hot stars (20-220 km/s), not at the generator's 120 km/s."""
    from astra_dagster.methods.doppler.templates import (
        HOT_TEMPLATE_VSINI,
        _slow_hot_training_set,
        _training_grid,
        generator_training_settings,
    )

    _, wave = _training_grid()
    ts = _slow_hot_training_set(2, 1, generator_training_settings(), wave)
    assert np.all(ts.labels["vsini"] == HOT_TEMPLATE_VSINI) and HOT_TEMPLATE_VSINI < 20.0
    assert np.all(ts.labels["teff"] >= 8000.0) and np.all(np.isfinite(ts.flux))


@pytest.fixture(scope="module")
def shifting_emulator():
    """Toy templates whose lines move 1.5 km/s per dex of logg (a gravitational redshift the
    family has, over logg 2-3 only): a star beyond logg 3 pinned there has its RV pulled."""
    from astra_dagster.methods.doppler import TEMPLATE_LOG10_STEP, template_log10_grid, train_cannon
    from astra_dagster.spectra.toy_templates import TOY_RANGES, toy_flux

    start, n = template_log10_grid()
    wave = 10 ** (start + TEMPLATE_LOG10_STEP * np.arange(n))
    ranges = TOY_RANGES.copy()
    ranges[1] = (2.0, 3.0)
    rng = np.random.default_rng(7)
    labels = np.column_stack([rng.uniform(*ranges[i], 120) for i in range(3)])
    flux = np.array([toy_flux(wave, lab, _SHIFT_PER_DEX * (lab[1] - 2.5)) for lab in labels])
    return train_cannon(flux, labels, name="toy-shift", log10_start=start, log10_step=TEMPLATE_LOG10_STEP,
                        ranges=ranges, meta={"source": "toy"})


_SHIFT_PER_DEX = 1.5


def _shifting_visit(logg: float, v: float, snr: float, rng: np.random.Generator, **kw) -> Spectrum:
    """A star at ``v`` in the shifting family's frame: its lines sit a further shift(logg)."""
    return toy_visit(np.array([5000.0, logg, -0.3]), v + _SHIFT_PER_DEX * (logg - 2.5), snr, rng, **kw)


def test_a_pinned_label_the_rv_does_not_depend_on_keeps_the_velocity(emulator) -> None:
    # [Fe/H] = +0.9 lies beyond the toy templates' +0.5: the fit ends on the limit, but the
    # toy lines do not move with [Fe/H], so the RV is as good as a minimum's: a warning only.
    spec = toy_visit(np.array([5000.0, 2.5, 0.9]), 40.0, 100, np.random.default_rng(5))
    result = fit_visit(spec, emulator)
    assert result.flags & DopplerFlag.LABEL_AT_EDGE and result.ok
    assert not result.flags & (DopplerFlag.EDGE_RV | DopplerFlag.BAD_RV)
    assert result.fe_h == pytest.approx(0.5) and abs(result.vrel - 40.0) < 4 * result.u_vrel
    # The joint fit over visits judges its common labels the same way, visit by visit.
    rng = np.random.default_rng(9)
    visits = [toy_visit(np.array([5000.0, 2.5, 0.9]), v, 80, rng, continuum_seed=i)
              for i, v in enumerate((-20.0, 15.0))]
    star = fit_star(visits, emulator)
    assert star.n_good_visits == 2 and star.flags & DopplerFlag.LABEL_AT_EDGE and np.isfinite(star.vhelio)
    for visit, v in zip(star.visits, (-20.0, 15.0), strict=True):
        assert visit.ok and visit.flags & DopplerFlag.LABEL_AT_EDGE and abs(visit.vrel - v) < 4 * visit.u_vrel


def test_a_pinned_label_the_rv_depends_on_rejects_the_rv(shifting_emulator) -> None:
    from astra_dagster.methods.doppler.fit import _edge_rv_shift

    # Inside the range the fit is a minimum: no flag, the RV at the truth.
    inside = fit_visit(_shifting_visit(2.7, 40.0, 100, np.random.default_rng(5)), shifting_emulator)
    assert inside.flags == 0 and abs(inside.vrel - 40.0) < 4 * inside.u_vrel
    # logg 3.6 pins at 3.0 and the RV takes up the rest of the shift (0.9 km/s, ~30σ).
    spec = _shifting_visit(3.6, 40.0, 100, np.random.default_rng(5))
    result = fit_visit(spec, shifting_emulator)
    assert result.flags & DopplerFlag.LABEL_AT_EDGE and result.flags & DopplerFlag.EDGE_RV
    assert result.flags & DopplerFlag.BAD_RV and not result.ok and result.flags & FATAL_FLAGS
    assert all(math.isnan(getattr(result, k)) for k in ("vrel", "u_vrel", "vhelio", "teff", "fe_h"))
    assert "rejected" in result.message and "limit of the toy-shift templates" in result.message
    assert "the RV depends on them" in result.message
    assert np.isfinite(result.chisq) and np.isfinite(result.ccf_vrel)
    # The checks can be left out (the error-floor calibration does): the fit itself is kept.
    kept = fit_visit(spec, shifting_emulator, reject_doubtful=False)
    assert kept.flags & DopplerFlag.LABEL_AT_EDGE and not kept.flags & (DopplerFlag.BAD_RV | DopplerFlag.EDGE_RV)
    assert kept.ok and kept.logg == pytest.approx(3.0) and kept.vrel - 40.0 > 10 * kept.u_vrel
    # The rule itself: the RV's regression on the pinned label × how far beyond the limit the
    # unconstrained minimum lies (at least 3σ), in σ_v.
    cov = np.eye(4)
    cov[1, 3] = cov[3, 1] = 0.9 * 0.05 * 0.03  # corr 0.9, σ_logg 0.05, σ_v 0.03
    cov[1, 1], cov[3, 3] = 0.05**2, 0.03**2
    labels = np.array([5000.0, 3.0, -0.3])
    u = np.array([10.0, 0.05, 0.01])
    slope = 0.9 * 0.03 / 0.05  # km/s per dex
    assert _edge_rv_shift(shifting_emulator, labels, cov, 3, u, 0.03) == pytest.approx(slope * 0.15 / 0.03)
    outward = np.array([0.0, 0.6, 0.0, 0.0])
    assert _edge_rv_shift(shifting_emulator, labels, cov, 3, u, 0.03, outward) == pytest.approx(slope * 0.6 / 0.03)
    # a step back into the range says nothing about how far beyond: the 3σ floor
    assert _edge_rv_shift(shifting_emulator, labels, cov, 3, u, 0.03, -outward) == pytest.approx(slope * 0.15 / 0.03)
    cov[1, 3] = cov[3, 1] = 0.0
    assert _edge_rv_shift(shifting_emulator, labels, cov, 3, u, 0.03, outward) == 0.0
    assert _edge_rv_shift(shifting_emulator, np.array([5000.0, 2.5, -0.3]), cov, 3, u, 0.03) == 0.0


def test_residuals_far_beyond_the_noise_reject_the_rv(emulator) -> None:
    from astra_dagster.spectra.toy_templates import toy_flux

    # A bright companion's lines (an SB2 the templates cannot describe), S/N 300.
    spec = toy_visit(np.array([5000.0, 2.5, -0.5]), 40.0, 300, np.random.default_rng(6))
    companion = toy_flux(spec.wavelength, np.array([4200.0, 1.5, 0.3]), 290.0) ** 2
    blend = Spectrum(spec.wavelength, spec.flux * companion, spec.ivar / companion**2,
                     spec.pixel_flags, spec.meta)
    result = fit_visit(blend, emulator)
    assert result.flags & DopplerFlag.POOR_MATCH and result.flags & DopplerFlag.BAD_RV
    assert math.isnan(result.vhelio) and "of the continuum beyond the noise" in result.message


def test_fit_star_with_every_visit_rejected(shifting_emulator) -> None:
    rng = np.random.default_rng(9)
    visits = [_shifting_visit(3.6, v, 80, rng, continuum_seed=i) for i, v in enumerate((-20.0, 15.0))]
    star = fit_star(visits, shifting_emulator)
    assert star.flags & DopplerFlag.NO_GOOD_VISITS and math.isnan(star.vhelio)
    assert all(v.flags & DopplerFlag.BAD_RV and math.isnan(v.vhelio) for v in star.visits)


def test_template_selection_by_release() -> None:
    from types import SimpleNamespace

    from astra_dagster.methods.doppler import select_templates

    gen = SimpleNamespace(name="generator-hot", meta={"source": "generator"})
    syn = SimpleNamespace(name="synspec-coolstars", meta={"source": "synspec"})
    both = [syn, gen]
    assert select_templates(both, "release", True) == [gen]
    assert select_templates(both, "release", False) == [syn]
    assert select_templates(both, "all", False) == both
    assert select_templates(both, "synspec", True) == [syn]
    with pytest.raises(ValueError, match="no synspec templates for a real release"):
        select_templates([gen], "release", False, "2M00: ")
    with pytest.raises(ValueError, match="templates must be one of"):
        select_templates(both, "best", True)


def test_fit_star_measures_a_faint_visit_with_the_stars_template(emulator) -> None:
    """A visit too faint to correlate with any template alone (NO_SIGNAL) is measured with the
    star's template from its other visits; pure noise stays unmeasured."""
    rng = np.random.default_rng(7)
    labels = np.array([4700.0, 2.6, -0.4])
    good = [toy_visit(labels, 12.0, 40, rng, continuum_seed=k) for k in range(2)]
    faint = toy_visit(labels, 31.0, 0.9, rng, continuum_seed=3)
    noise = toy_visit(labels, 31.0, 40, rng, continuum_seed=4)
    noise.flux[:] = 900.0 + rng.normal(0, 900.0 / 50, noise.n_pixels)
    alone = fit_visit(faint, emulator)
    assert alone.flags & DopplerFlag.NO_SIGNAL and math.isnan(alone.vrel)
    star = fit_star([*good, faint, noise], emulator)
    rescued, still = star.visits[2], star.visits[3]
    assert rescued.ok and rescued.flags & DopplerFlag.STAR_TEMPLATE and rescued.flags & DopplerFlag.WEAK_CCF
    assert not rescued.flags & DopplerFlag.NO_SIGNAL and "star's template" in rescued.message
    assert abs(rescued.vrel - 31.0) < 4 * rescued.u_vrel and rescued.u_vrel < 5.0
    assert rescued.teff == star.teff and rescued.vhelio == pytest.approx(rescued.vrel)
    assert still.flags & DopplerFlag.NO_SIGNAL and math.isnan(still.vrel)
    assert star.n_visits == 4 and star.n_good_visits == 3
    assert star.vhelio == pytest.approx(12.0, abs=0.1)
