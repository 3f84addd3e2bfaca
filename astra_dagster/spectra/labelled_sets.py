"""Labelled synthetic spectra outside a release folder: training and validation sets shared by the
label methods' tests and benches (The Cannon, The Payne, FERRE, APOGEENet).

Training: :func:`astra_dagster.spectra.synth.make_training_set` (``TRAINING_SETTINGS``: Gaussian
LSF at one R, its own sampling, hidden labels on their relations), survey population without the
hot stars (a quadratic model cannot span 3000-20000 K), noiseless, then normalised with
:mod:`astra_dagster.methods.continuum` like any data.

Test: stars drawn from the survey population with an independent stream, rendered with
``RELEASE_SETTINGS`` (fiber-dependent R, asymmetric LSF, pixel integration, hidden labels
scattering about their relations) on the apStar grid, multiplied by the star's H⁻-flattened
continuum, extinction and a random smooth per-chip throughput, with Poisson-like noise at the
requested S/N and ~2 % flagged bad pixels holding wrong values, then normalised by
:func:`~astra_dagster.methods.continuum.normalize_arrays` — the same path as release spectra.

Raw: :func:`raw_release_like` keeps the same kind of test stars in raw flux units with NaN chip
gaps, as apStar rows have them (APOGEENet normalises nothing itself).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from astra_dagster.methods import continuum
from astra_dagster.spectra import synth
from astra_dagster.spectra.bitmask import flag
from astra_dagster.spectra.spectrum import Spectrum, apstar_wavelength

LABELS = ("teff", "logg", "fe_h")  # what the generator's physical model carries
_TEST_STREAM = 0x63616E6E  # "cann": never shared with releases or training sets
_RAW_STREAM = 0x616E7473  # "ants": the raw-flux sets (APOGEENet's tests and bench), likewise


@dataclass
class LabelledSet:
    flux: np.ndarray          # (n, 8575), continuum-normalised
    ivar: np.ndarray
    labels: dict[str, np.ndarray]
    kind: np.ndarray
    snr: np.ndarray
    continuum_flags: np.ndarray


def training_set(n: int, seed: int, *, kinds: tuple[str, ...] = ("giant", "dwarf", "yso"),
                 vary_hidden: bool = False, balanced: bool = False) -> LabelledSet:
    """About ``n`` noiseless training spectra of the survey population restricted to ``kinds``;
    ``vary_hidden``: hidden labels scatter about their relations (``TRAINING_SETTINGS`` otherwise);
    ``balanced``: half giants, half dwarfs (the survey has 62 % giants, 28 % dwarfs)."""
    settings = replace(synth.TRAINING_SETTINGS, vary_hidden=vary_hidden)
    if balanced:
        parts = [synth.make_training_set(n // 2, seed, settings=settings, population="giants"),
                 synth.make_training_set(n - n // 2, seed + 1, settings=settings, population="dwarfs")]
        flux = np.vstack([p.flux for p in parts])
        ivar = np.vstack([p.ivar for p in parts])
        labels = {k: np.concatenate([p.labels[k] for p in parts]) for k in parts[0].labels}
        kind = np.concatenate([p.kind for p in parts])
        wave = parts[0].wavelength
    else:
        ts = synth.make_training_set(int(np.ceil(n / 0.9)) + 10, seed, settings=settings)
        keep = np.flatnonzero(np.isin(ts.kind, kinds))[:n]
        flux, ivar, kind, wave = ts.flux[keep], ts.ivar[keep], ts.kind[keep], ts.wavelength
        labels = {k: v[keep] for k, v in ts.labels.items()}
    flux, ivar, cflags = continuum.normalize_arrays(wave, flux, ivar, return_flags=True)
    return LabelledSet(flux, ivar, labels, kind, np.full(kind.size, np.inf), cflags)


def physical_spectra(n: int, seed: int, snr: float | np.ndarray, *, population: str = "survey",
                     kinds: tuple[str, ...] | None = None, settings: synth.SynthesisSettings = synth.RELEASE_SETTINGS,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Release-like rest-frame apStar-grid spectra in flux units, *not* normalised:
    (flux, ivar, pixel_flags, labels, kind, snr). ``settings``: the release instrument with the
    physical model by default (``model="lines"`` for tests of multi-label machinery)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TEST_STREAM]))
    labels, kind = synth.draw_labels_with_kind(n if kinds is None else 3 * n + 20, rng, population)
    if kinds is not None:
        keep = np.flatnonzero(np.isin(kind, kinds))[:n]
        labels, kind = {k: v[keep] for k, v in labels.items()}, kind[keep]
    n = kind.size
    wave = apstar_wavelength()
    chip = continuum.chip_index()
    snr = np.broadcast_to(np.asarray(snr, dtype=float), (n,)).copy()
    flux = np.zeros((n, wave.size))
    ivar = np.zeros((n, wave.size))
    flags = np.zeros((n, wave.size), dtype=np.int64)
    bad_bits = flag("BADPIX", "BADDARK", "CRPIX")
    for i in range(n):
        lab = {k: float(labels[k][i]) for k in synth.ALL_LABELS}
        norm = synth.synthesize(lab, wave, settings, fiber=int(rng.integers(1, 301)))
        cont = synth.continuum(lab, wave) * 10.0 ** (-0.4 * rng.exponential(0.15) * (wave / 16500.0) ** -2.0)
        throughput = np.ones(wave.size)
        for c, (lo, hi) in enumerate(continuum.CHIPS):
            x = np.linspace(-1.0, 1.0, hi - lo + 1)
            throughput[lo:hi + 1] = ((1.05, 1.0, 0.92)[c] * np.exp(rng.normal(0.0, 0.08))
                                     * (1 + rng.normal(0.0, 0.04) * x + rng.normal(0.0, 0.03) * x * x))
        obj = 830.0 * norm * cont * throughput
        cmed = float(np.median(obj[chip >= 0]))
        sigma = cmed / snr[i] * np.sqrt(np.clip(obj / cmed, 1e-3, None))
        f = obj + rng.normal(size=wave.size) * sigma
        bad = rng.random(wave.size) < 0.02
        f = np.where(bad, f * rng.normal(1.0, 0.3, wave.size), f)
        flags[i] = np.where(bad, bad_bits, 0)
        flux[i] = np.where(chip >= 0, f, np.nan)
        ivar[i] = np.where(chip >= 0, 1.0 / sigma**2, 0.0)
    return flux, ivar, flags, labels, kind, snr


def release_like_set(n: int, seed: int, snr: float | np.ndarray, *, population: str = "survey",
                     kinds: tuple[str, ...] | None = None,
                     settings: synth.SynthesisSettings = synth.RELEASE_SETTINGS) -> LabelledSet:
    """:func:`physical_spectra`, normalised with the shared continuum code."""
    flux, ivar, flags, labels, kind, snr_arr = physical_spectra(n, seed, snr, population=population, kinds=kinds,
                                                                settings=settings)
    nf, ni, cflags = continuum.normalize_arrays(apstar_wavelength(), flux, ivar, flags, return_flags=True)
    return LabelledSet(nf, ni, labels, kind, snr_arr, cflags)


def raw_release_like(n: int, seed: int, snr: float | np.ndarray, population: str
                     ) -> tuple[list[Spectrum], dict[str, np.ndarray], np.ndarray]:
    """``n`` release-like apStar rows of one generator population in raw flux units:
    (spectra, true labels, S/N)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _RAW_STREAM, len(population)]))
    labels, _ = synth.draw_labels_with_kind(n, rng, population)
    wave = apstar_wavelength()
    on_chip = synth.chip_mask(wave)
    snr = np.broadcast_to(np.asarray(snr, dtype=float), (n,)).copy()
    bad_bits = flag("BADPIX", "CRPIX")
    spectra = []
    for i in range(n):
        lab = {k: float(labels[k][i]) for k in synth.ALL_LABELS}
        norm = synth.synthesize(lab, wave, synth.RELEASE_SETTINGS, fiber=int(rng.integers(1, 301)))
        a_h = rng.exponential(0.15)
        cont = synth.continuum(lab, wave) * 10.0 ** (-0.4 * a_h * (wave / 16500.0) ** -2.0)
        throughput = np.ones(wave.size)
        for c, (lo, hi) in enumerate(synth.APSTAR_CHIP_PIXELS):
            x = np.linspace(-1.0, 1.0, hi - lo + 1)
            throughput[lo:hi + 1] = ((1.05, 1.0, 0.92)[c] * np.exp(rng.normal(0.0, 0.08))
                                     * (1 + rng.normal(0.0, 0.04) * x + rng.normal(0.0, 0.03) * x * x))
        obj = 500.0 * norm * cont * throughput
        level = float(np.median(obj[on_chip]))
        sigma = level / snr[i] * np.sqrt(np.clip(obj / level, 1e-3, None))
        f = obj + rng.normal(size=wave.size) * sigma
        bad = rng.random(wave.size) < 0.02
        f = np.where(bad, f * rng.normal(1.0, 0.3, wave.size), f)
        spectra.append(Spectrum(wave, np.where(on_chip, f, np.nan), np.where(on_chip, 1.0 / sigma**2, 0.0),
                                np.where(bad, bad_bits, 0), {"snr": float(snr[i]), "frame": "rest"}))
    return spectra, {k: labels[k] for k in ("teff", "logg", "fe_h")}, snr
