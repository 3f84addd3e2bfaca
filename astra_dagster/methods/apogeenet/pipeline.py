"""APOGEENet as a pipeline method: the generator training set, :func:`train_model` and
:func:`fit_spectra` (rows of the ``astra.apogeenet`` columns).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from astra_dagster.methods.apogeenet.flags import ApogeeNetError
from astra_dagster.methods.apogeenet.model import MIN_TRAINING_SPECTRA, ApogeeNet
from astra_dagster.methods.apogeenet.network import DEFAULT_HIDDEN
from astra_dagster.methods.progress import Progress, reporter
from astra_dagster.spectra.spectrum import APSTAR_NPIX, Spectrum

#: Share of each generator population in the default training set. The survey mix has only
#: 5 % hot and 5 % YSO-like stars; APOGEENet's niche needs more of both, and hot stars, whose
#: few shallow lines change by < 1 % over thousands of kelvin, most (with 12 % hot stars a
#: 3000-spectrum network predicted ~14,000 K for every hot star: measured).
DEFAULT_MIX: dict[str, float] = {"giants": 0.30, "dwarfs": 0.22, "hot": 0.22, "yso": 0.12, "uniform": 0.14}
#: Default training size (:func:`train_model`): about 4 minutes on one core, generation included
#: (245-253 s in bench/accuracy.py; 3000 x 25 took 138-142 s but missed the logg target: rms
#: 0.140-0.168 at S/N >= 50 against 0.115-0.133 for this size, target 0.15).
DEFAULT_TRAINING: dict[str, Any] = {"n_spectra": 4500, "epochs": 30}
#: Full-size settings (bench/apogeenet_train.py; 17 minutes on one core, early stop at epoch 49).
#: Measured robust σ at S/N ≥ 50 on release-like raw spectra (ΔTeff/Teff, logg, [Fe/H]):
#: giants 0.8 % / 0.07 / 0.035, dwarfs 0.9 % / 0.08 / 0.020, YSO-like 1.2 % / 0.06 / 0.025,
#: hot stars 6.5 % / 0.12 / 0.19 (their [Fe/H] is flagged FE_H_UNRELIABLE).
FULL_TRAINING: dict[str, Any] = {"n_spectra": 12000, "epochs": 60}


def make_training_spectra(n: int, seed: int, *, mix: Mapping[str, float] | None = None,
                          settings: Any = None, progress: Progress | None = None
                          ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Noiseless apStar-like training spectra: (flux (n, 8575), ivar, labels).

    Drawn from the generator's populations in proportions ``mix`` (default :data:`DEFAULT_MIX`)
    with :data:`~astra_dagster.spectra.synth.TRAINING_SETTINGS` but hidden labels (vsini,
    vmacro, vmicro, [C/Fe], [N/Fe]) scattered: with them on their relations every hot star
    would spin at 120 km/s and the network would never see another. Multiplied by the star's
    continuum (as the raw apStar flux has it); throughput and noise are added per epoch by
    :meth:`ApogeeNet.train`. ``ivar`` is 1 on the chips, 0 in the gaps. ``labels`` holds every
    generator label (teff, logg, fe_h, alpha_m and the hidden ones) plus ``kind``.
    ``progress``: a line per population generated.
    """
    from astra_dagster.spectra import synth

    if n < 1:
        raise ApogeeNetError(f"training set size must be >= 1, got {n}")
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = [k for k in mix if k not in synth.POPULATIONS]
    if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ApogeeNetError(f"mix {mix} must give non-negative shares of {synth.POPULATIONS}")
    total = sum(mix.values())
    names = list(mix)
    counts = [int(n * mix[k] / total) for k in names]
    counts[int(np.argmax([mix[k] for k in names]))] += n - sum(counts)
    if settings is None:
        settings = dataclasses.replace(synth.TRAINING_SETTINGS, name="training-varied", vary_hidden=True)
    fluxes, ivars, labels = [], [], []
    report = reporter(progress, "apogeenet")
    done = 0
    for i, (pop, count) in enumerate(zip(names, counts, strict=True)):
        if count == 0:
            continue
        ts = synth.make_training_set(count, int(seed) * 16 + i, settings=settings, population=pop)
        cont = np.array([synth.continuum({k: ts.labels[k][j] for k in synth.MAIN_LABELS}, ts.wavelength)
                         for j in range(count)])
        fluxes.append((ts.flux * cont).astype(np.float32))
        ivars.append((ts.ivar > 0).astype(np.float32))
        labels.append({**ts.labels, "kind": np.asarray(ts.kind)})
        done += count
        report(f"training set: {done}/{n} spectra generated ({pop})")
    flux = np.concatenate(fluxes)
    ivar = np.concatenate(ivars)
    merged = {k: np.concatenate([lab[k] for lab in labels]) for k in labels[0]}
    return flux, ivar, merged


def train_default(seed: int = 0, *, n_spectra: int | None = None, epochs: int | None = None,
                  log: Callable[[str], None] | None = None, **kwargs: Any) -> ApogeeNet:
    """Generate a training set (:func:`make_training_spectra`) and train a default-size network.

    ``n_spectra`` and ``epochs`` default to :data:`DEFAULT_TRAINING`; ``kwargs`` go to
    :meth:`ApogeeNet.train` (or, for ``blocks``, ``hidden``, ``bin_factor``, to the constructor).
    """
    n_spectra = DEFAULT_TRAINING["n_spectra"] if n_spectra is None else n_spectra
    epochs = DEFAULT_TRAINING["epochs"] if epochs is None else epochs
    arch = {k: kwargs.pop(k) for k in ("blocks", "hidden", "bin_factor") if k in kwargs}
    log = reporter(log, "apogeenet") if log is not None else None  # one clock for generation and epochs
    flux, ivar, labels = make_training_spectra(n_spectra, seed, progress=log)
    return ApogeeNet(**arch).train(flux, ivar, labels, seed=seed, epochs=epochs, log=log, **kwargs)


def train_model(*, n_train: int = DEFAULT_TRAINING["n_spectra"], seed: int = 0,
                epochs: int = DEFAULT_TRAINING["epochs"], batch_size: int = 64, learning_rate: float = 2e-3,
                weight_decay: float = 1e-4, patience: int = 6, max_seconds: float = 0.0,
                hidden: int = DEFAULT_HIDDEN, blocks: str = "", bin_factor: int = 4,
                progress: Progress | None = None) -> ApogeeNet:
    """Train APOGEENet on ``n_train`` generator spectra drawn with ``seed`` (the Dagster entry point).

    Defaults train in about four minutes on one core (:data:`DEFAULT_TRAINING`); the full-size
    settings are :data:`FULL_TRAINING`. Every option is a plain number or string:
    ``max_seconds`` (0 = no limit) stops training early; ``blocks`` is the conv stack as
    ``"7x8,5x16,..."`` (kernel x channels; empty = :data:`DEFAULT_BLOCKS`). Raises
    :class:`ApogeeNetError` for a training set that is too small or unusable. ``progress`` gets a
    line per generated population and per epoch (losses, elapsed seconds); it does not change
    the network.
    """
    if n_train < MIN_TRAINING_SPECTRA:
        raise ApogeeNetError(f"n_train={n_train} is too small to train APOGEENet "
                             f"(need at least {MIN_TRAINING_SPECTRA})")
    arch: dict[str, Any] = {"hidden": int(hidden), "bin_factor": int(bin_factor)}
    if blocks.strip():
        try:
            arch["blocks"] = tuple(tuple(int(v) for v in part.lower().split("x")) for part in blocks.split(","))
        except ValueError as exc:
            raise ApogeeNetError(f"blocks={blocks!r}: expected 'kernel x channels' pairs like '7x8,5x16'") from exc
        if any(len(b) != 2 for b in arch["blocks"]):
            raise ApogeeNetError(f"blocks={blocks!r}: expected 'kernel x channels' pairs like '7x8,5x16'")
    return train_default(seed, n_spectra=int(n_train), epochs=int(epochs), batch_size=int(batch_size),
                         learning_rate=float(learning_rate), weight_decay=float(weight_decay),
                         patience=int(patience), max_seconds=float(max_seconds) or None, log=progress, **arch)


@functools.lru_cache(maxsize=1)
def _apstar_grid() -> np.ndarray:
    from astra_dagster.spectra.spectrum import apstar_wavelength

    return apstar_wavelength()


def _is_apstar_grid(wavelength: np.ndarray) -> bool:
    grid = _apstar_grid()
    return wavelength.shape == grid.shape and bool(np.allclose(wavelength, grid, rtol=1e-7, atol=0.0))


#: Columns of ``astra.apogeenet`` that :func:`fit_spectra` fills, in table order.
RESULT_COLUMNS = ("snr", "teff", "u_teff", "logg", "u_logg", "fe_h", "u_fe_h", "bitmask_flag")


def fit_spectra(model: ApogeeNet, spectra: Sequence[Spectrum], *, n_draws: int = 20,
                seed: int = 0) -> list[dict[str, Any]]:
    """One dict per spectrum with exactly the ``astra.apogeenet`` columns (:data:`RESULT_COLUMNS`).

    Each spectrum must be a rest-frame apStar row (8575-pixel grid): raw flux with continuum,
    ivar, APOGEE pixel flags. ``snr`` is ``spectrum.meta["snr"]`` when given, else the median
    flux·√ivar over usable pixels. Labels the network cannot give are None, with the reason in
    ``bitmask_flag`` (:class:`ApogeeNetFlag`; ``POOR_MODEL_MATCH`` from the model's mismatch
    screen, :mod:`.screen`); a bad spectrum never raises. Raises
    :class:`ApogeeNetError` for an untrained model or a spectrum not on the apStar grid.
    """
    if not isinstance(model, ApogeeNet):
        raise ApogeeNetError(f"fit_spectra needs an ApogeeNet model, got {type(model).__name__}")
    spectra = list(spectra)
    if not spectra:
        return []
    for i, spec in enumerate(spectra):
        if not _is_apstar_grid(np.asarray(spec.wavelength)):
            where = spec.meta.get("path", f"spectrum {i}")
            raise ApogeeNetError(f"{where}: APOGEENet needs rest-frame apStar spectra on the {APSTAR_NPIX}-pixel "
                                 f"grid, got {np.asarray(spec.wavelength).shape[0]} pixels "
                                 f"(frame {spec.meta.get('frame', '?')!r})")
    flux = np.stack([s.flux for s in spectra])
    ivar = np.stack([s.ivar for s in spectra])
    flags = np.stack([s.pixel_flags for s in spectra])
    result = model.predict(flux, ivar, flags, n_draws=n_draws, seed=seed)
    rows = []
    for spec, row in zip(spectra, result.rows(), strict=True):
        meta_snr = spec.meta.get("snr")
        try:
            meta_snr = float(meta_snr) if meta_snr is not None else None
        except (TypeError, ValueError):
            meta_snr = None
        if meta_snr is not None and math.isfinite(meta_snr):
            row["snr"] = meta_snr
        rows.append({k: row[k] for k in RESULT_COLUMNS})
    return rows
