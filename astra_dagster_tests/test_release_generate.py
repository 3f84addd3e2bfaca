"""Synthetic data releases: determinism, truth consistent with the files, S/N, masks, manifest,
extension with unchanged sources byte-identical."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from astra_dagster.spectra import release as rs
from astra_dagster.spectra import synth
from astra_dagster.spectra.apogee import read_apstar, read_apvisit
from astra_dagster.spectra.bitmask import BAD_PIXELS, PIXMASK_BITS
from astra_dagster.spectra.manifest import read_manifest, sha256_file

SEED = 20251125
N_SOURCES = 5


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rs.generate_release(tmp_path_factory.mktemp("data"), "synth-a", N_SOURCES, SEED, progress=False)


@pytest.fixture(scope="module")
def truth(base: Path) -> tuple[list[dict], list[dict]]:
    return rs.read_truth(base)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_byte_identical(base: Path, tmp_path: Path) -> None:
    again = rs.generate_release(tmp_path, "synth-a", N_SOURCES, SEED, progress=False)
    first, second = _all_files(base), _all_files(again)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first), [k for k in first if first[k] != second[k]]
    other = rs.generate_release(tmp_path, "synth-b", N_SOURCES, SEED + 1, progress=False)
    assert read_manifest(other).sources[0].source_id != read_manifest(base).sources[0].source_id


def test_manifest_is_last_and_exact(base: Path) -> None:
    manifest = read_manifest(base)
    assert manifest.release == "synth-a" and len(manifest.sources) == N_SOURCES
    assert manifest.meta["seed"] == SEED and manifest.meta["n_sources"] == N_SOURCES
    assert synth.GENERATOR_VERSION in manifest.meta["generator"]
    listed = {f.path: f for s in manifest.sources for f in s.files} | {f.path: f for f in manifest.files}
    on_disk = {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk
    for path, entry in listed.items():
        assert sha256_file(base / path) == entry.sha256 and (base / path).stat().st_size == entry.size
    newest = max((base / p).stat().st_mtime_ns for p in on_disk)
    assert (base / "manifest.json").stat().st_mtime_ns >= newest
    with pytest.raises(rs.ReleaseError, match="already exists"):
        rs.generate_release(base.parent, "synth-a", 1, SEED, progress=False)


def test_headers_and_layout_match_truth(base: Path, truth: tuple[list[dict], list[dict]]) -> None:
    sources, visits = truth
    for src in sources:
        mine = sorted((v for v in visits if v["source_id"] == src["source_id"]), key=lambda v: v["visit"])
        assert len(mine) == src["n_visits"] >= 1
        stars = read_apstar(base / src["apstar"])
        n = len(mine)
        assert len(stars) == (1 if n == 1 else n + 2)
        stack = stars[0]
        assert stack.meta["source_id"] == src["source_id"] and stack.meta["frame"] == "rest"
        assert stack.snr == pytest.approx(np.sqrt(sum(v["snr"] ** 2 for v in mine)), rel=1e-3)
        assert stack.snr == pytest.approx(src["snr"], rel=1e-3)
        # stacks are NaN in the chip gaps (σ too, so ivar = 0 there)
        gap = np.arange(3375, 3485)  # the green-blue gap, away from RV-dependent edges
        assert np.all(np.isnan(stack.flux[gap])) and np.all(stack.ivar[gap] == 0)
        assert np.isfinite(stack.flux[1000:3000]).all()
        for row, v in zip(stars[2:], mine, strict=False):
            assert row.meta["jd"] == pytest.approx(v["jd"]) and row.meta["bc"] == pytest.approx(v["bc"], abs=1e-4)
            assert row.meta["fiber"] == v["fiber"] and row.snr == pytest.approx(v["snr"], rel=1e-3)
            assert np.all(row.flux[gap] == 0)
        for v in mine:
            spec = read_apvisit(base / v["file"])
            assert spec.meta["frame"] == "observed" and spec.n_pixels == 3 * 4096
            assert spec.meta["mjd"] == v["mjd"] and spec.meta["fiber"] == v["fiber"]
            assert spec.meta["bc"] == pytest.approx(v["bc"], abs=1e-4)
            assert spec.meta["source_id"] == src["source_id"]
            assert spec.wavelength.min() > 15100 and spec.wavelength.max() < 17000
            assert v["vrel"] == pytest.approx(v["v_bary"] - v["bc"], abs=1e-5)  # v_rel = v_bary − BC


def test_release_spans_a_realistic_snr_range(tmp_path: Path) -> None:
    # The S/N model of many sources, without writing files: stacks span ~10-300.
    snr = []
    for i in range(300):
        src = rs._draw_source(7, i)
        snr.append(src.snr_visit * np.sqrt(src.n_visits))
    lo, med, hi = np.percentile(snr, [5, 50, 95])
    assert 8 < lo < 30 and 50 < med < 120 and 200 < hi < 460
    kinds = [rs._draw_source(7, i).kind for i in range(300)]
    assert kinds.count("giant") > kinds.count("dwarf") > kinds.count("hot") > 0


def _continuum_chi2(spec, labels: dict, v: float, good: np.ndarray) -> float:
    model = synth.synthesize(labels, spec.wavelength, synth.TRAINING_SETTINGS, rv_kms=v)
    chi2 = 0.0
    for a, b in spec.meta["chip_slices"]:
        sel = np.arange(a, b)[good[a:b]]
        x = (spec.wavelength[sel] - spec.wavelength[sel].mean()) / 300.0
        design = model[sel, None] * np.vander(x, 3)
        w = np.sqrt(spec.ivar[sel])
        coef, *_ = np.linalg.lstsq(design * w[:, None], spec.flux[sel] * w, rcond=None)
        chi2 += float(np.sum(((spec.flux[sel] - design @ coef) * w) ** 2))
    return chi2


def test_visit_rv_matches_truth(base: Path, truth: tuple[list[dict], list[dict]]) -> None:
    sources, visits = truth
    labels = {s["source_id"]: {k: s[k] for k in synth.ALL_LABELS} for s in sources}
    best = sorted(visits, key=lambda v: -v["snr"])[:2]
    assert best[0]["snr"] > 60
    for v in best:
        spec = read_apvisit(base / v["file"])
        lab = labels[v["source_id"]]
        good = (spec.ivar > 0) & ((spec.pixel_flags & (BAD_PIXELS | 1 << 12 | 1 << 13)) == 0)
        grid = np.arange(v["vrel"] - 30, v["vrel"] + 30.1, 3.0)  # coarse scan, then refine
        start = grid[np.argmin([_continuum_chi2(spec, lab, g, good) for g in grid])]
        fit = minimize_scalar(lambda t, spec=spec, lab=lab, good=good: _continuum_chi2(spec, lab, t, good),
                              bounds=(start - 3, start + 3), method="bounded", options={"xatol": 1e-3})
        assert abs(fit.x - v["vrel"]) < 0.5, (fit.x, v["vrel"], v["snr"])


def test_snr_from_the_noise_matches_header(base: Path, truth: tuple[list[dict], list[dict]]) -> None:
    sources, visits = truth
    by_id = {s["source_id"]: s for s in sources}
    for v in visits:
        src_row = by_id[v["source_id"]]
        src = rs._draw_source(int(src_row["seed"]), int(src_row["index"]))
        again = rs.render_visit(src, int(v["visit"]), int(v["seed"]), float(v["jd"]), keep_model=True)
        spec = read_apvisit(base / v["file"])
        assert np.array_equal(again.flux[2, ::-1], spec.flux[:4096].astype(np.float32))  # same pixels
        model, flux, flags = again.model[1], again.flux[1].astype(float), again.flags[1]
        good = (flags & BAD_PIXELS) == 0
        scaled = (flux - model)[good] / np.sqrt(model[good])
        sigma_unit = 1.4826 * np.median(np.abs(scaled - np.median(scaled)))
        empirical = np.median(np.sqrt(model[good])) / sigma_unit
        assert empirical == pytest.approx(v["snr"], rel=0.15), (empirical, v["snr"])


def test_mask_rates_are_dr17_like(base: Path, truth: tuple[list[dict], list[dict]]) -> None:
    _, visits = truth
    flags = np.concatenate([read_apvisit(base / v["file"]).pixel_flags for v in visits])
    rate = {name: np.mean((flags >> bit) & 1) for name, bit in PIXMASK_BITS.items()}
    # DR17 visit (S/N 67): BADPIX 1.8 %, BADDARK 1.1 %, BADFLAT 1.4 %, LITTROW 0.7 %,
    # NOT_ENOUGH_PSF 1.5 %, SIG_SKYLINE 4.1 %, SIG_TELLURIC 9.4 %
    assert 0.010 < rate["BADPIX"] < 0.03 and 0.005 < rate["BADDARK"] < 0.02 and 0.007 < rate["BADFLAT"] < 0.025
    assert 0.003 < rate["LITTROW_GHOST"] < 0.012 and 0.008 < rate["NOT_ENOUGH_PSF"] < 0.025
    assert 0.0005 < rate["CRPIX"] < 0.006
    assert 0.015 < rate["SIG_SKYLINE"] < 0.15 and 0.04 < rate["SIG_TELLURIC"] < 0.16
    assert np.mean((flags & BAD_PIXELS) != 0) < 0.12
    assert rate["UNFIXABLE"] == 0 and rate["FERRE_MASK"] == 0


def _visit(flux: float, sigma: float, flags: int, snr: float, n: int = 4096) -> rs.Visit:
    wave = rs.native_wavelength("apo25m")
    return rs.Visit(source_id="x", visit=1, seed=0, jd=2459000.5, fiber=1, bc=0.0, v_bary=0.0, vrel=0.0,
                   snr=snr, airmass=1.0, wavelength=wave,
                   flux=np.full((3, n), flux, dtype=np.float32), sigma=np.full((3, n), sigma, dtype=np.float32),
                   flags=np.full((3, n), flags, dtype=np.int16))


def test_stacking_arithmetic() -> None:
    a, b = _visit(100.0, 2.0, 0, 50.0), _visit(100.0, 1.0, 0, 100.0)
    b.flux[1, 2000:2010] = 130.0  # a feature only in b, on the green chip
    b.flags[1, 1000:1010] = 1  # BADPIX in b
    flux, sigma, flags = rs.build_apstar([a, b])
    assert flux.shape == sigma.shape == flags.shape == (4, 8575)
    chip = slice(3700, 6000)
    # the feature only in b: (100/2² + 130/1²) / (1/2² + 1/1²) = 124 (and the same with S/N² weights)
    assert np.nanmax(flux[0, chip]) == pytest.approx(124.0, rel=0.03)
    assert np.nanmax(flux[1, chip]) == pytest.approx(124.0, rel=0.03)
    assert np.nanmedian(flux[0, chip]) == pytest.approx(100.0, rel=1e-6)
    ok = np.flatnonzero(np.isfinite(flux[0]) & (((flags[2] | flags[3]) & BAD_PIXELS) == 0))
    # σ of the resampled visits (rows 2, 3) combine as 1/σ² (pixel) and with S/N² weights (global)
    sa, sb = sigma[2, ok], sigma[3, ok]
    assert np.allclose(sigma[0, ok], 1 / np.sqrt(1 / sa**2 + 1 / sb**2), rtol=1e-9)
    assert np.allclose(sigma[1, ok], np.sqrt(50**4 * sa**2 + 100**4 * sb**2) / (50**2 + 100**2), rtol=1e-9)
    assert np.all(sb < 1.0) and np.all(sb > 0.5)  # interpolation averages noise: Σw² < 1
    bad_rows = np.flatnonzero((flags[3] & BAD_PIXELS) != 0)
    assert bad_rows.size >= 5 and np.all(sigma[3, bad_rows] > 1e8)  # bad visit pixels: σ inflated
    assert np.all((flags[0, bad_rows] & BAD_PIXELS) == 0)  # the other visit is good there
    assert np.all(np.isnan(flux[:2, 3400])) and np.all(flux[2:, 3400] == 0)
    both = rs.build_apstar([_visit(100.0, 1.0, 1, 80.0), _visit(100.0, 1.0, 1, 80.0)])
    inner = slice(4000, 5000)
    assert np.all(both[1][0, inner] > 1e8) and np.all(both[2][0, inner] & 1)
    single = rs.build_apstar([a])
    assert single[0].shape == (1, 8575)


def test_extend_release_keeps_untouched_sources(base: Path, tmp_path: Path) -> None:
    new = rs.extend_release(base, tmp_path, "synth-a2", seed=99, new_visit_fraction=0.4, n_new_sources=1)
    old_m, new_m = read_manifest(base), read_manifest(new)
    assert new_m.meta["base_release"] == "synth-a" and len(new_m.sources) == N_SOURCES + 1
    old_by_id = {s.source_id: s for s in old_m.sources}
    changed = [s for s in new_m.sources if s.source_id in old_by_id and s.fingerprint != old_by_id[s.source_id].fingerprint]
    same = [s for s in new_m.sources if s.source_id in old_by_id and s.fingerprint == old_by_id[s.source_id].fingerprint]
    assert len(changed) == 2 and len(same) == N_SOURCES - 2
    for s in same:
        for f in s.files:
            assert (new / f.path).read_bytes() == (base / f.path).read_bytes()
    _, new_visits = rs.read_truth(new)
    for s in changed:
        old_files = {f.path: f.sha256 for f in old_by_id[s.source_id].files}
        new_files = {f.path: f.sha256 for f in s.files}
        added = set(new_files) - set(old_files)
        assert len(added) == 1 and next(iter(added)).startswith("apVisit/")
        for path, sha in old_files.items():
            if path.startswith("apVisit/"):
                assert new_files[path] == sha  # old visits untouched
        stars = read_apstar(new / f"apStar/apStar-{s.source_id}.fits")
        nv = stars[0].meta["nvisits"]
        assert nv == len(old_files)  # one more visit than the old apStar had
        mine = [v for v in new_visits if v["source_id"] == s.source_id]
        assert len(mine) == nv and [v["seed"] for v in mine].count(99) == 1
        assert max(v["jd"] for v in mine) == next(v["jd"] for v in mine if v["seed"] == 99)  # the newest
    # deterministic too
    again = rs.extend_release(base, tmp_path / "again", "synth-a2", seed=99, new_visit_fraction=0.4,
                             n_new_sources=1)
    assert _all_files(again) == _all_files(new)


def test_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(rs.ReleaseError, match="n_sources"):
        rs.generate_release(tmp_path, "x", 0, 1, progress=False)
    (tmp_path / "half").mkdir()
    with pytest.raises(rs.ReleaseError, match=r"half.*no manifest\.json"):
        rs.extend_release(tmp_path / "half", tmp_path, "y", 1)
    with pytest.raises(rs.ReleaseError, match="invalid release name"):
        rs.generate_release(tmp_path, "a/b", 1, 1, progress=False)


def test_barycentric_correction_close_to_astropy() -> None:
    import astropy.units as u
    from astropy.coordinates import EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    iers.conf.auto_download = False
    apo = EarthLocation.from_geodetic(-105.8203 * u.deg, 32.7803 * u.deg, 2788 * u.m)
    rng = np.random.default_rng(3)
    diffs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(8):
            ra, dec, jd = rng.uniform(0, 360), rng.uniform(-20, 70), 2459200.5 + rng.uniform(0, 1000)
            t = Time(jd, format="jd", location=apo)
            ha = ((t.sidereal_time("mean").deg - ra + 180) % 360 - 180) / 15
            exact = SkyCoord(ra * u.deg, dec * u.deg).radial_velocity_correction(
                "barycentric", obstime=Time(jd, format="jd"), location=apo).to(u.km / u.s).value
            diffs.append(rs.barycentric_correction(ra, dec, jd, 32.7803, ha) - exact)
    assert np.max(np.abs(diffs)) < 0.3, diffs


def test_source_names_are_2mass_style() -> None:
    assert rs.source_name(0.0, 0.0) == "2M00000000+0000000"
    name = rs.source_name(15.5 * 15 + 0.001, -12.5)
    assert name.startswith("2M1530") and name[10] == "-" and len(name) == 18
    assert json.dumps(name)  # plain ASCII


def test_training_draws_are_independent_of_release_draws() -> None:
    seed = 5
    training = synth.make_training_set(20, seed, wavelength=np.linspace(15200.0, 15300.0, 50)).labels["teff"]
    released = np.array([rs._draw_source(seed, i).labels["teff"] for i in range(20)])
    assert not np.any(np.isin(np.round(training, 6), np.round(released, 6)))
    assert abs(np.corrcoef(training, released)[0, 1]) < 0.6


def _chi2_fit_scatter(src: rs.SourceTruth, visit: rs.Visit, limit: float, n_draws: int) -> np.ndarray:
    """Velocities a χ² fit with the true template finds over ``n_draws`` noise draws of ``visit``."""
    flat = visit.wavelength.ravel()
    offsets = np.linspace(-4, 4, 9) * limit
    star = [synth.synthesize(src.labels, flat, synth.RELEASE_SETTINGS, rv_kms=visit.vrel + d, fiber=visit.fiber)
            for d in offsets]
    models = visit.model.ravel() * np.array(star) / star[4]
    sigma = visit.sigma.ravel().astype(float)
    good = (visit.flags.ravel() & BAD_PIXELS) == 0
    rng = np.random.default_rng(1)
    fits = []
    for _ in range(n_draws):
        data = visit.model.ravel() + rng.normal(size=sigma.size) * sigma
        chi2 = np.sum(((data - models)[:, good] / sigma[good]) ** 2, axis=1)
        a, b, _ = np.polyfit(offsets, chi2, 2)
        fits.append(-b / (2 * a))
    return np.array(fits)


def test_rv_information_limit_matches_monte_carlo() -> None:
    """The Cramér–Rao bound is the scatter a χ² fit with the true template reaches over noise draws,
    for a slow-rotating giant (tens of m/s) and for a fast-rotating hot star (km/s) alike: the
    bound is not what makes a method look better than it (hot stars dominate a bin's rms)."""
    seed, taken = 3, set()
    sources = [rs._new_source(seed, i, taken) for i in range(47)]
    giant, hot = sources[3], sources[46]
    assert giant.kind == "giant" and hot.kind == "hot" and hot.labels["vsini"] > 100
    visit = rs._initial_visits(giant, seed, keep_model=True)[0]
    limit = rs.rv_information_limit(giant, visit)
    assert 0.01 < limit < 0.1
    fits = _chi2_fit_scatter(giant, visit, limit, 300)
    assert abs(np.mean(fits)) < 0.2 * limit
    assert np.std(fits) == pytest.approx(limit, rel=0.15)

    hot_visit = rs._initial_visits(hot, seed, keep_model=True)[0]
    hot_limit = rs.rv_information_limit(hot, hot_visit)
    assert hot_limit > 20 * limit
    hot_fits = _chi2_fit_scatter(hot, hot_visit, hot_limit, 300)
    assert abs(np.mean(hot_fits)) < 0.2 * hot_limit
    assert np.std(hot_fits) == pytest.approx(hot_limit, rel=0.15)
    with pytest.raises(ValueError, match="keep_model"):
        rs.rv_information_limit(giant, rs._initial_visits(giant, seed)[0])
