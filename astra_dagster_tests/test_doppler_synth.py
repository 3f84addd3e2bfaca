"""The Doppler method on release-like synthetic visits, fitted with generator-trained templates.

Visits: RELEASE_SETTINGS (fiber-dependent R, Gauss-Hermite LSF, pixel integration, hidden
labels scattering), random velocity and barycentric correction, noise at S/N 20-150.
Templates: cubic Cannons trained on an independent TRAINING_SETTINGS grid (cached after the
first run, ~1 minute cold). The acceptance numbers: |ΔRV| rms ≤ 0.1 km/s at S/N ≥ 20 and
≤ 0.05 km/s at S/N ≥ 50 and Teff/logg/[Fe/H] ≲ 150 K / 0.25 / 0.15 for disk stars (Teff < 7000 K,
[Fe/H] > -1); error calibration (pull std 0.7-1.5) for every star.
"""

from __future__ import annotations

import numpy as np
import pytest

synth = pytest.importorskip("astra_dagster.spectra.synth")

from astra_dagster.methods.doppler import (  # noqa: E402
    RV_DOUBTS,
    DopplerFlag,
    fit_star,
    fit_visit,
    generator_training_settings,
    train_generator_emulators,
)
from astra_dagster.spectra.visit_sets import make_visit, synthetic_visits  # noqa: E402


@pytest.fixture(scope="module")
def templates():
    return train_generator_emulators()


def test_generator_templates(templates) -> None:
    names = [e.name for e in templates]
    assert names == ["generator-3000-4200", "generator-3850-7000", "generator-hot"]
    for em in templates:
        assert em.meta["source"] == "generator" and em.meta["n_train"] > 300
    # Calibrated template-mismatch floors: at most a few hundredths of a km/s and tens of K for
    # cool stars (templates and releases share the physical model now: measured 2.4 m/s); hot
    # stars (few broad lines) get far larger ones.
    cool, hot = templates[0].meta["error_floors"], templates[2].meta["error_floors"]
    assert templates[1].meta["error_floors"] == cool
    assert 0.0005 < cool["vrel"] < 0.08
    assert 2 < cool["teff"] < 150 and 0.005 < cool["logg"] < 0.3 and 0.002 < cool["fe_h"] < 0.15
    assert hot["vrel"] > 2 * cool["vrel"] and hot["teff"] > 2 * cool["teff"]
    # Independent settings: the training grid is not the release's, only the LSF shape is.
    settings = generator_training_settings()
    assert settings.lsf_h3 == synth.RELEASE_SETTINGS.lsf_h3
    assert settings.log10_step != synth.RELEASE_SETTINGS.log10_step
    assert not settings.pixel_integration and not settings.fiber_resolution


def test_synthetic_release_visits_meet_the_targets(templates) -> None:
    visits = synthetic_visits(48, seed=2024, snr_range=(20.0, 150.0))
    results = [fit_visit(v.spectrum, templates) for v in visits]
    # Only a label on a template limit that the RV depends on may reject a synthetic visit's RV
    # (the generator-hot family's narrow logg/[Fe/H] range), never the CCF or residual checks.
    for r, v in zip(results, visits, strict=True):
        assert r.ok or (r.flags & RV_DOUBTS == DopplerFlag.EDGE_RV and v.kind == "hot"), r.to_dict()
    kept = [i for i, r in enumerate(results) if r.ok]
    assert len(kept) >= 45
    results, visits = [results[i] for i in kept], [visits[i] for i in kept]
    dv = np.array([r.vrel - v.vrel for r, v in zip(results, visits, strict=True)])
    u = np.array([r.u_vrel for r in results])
    snr = np.array([v.snr for v in visits])
    pulls = dv / u
    assert 0.7 < np.std(pulls) < 1.5
    # vhelio = vrel + bc reproduces the barycentric velocity the visit was made with.
    dvh = np.array([r.vhelio - v.v_bary for r, v in zip(results, visits, strict=True)])
    assert np.allclose(dvh, dv, atol=1e-9)
    disk = np.array([v.labels["teff"] < 7000 and v.labels["fe_h"] > -1.0 for v in visits])
    assert disk.sum() >= 30
    assert np.sqrt(np.mean(dv[disk] ** 2)) <= 0.1
    hi = disk & (snr >= 50)
    assert hi.sum() >= 12
    assert np.sqrt(np.mean(dv[hi] ** 2)) <= 0.05
    dl = np.array([[r.teff - v.labels["teff"], r.logg - v.labels["logg"], r.fe_h - v.labels["fe_h"]]
                   for r, v in zip(results, visits, strict=True)])[disk]
    rms = np.sqrt(np.mean(dl**2, axis=0))
    assert rms[0] < 150 and rms[1] < 0.25 and rms[2] < 0.15


def test_fit_star_on_synthetic_visits(templates) -> None:
    rng = np.random.default_rng(7)
    labels = {"teff": 4550.0, "logg": 2.3, "fe_h": -0.2, "alpha_m": 0.05}
    v_bary = -41.3
    visits = [make_visit(labels, "giant", v_bary, bc, snr, rng)
              for bc, snr in ((-18.0, 35.0), (4.5, 60.0), (22.0, 45.0))]
    star = fit_star([v.spectrum for v in visits], templates)
    assert star.n_good_visits == 3
    assert abs(star.vhelio - v_bary) < 4 * star.u_vhelio + 0.02
    assert star.vscatter < 0.2
    assert abs(star.teff - labels["teff"]) < 150 and abs(star.logg - labels["logg"]) < 0.25
    for visit, v in zip(star.visits, visits, strict=True):
        assert abs(visit.vrel - v.vrel) < 4 * visit.u_vrel


def test_visit_lsf_matching_reproduces_a_render_at_the_visits_lsf() -> None:
    """The matching kernel turns a template rendered at the templates' LSF into the visit's LSF
    (fiber R, Gauss-Hermite shape, pixel box) exactly; unmatched, slit-end fibers differ by %."""
    import dataclasses

    from astra_dagster.methods.doppler.emulator import TEMPLATE_LOG10_STEP, template_log10_grid
    from astra_dagster.methods.doppler.lsf import TEMPLATE_RESOLUTION, convolve, template_lsf, visit_lsf
    from astra_dagster.methods.doppler.model import _cubic_weights

    start, n = template_log10_grid()
    grid = 10 ** (start + TEMPLATE_LOG10_STEP * np.arange(n))
    # Rendered on the template grid itself, so only the kernel is under test (the training
    # settings' own grid adds its resampling, which is template mismatch, not LSF).
    settings = dataclasses.replace(generator_training_settings(), log10_step=synth.RELEASE_SETTINGS.log10_step,
                                   aligned=True)
    assert settings.resolution == TEMPLATE_RESOLUTION
    labels = {"teff": 4600.0, "logg": 2.4, "fe_h": -0.1, "alpha_m": 0.05}
    template = synth.synthesize(labels, grid, settings)
    rng = np.random.default_rng(1)
    for fiber in (1, 150):
        visit = make_visit(labels, "giant", 0.0, 0.0, 100.0, rng, fiber=fiber)
        wave = visit.spectrum.wavelength
        want = visit_lsf(visit.spectrum)
        assert want.resolution == pytest.approx(synth.fiber_resolving_power(fiber))
        direct = synth.synthesize(labels, wave, synth.RELEASE_SETTINGS, fiber=fiber)
        matched = convolve(template, template_lsf(settings), want, TEMPLATE_LOG10_STEP)
        u = (np.log10(wave) - start) / TEMPLATE_LOG10_STEP
        k = np.floor(u).astype(np.int64)
        w, _ = _cubic_weights(u - k, derivative=False)

        def at_visit(g: np.ndarray, k: np.ndarray = k, w: np.ndarray = w) -> np.ndarray:
            return sum(w[:, j] * g[k + j - 1] for j in range(4))

        assert np.max(np.abs(at_visit(matched) - direct)) < 1e-4
        if fiber == 1:
            assert np.max(np.abs(at_visit(template) - direct)) > 1e-2


def test_noiseless_giants_have_no_fiber_dependent_rv_bias(templates) -> None:
    """Templates matched to each visit's fiber R: noiseless giants on slit-end and mid-slit fibers
    give the same velocity (measured: rms 5.2 m/s over 40 visits, 23.6 m/s with templates at one
    LSF, whose slit-end fibers sat ~50 m/s below mid-slit)."""
    rng = np.random.default_rng(11)
    labels = synth.draw_labels(4, rng, "giants")
    dv: dict[int, list[float]] = {1: [], 150: [], 300: []}
    for i in range(4):
        star = {k: float(labels[k][i]) for k in synth.ALL_LABELS}
        for fiber in dv:
            visit = make_visit(star, "giant", float(rng.normal(0.0, 50.0)), float(rng.uniform(-30.0, 30.0)),
                               1e4, rng, fiber=fiber)
            result = fit_visit(visit.spectrum, templates)
            assert result.ok, result.to_dict()
            dv[fiber].append(result.vrel - visit.vrel)
    every = np.concatenate(list(dv.values()))
    assert np.sqrt(np.mean(every**2)) < 0.012
    # slit ends (R 20,000) against mid-slit (R 23,850)
    assert abs(np.mean(dv[1] + dv[300]) - np.mean(dv[150])) < 0.012



@pytest.mark.parametrize(("seed", "index", "visit"), [(2, 8, 0), (5, 47, 1)])
def test_fast_rotators_get_their_broadening_and_their_family(templates, tmp_path, seed, index, visit) -> None:
    """Two young stars of the issue #10 benches, as their releases write them. The first
    (4593 K, v sin i 24.7, S/N 366) got 18 km/s of broadening, measured once at labels that had
    bent to mimic broad lines (64 m/s off, 5.6 Cramér-Rao bounds); the second (4643 K, v sin i
    43.8, S/N 180) went to the cool family's 4199 K limit, ranked before broadening."""
    from astra_dagster.spectra import release
    from astra_dagster.spectra.apogee import read_apvisit, write_apvisit

    src = release._new_source(seed, index, set())
    v = release._initial_visits(src, seed, keep_model=True)[visit]
    path = tmp_path / v.file
    write_apvisit(path, v.wavelength, v.flux, v.sigma, v.flags, release._visit_header(src, v))
    spectrum = read_apvisit(path)
    r = fit_visit(spectrum, templates)
    assert r.ok and not r.flags & DopplerFlag.LABEL_AT_EDGE, r.to_dict()
    assert r.template == "generator-3850-7000"
    # The fitted broadening is extra to the templates' own (a few km/s of rotation and
    # macroturbulence), so it comes out a little below the star's v sin i.
    vsini = src.labels["vsini"]
    assert 0.8 * vsini < r.vsini < 1.05 * vsini
    assert abs(r.teff - src.labels["teff"]) < 100 and abs(r.logg - src.labels["logg"]) < 0.2
    assert abs(r.vrel - v.vrel) < min(4 * r.u_vrel, 5 * release.rv_information_limit(src, v))
