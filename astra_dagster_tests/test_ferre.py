"""FERRE (astra_dagster.methods.ferre): the grid file, interpolation, the fit on release-like
spectra (accuracy against the truth at S/N >= 100), frozen dimensions, flags for bad
input, and the exact astra.ferre row shape.

One CI-size grid (ASPCAP spacing, a smaller box: 3750-6000 K, logg 1-5, [M/H] -1.25..+0.5,
[α/M] -0.25..+0.5; 2880 nodes) is built once per module (~20-30 s on one core)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from astra_dagster.methods import continuum, ferre
from astra_dagster.methods.metrics import accuracy_bins
from astra_dagster.spectra import synth
from astra_dagster.spectra.labelled_sets import physical_spectra
from astra_dagster.spectra.spectrum import Spectrum, apstar_wavelength

SQL = Path(__file__).resolve().parents[1] / "sql" / "astradb.sql"


@pytest.fixture(scope="module")
def grid(ferre_grid: ferre.FerreGrid) -> ferre.FerreGrid:
    return ferre_grid  # model_cache.FERRE_TRAINING, cached on disk


def spectra_from(flux: np.ndarray, ivar: np.ndarray, flags: np.ndarray, snr: np.ndarray) -> list[Spectrum]:
    """Raw (un-normalised) rest-frame apStar Spectrum objects, as a reader returns them."""
    wave = apstar_wavelength()
    return [Spectrum(wave, flux[i], ivar[i], flags[i], {"snr": float(snr[i]), "frame": "rest", "path": f"star{i}"})
            for i in range(flux.shape[0])]


def inside(grid: ferre.FerreGrid, labels: dict[str, np.ndarray], margin: float = 0.5) -> np.ndarray:
    """Stars whose true labels lie inside the grid by ``margin`` steps."""
    ok = np.ones(labels["teff"].size, dtype=bool)
    for name, key in (("teff", "teff"), ("logg", "logg"), ("metals", "fe_h"), ("o_mg_si_s_ca_ti", "alpha_m")):
        if name not in grid.names:
            continue
        a = grid.axis(name)
        ok &= (labels[key] >= a.start + margin * a.step) & (labels[key] <= a.stop - margin * a.step)
    return ok


def ferre_columns() -> list[str]:
    body = re.search(r"create table if not exists astra\.ferre \((.*?)\n\);", SQL.read_text(), re.S)
    assert body is not None
    cols = [line.strip().split()[0] for line in body.group(1).strip().splitlines()]
    return [c for c in cols if c != "output_pk"]


# ----------------------------------------------------------------------------- the grid


def test_grid_file_round_trip_and_summary(grid: ferre.FerreGrid, tmp_path: Path) -> None:
    path = tmp_path / "model.grid"           # no .npz suffix: write() must use exactly this path
    assert grid.write(path) == path
    assert path.exists() and not (tmp_path / "model.grid.npz").exists()
    back = ferre.FerreGrid.read(path)
    assert back.axes == grid.axes and back.meta == grid.meta
    assert np.array_equal(back.depth, grid.depth) and np.array_equal(back.pixels, grid.pixels)
    lab = {"teff": 4620.0, "logg": 2.3, "metals": -0.4}
    assert np.array_equal(back.model_flux(lab), grid.model_flux(lab), equal_nan=True)
    summary = json.loads(json.dumps(grid.summary()))
    assert summary["n_nodes"] == 10 * 9 * 8 == grid.n_nodes
    # [α/M] is off by default: the physical model's spectra do not depend on it
    assert summary["dimensions"] == ["teff", "logg", "metals"]
    assert summary["axes"]["teff"] == {"min": 3750.0, "max": 6000.0, "step": 250.0, "n": 10}
    # held-out error floors: positive and small (interpolation + hidden-label mismatch)
    assert 0 < summary["floor_teff"] < 60 and 0 < summary["floor_logg"] < 0.2
    assert 0 < summary["floor_metals"] < 0.08 and summary["held_out_n"] == 16
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ferre.FerreError, match=r"bad\.npz"):
        ferre.FerreGrid.read(bad)
    other = tmp_path / "other.npz"
    np.savez(other, format=np.array("something-else/1"), config=np.array("{}"), depth=np.zeros((1, 1)),
             pixels=np.zeros(1))
    with pytest.raises(ferre.FerreError, match="something-else"):
        ferre.FerreGrid.read(other)


def test_interpolation_is_exact_at_nodes_and_between_neighbours(grid: ferre.FerreGrid) -> None:
    node = {"teff": 4500.0, "logg": 2.5, "metals": 0.0}
    wave = apstar_wavelength()
    raw = synth.synthesize({"teff": 4500.0, "logg": 2.5, "fe_h": 0.0, "alpha_m": 0.0}, wave, synth.TRAINING_SETTINGS)
    chips = continuum.chip_index() >= 0
    expected = continuum.normalize_arrays(wave, raw, np.where(chips, synth.NOISELESS_IVAR, 0.0))[0][0]
    model = grid.model_flux(node)
    assert np.nanmax(np.abs(model - expected)[chips]) < 1e-4      # int16 quantum 3e-5
    assert np.all(np.isnan(model[~chips]))
    lo, hi = grid.model_flux({**node, "teff": 4500.0}), grid.model_flux({**node, "teff": 4750.0})
    mid = grid.model_flux({**node, "teff": 4625.0})
    assert np.allclose(mid[chips], 0.5 * (lo + hi)[chips], atol=1e-4)


def test_train_model_rejects_bad_options() -> None:
    with pytest.raises(ferre.FerreError, match="unknown grid options"):
        ferre.train_model(seed=0, teff_stride=100.0)
    with pytest.raises(ferre.FerreError, match="not a multiple"):
        ferre.train_model(seed=0, teff_step=300.0)
    with pytest.raises(ferre.FerreError, match="n_train=100"):
        ferre.train_model(seed=0, n_train=100)
    with pytest.raises(ferre.FerreError, match="generator's range"):
        ferre.train_model(seed=0, teff_min=2000.0)


# ----------------------------------------------------------------------------- accuracy


@pytest.fixture(scope="module")
def release_fit(grid: ferre.FerreGrid) -> dict:
    snr = np.random.default_rng(11).uniform(100.0, 200.0, 90)
    flux, ivar, flags, labels, kind, snr = physical_spectra(90, 505, snr, kinds=("giant", "dwarf"))
    keep = np.flatnonzero(inside(grid, labels))[:36]
    spectra = spectra_from(flux[keep], ivar[keep], flags[keep], snr[keep])
    rows = ferre.fit_spectra(grid, spectra)
    return {"rows": rows, "labels": {k: v[keep] for k, v in labels.items()}, "kind": kind[keep],
            "snr": snr[keep]}


def test_accuracy_on_release_like_giants_and_dwarfs(release_fit: dict) -> None:
    rows, labels = release_fit["rows"], release_fit["labels"]
    assert len(rows) >= 30 and set(release_fit["kind"]) == {"giant", "dwarf"}
    names = {"teff": "teff", "logg": "logg", "metals": "fe_h"}
    est = {k: np.array([np.nan if r[k] is None else r[k] for r in rows]) for k in names}
    unc = {k: np.array([np.nan if r[f"u_{k}"] is None else r[f"u_{k}"] for r in rows]) for k in names}
    truth = {k: labels[v] for k, v in names.items()}
    (b,) = accuracy_bins(truth, est, unc, release_fit["snr"], bins=((100, None),))
    st = b["labels"]
    # the issue's targets: σ(Teff)/Teff <= 2 %, σ(logg) <= 0.1, σ([M/H]) <= 0.05 at S/N >= 100
    rel = (est["teff"] - truth["teff"]) / truth["teff"]
    assert 1.4826 * np.median(np.abs(rel - np.median(rel))) <= 0.02
    assert st["teff"]["robust_sigma"] <= 40.0 and abs(st["teff"]["bias"]) <= 40.0, st["teff"]
    assert st["logg"]["robust_sigma"] <= 0.1 and abs(st["logg"]["bias"]) <= 0.06, st["logg"]
    assert st["metals"]["robust_sigma"] <= 0.05 and abs(st["metals"]["bias"]) <= 0.03, st["metals"]
    # achieved on this set: rms 20 K, 0.098, 0.053, 0.031 (robust σ 8 K, 0.071, 0.020, 0.008)
    assert st["teff"]["rms"] <= 40.0 and st["logg"]["rms"] <= 0.15, st
    assert st["metals"]["rms"] <= 0.08, st
    for k in names:
        # heavy tails: upper-giant-branch stars trade logg against [M/H] when their hidden
        # [C/Fe] scatters (the grid holds C on its mean relation), so up to ~20 % are beyond
        # 3 robust σ when that σ is as small as 0.01-0.02 dex
        assert st[k]["outlier_frac"] <= 0.3, (k, st[k])
        # curvature errors + held-out floors: calibrated within a factor of a few
        assert st[k]["pull_std"] is not None and 0.5 <= st[k]["pull_std"] <= 5.0, (k, st[k])
    flags = np.array([r["bitmask_flag"] for r in rows])
    bad = ferre.FLAGS["FLAT_CHI2"] | ferre.FLAGS["TOO_FEW_PIXELS"] | ferre.FLAGS["BAD_CURVATURE"]
    assert np.all(flags & bad == 0)
    assert all(r["initial_teff"] is not None and r["log_chisq_fit"] is not None for r in rows)
    # reduced χ² near one: noise dominates the mismatch at S/N 100-200
    assert np.median([10 ** r["log_chisq_fit"] for r in rows]) < 3.0



def test_rows_have_exactly_the_astra_ferre_columns(release_fit: dict) -> None:
    cols = ferre_columns()
    assert len(cols) == 1 + 8 + 8 + 16 + 3
    for row in release_fit["rows"][:5]:
        assert list(row) == cols
        for key, value in row.items():
            assert value is None or type(value) in (float, int, bool), (key, value)
        for d in ("log10vdop", "lgvsini", "c", "n"):    # not dimensions of this grid
            assert row[d] is None and row[f"u_{d}"] is None and row[f"initial_{d}"] is None
            assert row[f"frozen_{d}"] is False
        assert math.isclose(row["log_snr_sq"], 2 * math.log10(row["snr"]))


# ----------------------------------------------------------------------------- options and bad input


@pytest.fixture(scope="module")
def two_stars() -> tuple[list[Spectrum], dict[str, np.ndarray]]:
    flux, ivar, flags, labels, _, snr = physical_spectra(12, 77, 150.0, kinds=("giant",))
    keep = np.flatnonzero((labels["teff"] > 4000) & (labels["teff"] < 5600) & (labels["logg"] > 1.3)
                          & (labels["fe_h"] > -1.0) & (labels["fe_h"] < 0.3))[:2]
    return spectra_from(flux[keep], ivar[keep], flags[keep], snr[keep]), {k: v[keep] for k, v in labels.items()}


def test_frozen_dimensions(grid: ferre.FerreGrid, two_stars: tuple) -> None:
    spectra, labels = two_stars
    for spec, t, g, m in zip(spectra, labels["teff"], labels["logg"], labels["fe_h"], strict=True):
        value = round(float(m), 3)   # [M/H] held at the star's own value
        (row,) = ferre.fit_spectra(grid, [spec], frozen={"metals": value})
        assert row["frozen_metals"] is True and row["frozen_teff"] is False
        assert row["metals"] == value and row["u_metals"] is None
        assert row["initial_metals"] == value
        assert abs(row["teff"] - t) < 200 and abs(row["logg"] - g) < 0.3 and row["u_teff"] > 0
    with pytest.raises(ferre.FerreError, match="lgvsini"):
        ferre.fit_spectra(grid, spectra, frozen={"lgvsini": 0.5})
    with pytest.raises(ferre.FerreError, match="outside the grid"):
        ferre.fit_spectra(grid, spectra, frozen={"metals": 1.5})


def test_start_outside_grid_is_clipped_and_flagged(grid: ferre.FerreGrid, two_stars: tuple) -> None:
    spectra, labels = two_stars
    start = {"teff": 9000.0, "logg": -1.0, "metals": 0.0}
    row = ferre.fit_spectra(grid, spectra[:1], initial=start)[0]
    assert row["bitmask_flag"] & ferre.FLAGS["START_OUTSIDE_GRID"]
    assert row["initial_teff"] == 6000.0 and row["initial_logg"] == 1.0
    # the restarts from the node scan still find the star
    assert abs(row["teff"] - labels["teff"][0]) < 150 and abs(row["logg"] - labels["logg"][0]) < 0.3
    inside_start = {"teff": 4800.0, "logg": 2.5, "metals": -0.25}
    row = ferre.fit_spectra(grid, spectra[:1], initial=[inside_start])[0]
    assert not row["bitmask_flag"] & ferre.FLAGS["START_OUTSIDE_GRID"] and row["initial_teff"] == 4800.0


def test_star_beyond_the_grid_is_flagged_at_edge(grid: ferre.FerreGrid) -> None:
    flux, ivar, flags, labels, _, snr = physical_spectra(30, 91, 150.0, kinds=("dwarf",))
    hot = np.flatnonzero(labels["teff"] > 6250.0)[:1]
    assert hot.size == 1
    row = ferre.fit_spectra(grid, spectra_from(flux[hot], ivar[hot], flags[hot], snr[hot]))[0]
    assert row["bitmask_flag"] & ferre.FLAGS["AT_GRID_EDGE"] and row["teff"] == pytest.approx(6000.0, abs=10)


def test_hot_stars_fail_the_hydrogen_screen(grid: ferre.FerreGrid) -> None:
    """8000-20000 K stars end at the grid's warm edge, but their Brackett lines are far deeper
    than any grid model's: HYDROGEN_LINES and no labels, not an edge value."""
    flux, ivar, flags, _labels, _, snr = physical_spectra(2, 92, 100.0, kinds=("hot",))
    for row in ferre.fit_spectra(grid, spectra_from(flux, ivar, flags, snr)):
        # or, where a rotating hot star hides its lines, a minimum where the physical model
        # has no spectrum (the grid's clamped hole): no labels either way
        assert row["bitmask_flag"] & (ferre.FLAGS["HYDROGEN_LINES"] | ferre.FLAGS["OUTSIDE_MODEL"]), row["bitmask_flag"]
        assert labels_none(row) and row["log_chisq_fit"] is not None


def labels_none(row: dict) -> bool:
    return all(row[d] is None and row[f"u_{d}"] is None for d in ferre.DIMENSIONS)


def test_bad_spectra_get_flags_and_no_labels(grid: ferre.FerreGrid, two_stars: tuple) -> None:
    good = two_stars[0][0]
    wave = good.wavelength
    chips = continuum.chip_index() >= 0
    rng = np.random.default_rng(5)
    masked = Spectrum(wave, good.flux, np.zeros_like(good.ivar), good.pixel_flags, {"path": "masked"})
    nan = Spectrum(wave, np.full(wave.size, np.nan), good.ivar, good.pixel_flags, {"path": "nan"})
    few_ivar = np.zeros_like(good.ivar)
    few_ivar[np.flatnonzero(chips)[::60]] = 1.0          # ~130 usable pixels
    few = Spectrum(wave, good.flux, few_ivar, good.pixel_flags, {"path": "few"})
    level = 500.0
    flat_flux = np.where(chips, level * (1 + rng.normal(0, 0.01, wave.size)), np.nan)
    flat = Spectrum(wave, flat_flux, np.where(chips, (100.0 / level) ** 2, 0.0), np.zeros(wave.size, int),
                    {"path": "constant", "snr": 100.0})
    exact = Spectrum(wave, np.where(chips, level, np.nan), np.where(chips, 1.0, 0.0), np.zeros(wave.size, int),
                     {"path": "noiseless constant"})
    rows = ferre.fit_spectra(grid, [masked, nan, few, flat, exact, good])
    for row in rows[:3]:
        assert row["bitmask_flag"] & ferre.FLAGS["TOO_FEW_PIXELS"] and labels_none(row)
        assert row["log_chisq_fit"] is None
    for row in rows[3:5]:
        assert row["bitmask_flag"] & ferre.FLAGS["FLAT_CHI2"] and labels_none(row), row
    assert rows[3]["snr"] == 100.0 and rows[0]["snr"] is None and rows[0]["log_snr_sq"] is None
    assert rows[5]["bitmask_flag"] == 0 and rows[5]["teff"] is not None
    observed = Spectrum(wave, good.flux, good.ivar, good.pixel_flags, {"frame": "observed", "path": "visit.fits"})
    with pytest.raises(ValueError, match=r"visit\.fits"):
        ferre.fit_spectra(grid, [observed])
    with pytest.raises(ferre.FerreError, match="FerreGrid"):
        ferre.fit_spectra(object(), [good])  # type: ignore[arg-type]


def test_rotation_dimension_grid_fits_rotation() -> None:
    """An optional dimension (log10 v sin i) end to end: a tiny 4-D grid, a rotating F dwarf
    rendered with the release's LSF, noise at S/N 150."""
    small = ferre.train_model(seed=0, n_validation=0, teff_min=5500.0, teff_max=6500.0, logg_min=4.0, logg_max=5.0,
                              metals_min=-0.5, metals_max=0.5, lgvsini_min=0.0, lgvsini_max=1.5, lgvsini_step=0.5)
    assert small.names == ("teff", "logg", "metals", "lgvsini") and small.n_nodes == 300
    wave = apstar_wavelength()
    truth = {"teff": 6080.0, "logg": 4.3, "fe_h": -0.1, "alpha_m": 0.05, "vsini": 20.0}
    norm = synth.synthesize(truth, wave, synth.RELEASE_SETTINGS, fiber=120)
    chips = continuum.chip_index() >= 0
    flux = 1000.0 * norm * synth.continuum(truth, wave)
    sigma = np.median(flux[chips]) / 150.0
    noisy = flux + np.random.default_rng(1).normal(0.0, sigma, wave.size)
    spec = Spectrum(wave, np.where(chips, noisy, np.nan), np.where(chips, sigma**-2, 0.0), np.zeros(wave.size, int),
                    {"snr": 150.0})
    row = ferre.fit_spectra(small, [spec])[0]
    assert row["bitmask_flag"] == 0, ferre.describe_flags(row["bitmask_flag"])
    assert abs(row["lgvsini"] - math.log10(20.0)) < 0.1 and 0 < row["u_lgvsini"] < 0.2
    assert abs(row["teff"] - 6080.0) < 100 and abs(row["logg"] - 4.3) < 0.15 and abs(row["metals"] + 0.1) < 0.08
    assert row["log10vdop"] is None and row["frozen_lgvsini"] is False
