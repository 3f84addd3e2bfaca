"""The trained model (:class:`ApogeeNet`): training with early stopping, the error floors, prediction
with Monte Carlo uncertainties, and its ``.npz`` weight file.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astra_dagster.methods.apogeenet import screen
from astra_dagster.methods.apogeenet.augment import Augmentation, augment
from astra_dagster.methods.apogeenet.flags import FATAL_FLAGS, FE_H_RELIABLE_TEFF, LABELS, ApogeeNetError, ApogeeNetFlag
from astra_dagster.methods.apogeenet.network import DEFAULT_BLOCKS, DEFAULT_HIDDEN, _Adam, _Network
from astra_dagster.methods.apogeenet.preprocess import (
    _CHIP_INDEX,
    CROP,
    _check_arrays,
    _masked_median,
    input_sigma,
    preprocess,
    usable_pixels,
)
from astra_dagster.methods.apogeenet.results import ApogeeNetResult
from astra_dagster.methods.modelfile import write_arrays
from astra_dagster.methods.progress import reporter

#: Version of the weight-file layout (checked by :meth:`ApogeeNet.read`).
FILE_FORMAT = "astra-apogeenet/1"

#: Predicted Teff from which a star counts as hot for the error floors.
HOT_TEFF = 7000.0
#: Fewest validation stars a regime needs for its own error floor.
MIN_FLOOR_STARS = 15
#: Fewest training spectra :meth:`ApogeeNet.train` accepts (a validation split must remain).
MIN_TRAINING_SPECTRA = 20

# ----------------------------------------------------------------------------- the model


@dataclass
class TrainingReport:
    """What happened in :meth:`ApogeeNet.train`."""

    epochs_run: int = 0
    best_epoch: int = 0
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    #: Residual statistics of the direct pass on the augmented (noisy) validation split:
    #: label → {"rms", "robust_sigma", "bias"} (teff in K, plus "teff_frac" for ΔTeff/Teff).
    validation: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pull_floor(resid: np.ndarray, std: np.ndarray) -> float:
    """Smallest floor f ≥ 0 with robust spread (1.4826 × median |pull|) of resid / √(std² + f²)
    at most 1. Robust: the rms would let a few catastrophic failures set the floor of all stars."""
    ok = np.isfinite(resid) & np.isfinite(std)
    r, s = resid[ok], std[ok]
    if r.size < 2:
        return 0.0

    def spread(fl: float) -> float:
        return float(1.4826 * np.median(np.abs(r) / np.sqrt(s**2 + fl**2 + 1e-30)))

    if spread(0.0) <= 1.0:
        return 0.0
    lo, hi = 0.0, float(np.sqrt(np.mean(r**2))) * 3.0 + 1e-12
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if spread(mid) > 1.0 else (lo, mid)
    return hi


def _residual_stats(value: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    """rms, robust σ and bias of (n, 3) predictions in output units against the truth, per
    label in physical units (Teff in K; ``teff_frac`` is ΔTeff/Teff)."""
    from astra_dagster.methods.metrics import robust_sigma

    out: dict[str, dict[str, float]] = {}
    t_pred, t_true = 10.0 ** value[:, 0], 10.0 ** truth[:, 0]
    deltas = {"teff": t_pred - t_true, "teff_frac": (t_pred - t_true) / t_true,
              "logg": value[:, 1] - truth[:, 1], "fe_h": value[:, 2] - truth[:, 2]}
    for name, d in deltas.items():
        d = d[np.isfinite(d)]
        if d.size == 0:
            continue
        out[name] = {"rms": float(np.sqrt(np.mean(d**2))), "robust_sigma": robust_sigma(d),
                     "bias": float(np.mean(d))}
    return out


class ApogeeNet:
    """The network plus everything needed to use it (label scaling, trained ranges, error floor).

    ``blocks``: (kernel, channels) per conv block; ``hidden``: dense width; ``bin_factor``:
    apStar pixels averaged per input bin. Construct, then :meth:`train`, or :meth:`read` a file.
    """

    def __init__(self, blocks: Sequence[tuple[int, int]] = DEFAULT_BLOCKS, hidden: int = DEFAULT_HIDDEN,
                 bin_factor: int = 4, *, min_good_fraction: float = 0.5) -> None:
        if bin_factor < 1 or (CROP[1] - CROP[0]) % bin_factor:
            raise ApogeeNetError(f"bin_factor={bin_factor} must divide {CROP[1] - CROP[0]}")
        if not blocks or any(k < 1 or c < 1 for k, c in blocks):
            raise ApogeeNetError(f"blocks must be a non-empty list of (kernel, channels) >= 1, got {blocks}")
        if not 0.0 < min_good_fraction <= 1.0:
            raise ApogeeNetError(f"min_good_fraction={min_good_fraction} must be in (0, 1]")
        self.bin_factor = int(bin_factor)
        self.min_good_fraction = float(min_good_fraction)
        self.net = _Network((CROP[1] - CROP[0]) // self.bin_factor, blocks, hidden, len(LABELS))
        self.label_mean = np.zeros(len(LABELS))
        self.label_std = np.ones(len(LABELS))
        self.input_mean = np.zeros(self.net.n_in, dtype=np.float32)
        self.label_range: dict[str, tuple[float, float]] = {}
        #: Error floor per regime (cool, hot: predicted Teff vs :data:`HOT_TEFF`) and output
        #: (log10 Teff, logg, [Fe/H]), added in quadrature to the MC scatter.
        self.error_floor = np.zeros((2, len(LABELS)))
        #: Reference line profiles of the mismatch screen (:mod:`.screen`): mean (n_in,) and
        #: basis (n_in, k) of the high-passed training inputs. None (model files from before the
        #: screen): the screen is skipped and ``line_chi2`` is NaN.
        self.line_mean: np.ndarray | None = None
        self.line_basis: np.ndarray | None = None
        self.report = TrainingReport()
        self.trained = False

    # -- training ---------------------------------------------------------------------------

    def _targets(self, labels: Mapping[str, Sequence[float]], n: int) -> np.ndarray:
        missing = [k for k in LABELS if k not in labels]
        if missing:
            raise ApogeeNetError(f"training labels lack {missing} (need {list(LABELS)})")
        cols = []
        for name in LABELS:
            v = np.asarray(labels[name], dtype=float)
            if v.shape != (n,):
                raise ApogeeNetError(f"training label {name!r} has shape {v.shape}, expected ({n},)")
            bad = np.flatnonzero(~np.isfinite(v) | ((v <= 0) if name == "teff" else False))
            if bad.size:
                raise ApogeeNetError(f"training label {name!r} is not finite/valid for spectra {bad[:10].tolist()}")
            cols.append(np.log10(v) if name == "teff" else v)
        return np.column_stack(cols)

    def train(
        self,
        flux: np.ndarray,
        ivar: np.ndarray,
        labels: Mapping[str, Sequence[float]],
        *,
        seed: int = 0,
        epochs: int = 30,
        batch_size: int = 64,
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-4,
        validation_fraction: float = 0.1,
        patience: int = 6,
        augmentation: Augmentation | None = Augmentation(),  # noqa: B008 (a frozen dataclass)
        pixel_flags: np.ndarray | None = None,
        max_seconds: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> ApogeeNet:
        """Fit the network to (n, 8575) apStar-grid spectra with labels ``teff``, ``logg``,
        ``fe_h`` (arrays of n). Returns ``self``.

        ``augmentation`` draws fresh noise/throughput/masks every epoch (pass noiseless flux);
        ``None`` uses the flux as given. The learning rate decays by cosine over ``epochs``;
        training stops early when the validation loss has not improved for ``patience`` epochs
        (or after ``max_seconds``) and the best weights are kept. Then the error floor is fitted
        on the validation split. ``log`` (a progress callback) gets a line per epoch: losses,
        best epoch, elapsed seconds.
        """
        t_start = time.perf_counter()
        log_line = reporter(log, "apogeenet")
        flux, ivar, pixel_flags = _check_arrays(flux, ivar, pixel_flags)
        n = flux.shape[0]
        if epochs < 1 or batch_size < 1:
            raise ApogeeNetError(f"epochs={epochs} and batch_size={batch_size} must be >= 1")
        if not 0.0 < validation_fraction < 1.0:
            raise ApogeeNetError(f"validation_fraction={validation_fraction} must be in (0, 1)")
        if n < MIN_TRAINING_SPECTRA:
            raise ApogeeNetError(f"{n} training spectra are too few to train APOGEENet "
                                 f"(need at least {MIN_TRAINING_SPECTRA})")
        y_raw = self._targets(labels, n)
        flat_labels = [name for name, sd in zip(LABELS, y_raw.std(axis=0), strict=True) if not sd > 1e-6]
        if flat_labels:
            raise ApogeeNetError(f"training labels {flat_labels} do not vary across the {n} spectra: "
                                 "the network cannot learn them")
        good, _ = usable_pixels(flux, ivar, pixel_flags)
        frac = good[:, _CHIP_INDEX].mean(axis=1)
        unusable = np.flatnonzero(frac < self.min_good_fraction)
        if unusable.size:
            raise ApogeeNetError(f"training spectra {unusable[:10].tolist()} have fewer than "
                                 f"{self.min_good_fraction:.0%} usable chip pixels")
        n_val = max(1, round(validation_fraction * n))
        if n - n_val < 2:
            raise ApogeeNetError(f"{n} training spectra are too few (need at least {n_val + 2})")
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x616E6574]))
        self.net = _Network(self.net.n_in, self.net.blocks, self.net.hidden, len(LABELS), rng)
        order = rng.permutation(n)
        val_idx, tr_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        self.label_mean = y_raw[tr_idx].mean(axis=0)
        self.label_std = np.maximum(y_raw[tr_idx].std(axis=0), 1e-6)
        y = ((y_raw - self.label_mean) / self.label_std).astype(np.float32)
        trained = {k: np.asarray(labels[k], dtype=float)[tr_idx] for k in LABELS}
        self.label_range = {k: (float(v.min()), float(v.max())) for k, v in trained.items()}

        def inputs(idx: np.ndarray, r: np.random.Generator) -> np.ndarray:
            if augmentation is None:
                return self._inputs(flux[idx], good[idx])
            f, g, _ = augment(flux[idx], good[idx], r, augmentation)
            return self._inputs(f, g)

        # Inputs are centred on the mean pre-processed training spectrum (from a first augmented
        # pass). Not rescaled: log-flux is O(0.1), and scaling it up to unit variance made the
        # first layer's effective step size 10x larger and training worse (measured).
        self.input_mean = np.zeros(self.net.n_in, dtype=np.float32)
        x_first = inputs(tr_idx, rng)
        self.input_mean = x_first.mean(axis=0)
        x_first = x_first - self.input_mean
        val_rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x76616C]))
        x_val = inputs(val_idx, val_rng)
        y_val = y[val_idx]
        opt = _Adam(self.net.params, learning_rate, weight_decay)
        report = TrainingReport(n_train=tr_idx.size, n_val=val_idx.size)
        best = (math.inf, {k: v.copy() for k, v in self.net.params.items()}, 0)
        steps_per_epoch = math.ceil(tr_idx.size / batch_size)
        total_steps = epochs * steps_per_epoch
        step = 0
        for epoch in range(1, epochs + 1):
            x_tr = x_first if epoch == 1 else inputs(tr_idx, rng)
            perm = rng.permutation(tr_idx.size)
            losses = []
            for s in range(0, perm.size, batch_size):
                bi = perm[s: s + batch_size]
                out, cache = self.net.forward(x_tr[bi], keep=True)
                diff = out - y[tr_idx[bi]]
                losses.append(float(np.mean(diff**2)))
                grads = self.net.backward((2.0 / diff.size) * diff, cache)
                lr = learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
                opt.step(self.net.params, grads, lr)
                step += 1
            val = float(np.mean((self.net.predict(x_val) - y_val) ** 2))
            report.train_loss.append(float(np.mean(losses)))
            report.val_loss.append(val)
            report.epochs_run = epoch
            if val < best[0]:
                best = (val, {k: v.copy() for k, v in self.net.params.items()}, epoch)
            log_line(f"epoch {epoch}/{epochs}: train loss {report.train_loss[-1]:.4f}, validation loss "
                     f"{val:.4f} (best {best[0]:.4f} at epoch {best[2]})")
            if epoch - best[2] >= patience:
                log_line(f"early stop: no validation improvement for {patience} epochs")
                break
            if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
                log_line(f"stopping after max_seconds={max_seconds:g}")
                break
        self.net.params = best[1]
        report.best_epoch = best[2]
        # the screen's reference: the noiseless training inputs, the profiles the generator can make
        x_ref, _ = preprocess(flux[tr_idx], good[tr_idx], self.bin_factor)
        self.line_mean, self.line_basis = screen.fit_reference(x_ref, self.bin_factor, rng)
        self.trained = True
        self.report = report
        log_line(f"fitting the error floor on {val_idx.size} validation spectra")
        self._fit_error_floor(flux[val_idx], ivar[val_idx], good[val_idx], y_raw[val_idx], val_rng, augmentation)
        report.seconds = time.perf_counter() - t_start
        return self

    def _fit_error_floor(self, flux: np.ndarray, ivar: np.ndarray, good: np.ndarray, y_raw: np.ndarray,
                         rng: np.random.Generator, augmentation: Augmentation | None) -> None:
        """Error floors (rows: predicted Teff below / above :data:`HOT_TEFF`; columns: outputs)
        such that residual / √(σ_MC² + floor²) has unit robust spread on the validation split
        (observed as the augmentation would, noise included). Hot stars are a separate regime:
        their few weak lines leave them several times less precise than cool stars, and one
        floor for both would overstate the cool stars' errors. A regime with fewer than
        :data:`MIN_FLOOR_STARS` validation stars takes the floor of all stars together."""
        self.error_floor = np.zeros((2, len(LABELS)))
        f, g, iv = flux, good, np.where(good, ivar, 0.0)
        if augmentation is not None:
            f, g, sigma = augment(flux, good, rng, augmentation)
            if sigma is not None:
                iv = np.where(g, 1.0 / np.maximum(sigma, 1e-30) ** 2, 0.0)
        value, std, _ = self._mc(f, iv, g, 10, rng)
        resid = value - y_raw
        self.report.validation = _residual_stats(value, y_raw)
        hot = value[:, 0] >= math.log10(HOT_TEFF)
        floor = np.zeros((2, len(LABELS)))
        for j in range(len(LABELS)):
            overall = _pull_floor(resid[:, j], std[:, j])
            for row, sel in enumerate((~hot, hot)):
                floor[row, j] = (_pull_floor(resid[sel, j], std[sel, j]) if sel.sum() >= MIN_FLOOR_STARS
                                 else overall)
        self.error_floor = floor

    # -- prediction -------------------------------------------------------------------------

    def _mc(self, flux: np.ndarray, ivar: np.ndarray, good: np.ndarray, n_draws: int,
            rng: np.random.Generator, chunk: int = 64, seed: int | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels from the direct pass and their standard deviation over ``n_draws`` noisy copies
        of the input (NaN std for ``n_draws`` < 2), in output units (log10 Teff, logg, [Fe/H]),
        and the screen's ``line_chi2`` (:func:`.screen.line_chi2`; NaN without a reference).

        The value is the direct pass, not the mean of the copies: each copy carries the data's
        noise twice. The noise is drawn on the binned log-flux input with the per-bin σ that
        the pixel σ propagates to (:func:`input_sigma`), so the costly pre-processing (sorting
        for the median and the clip levels) runs once per spectrum, not once per copy.

        With ``seed``, each spectrum's noise comes from its own stream (``seed`` and a hash of its
        input), so its uncertainty does not depend on which other spectra share the call.
        """
        n = flux.shape[0]
        value = np.full((n, len(LABELS)), np.nan)
        std = np.full((n, len(LABELS)), np.nan)
        chi2 = np.full(n, np.nan)
        screened = self.line_mean is not None and self.line_basis is not None
        for s in range(0, n, chunk):
            f, iv, g = flux[s: s + chunk], ivar[s: s + chunk], good[s: s + chunk]
            m = f.shape[0]
            x, level = preprocess(f, g, self.bin_factor)
            sx = input_sigma(f, iv, g, level, self.bin_factor) if screened or n_draws >= 2 else None
            if screened:
                chi2[s: s + m] = screen.line_chi2(x, sx, self.line_mean, self.line_basis, self.bin_factor)
            x -= self.input_mean
            value[s: s + m] = self._destandardise(self.net.predict(x))
            if n_draws < 2:
                continue
            if seed is None:
                draws = rng.standard_normal((n_draws, m, x.shape[1]), dtype=np.float32)
            else:
                draws = np.stack([
                    np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(np.ascontiguousarray(row).tobytes())])
                    .standard_normal((n_draws, x.shape[1]), dtype=np.float32) for row in x], axis=1)
            noisy = x[None] + sx[None] * draws
            # small batches keep each layer's activations in cache: 256 rows were 1.6x slower
            out = self._destandardise(self.net.predict(noisy.reshape(n_draws * m, -1), batch=8))
            std[s: s + m] = out.reshape(n_draws, m, len(LABELS)).std(axis=0, ddof=1)
        return value, std, chi2

    def _inputs(self, flux: np.ndarray, good: np.ndarray) -> np.ndarray:
        """Pre-processed, standardised network inputs."""
        x, _ = preprocess(flux, good, self.bin_factor)
        return x - self.input_mean

    def _destandardise(self, out: np.ndarray) -> np.ndarray:
        return out.astype(float) * self.label_std + self.label_mean

    def predict(self, flux: np.ndarray, ivar: np.ndarray, pixel_flags: np.ndarray | None = None, *,
                n_draws: int = 20, seed: int = 0) -> ApogeeNetResult:
        """Labels for (n, 8575) apStar-grid rows (a single row may be 1-D).

        The labels come from the direct forward pass; ``n_draws`` noisy copies give the
        Monte-Carlo σ, to which the error floor is added in quadrature (``n_draws`` < 2: the
        floor alone, NaN raw σ). Per-spectrum problems
        never raise: they set :class:`ApogeeNetFlag` bits (and NaN labels for fatal ones). A
        spectrum whose ``line_chi2`` exceeds :data:`.screen.LINE_MISMATCH_CHI2` (lines where the
        training set has none: a real star while the generator is not physical) gets
        ``POOR_MODEL_MATCH`` and NaN labels and uncertainties; models read from files without the
        screen's reference skip this check (``line_chi2`` NaN).
        Raises :class:`ApogeeNetError` only for an untrained model or arrays of the wrong shape.
        """
        if not self.trained:
            raise ApogeeNetError("this ApogeeNet has not been trained (call train() or ApogeeNet.read())")
        if n_draws < 0:
            raise ApogeeNetError(f"n_draws={n_draws} must be >= 0")
        flux, ivar, pixel_flags = _check_arrays(flux, ivar, pixel_flags)
        n = flux.shape[0]
        flags = np.zeros(n, dtype=np.int64)
        good, odd = usable_pixels(flux, ivar, pixel_flags)
        flags[odd] |= ApogeeNetFlag.NON_FINITE_INPUT
        frac = good[:, _CHIP_INDEX].mean(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN is the answer
            level = _masked_median(flux, good)
            snr = _masked_median(flux * np.sqrt(np.where(good, ivar, 0.0)), good)
        flags[~(level > 0)] |= ApogeeNetFlag.NO_FLUX
        flags[(frac < self.min_good_fraction) & (frac > 0)] |= ApogeeNetFlag.MOSTLY_MASKED
        flags[frac == 0] |= ApogeeNetFlag.NO_FLUX
        run = (flags & FATAL_FLAGS) == 0
        mean = np.full((n, len(LABELS)), np.nan)
        std = np.full((n, len(LABELS)), np.nan)
        chi2 = np.full(n, np.nan)
        if run.any():
            rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x6D63]))
            mean[run], std[run], chi2[run] = self._mc(flux[run], np.where(good[run], ivar[run], 0.0), good[run],
                                                      n_draws, rng, seed=int(seed))
        poor = np.isfinite(chi2) & (chi2 > screen.LINE_MISMATCH_CHI2)
        flags[poor] |= ApogeeNetFlag.POOR_MODEL_MATCH
        mean[poor] = np.nan  # the network's numbers for such a star are not labels
        std[poor] = np.nan
        with np.errstate(invalid="ignore"):
            floor = self.error_floor[(mean[:, 0] >= math.log10(HOT_TEFF)).astype(np.intp)]
        total = np.sqrt(np.where(np.isfinite(std), std, 0.0) ** 2 + floor**2)
        total[~np.isfinite(mean)] = np.nan
        teff = 10.0 ** mean[:, 0]
        u_teff = teff * math.log(10.0) * total[:, 0]
        raw_u_teff = teff * math.log(10.0) * std[:, 0]
        values = {"teff": teff, "logg": mean[:, 1], "fe_h": mean[:, 2]}
        for bit, name in ((ApogeeNetFlag.TEFF_OUT_OF_RANGE, "teff"), (ApogeeNetFlag.LOGG_OUT_OF_RANGE, "logg"),
                          (ApogeeNetFlag.FE_H_OUT_OF_RANGE, "fe_h")):
            lo, hi = self.label_range.get(name, (-math.inf, math.inf))
            v = values[name]
            flags[np.isfinite(v) & ((v < lo) | (v > hi))] |= bit
        lo_t, hi_t = FE_H_RELIABLE_TEFF
        flags[np.isfinite(teff) & ((teff > hi_t) | (teff < lo_t))] |= ApogeeNetFlag.FE_H_UNRELIABLE
        return ApogeeNetResult(teff=teff, u_teff=u_teff, logg=mean[:, 1], u_logg=total[:, 1], fe_h=mean[:, 2],
                               u_fe_h=total[:, 2], bitmask_flag=flags, snr=snr, raw_u_teff=raw_u_teff,
                               raw_u_logg=std[:, 1], raw_u_fe_h=std[:, 2], line_chi2=chi2)

    def summary(self) -> dict[str, Any]:
        """Small JSON-able facts about the model: architecture and sizes, training set sizes and
        time, epochs, held-out (validation split) errors per label, error floors."""
        if not self.trained:
            raise ApogeeNetError("this ApogeeNet has not been trained: nothing to summarise")
        rep = self.report
        floor = {f"{regime}_{name}": round(float(v), 5)
                 for regime, row in zip(("cool", "hot"), self.error_floor, strict=True)
                 for name, v in zip(("log10_teff", "logg", "fe_h"), row, strict=True)}
        return {
            "format": FILE_FORMAT,
            "blocks": [list(b) for b in self.net.blocks],
            "hidden": self.net.hidden,
            "bin_factor": self.bin_factor,
            "n_inputs": self.net.n_in,
            "n_parameters": self.net.n_parameters(),
            "n_train": int(rep.n_train),
            "n_validation": int(rep.n_val),
            "epochs_run": int(rep.epochs_run),
            "best_epoch": int(rep.best_epoch),
            "training_seconds": round(float(rep.seconds), 2),
            "final_val_loss": float(rep.val_loss[rep.best_epoch - 1]) if rep.best_epoch else None,
            "validation": {k: {s: round(v, 5) for s, v in d.items()} for k, d in rep.validation.items()},
            "error_floor": floor,
            "label_range": {k: [float(v[0]), float(v[1])] for k, v in self.label_range.items()},
        }

    # -- persistence ------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-able values."""
        return {"format": FILE_FORMAT, "blocks": [list(b) for b in self.net.blocks], "hidden": self.net.hidden,
                "bin_factor": self.bin_factor, "min_good_fraction": self.min_good_fraction,
                "crop": list(CROP), "labels": list(LABELS), "label_mean": self.label_mean.tolist(),
                "label_std": self.label_std.tolist(),
                "label_range": {k: list(v) for k, v in self.label_range.items()},
                "error_floor": self.error_floor.tolist(), "report": self.report.as_dict()}

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the model as one ``.npz`` at exactly ``path`` (atomically) and return the path."""
        if not self.trained:
            raise ApogeeNetError(f"refusing to write an untrained ApogeeNet to {path}")
        arrays = {f"param_{k}": v for k, v in self.net.params.items()}
        arrays["input_mean"] = self.input_mean.astype(np.float32)
        if self.line_mean is not None and self.line_basis is not None:
            arrays["line_mean"] = self.line_mean.astype(np.float32)
            arrays["line_basis"] = self.line_basis.astype(np.float32)
        arrays["config"] = np.array(json.dumps(self.config()))
        return write_arrays(path, arrays)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ApogeeNet:
        """Load a model written by :meth:`write`; :class:`ApogeeNetError` names the file on problems.

        Files written before the mismatch screen have no ``line_mean``/``line_basis``: they still
        load, and their predictions skip the screen (no ``POOR_MODEL_MATCH``, ``line_chi2`` NaN).
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                config = json.loads(str(data["config"]))
                params = {k[len("param_"):]: np.asarray(data[k], dtype=np.float32)
                          for k in data.files if k.startswith("param_")}
                input_mean = np.asarray(data["input_mean"], dtype=np.float32)
                # absent in files written before the mismatch screen: the screen is then skipped
                line_mean = np.asarray(data["line_mean"], dtype=np.float32) if "line_mean" in data.files else None
                line_basis = np.asarray(data["line_basis"], dtype=np.float32) if "line_basis" in data.files else None
        except FileNotFoundError as exc:
            raise ApogeeNetError(f"{path}: no such APOGEENet model file") from exc
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ApogeeNetError(f"{path}: not an APOGEENet model file ({exc})") from exc
        if config.get("format") != FILE_FORMAT:
            raise ApogeeNetError(f"{path}: format {config.get('format')!r}, expected {FILE_FORMAT!r}")
        if tuple(config.get("crop", ())) != CROP or tuple(config.get("labels", ())) != LABELS:
            raise ApogeeNetError(f"{path}: crop/labels {config.get('crop')}/{config.get('labels')} do not match "
                                 f"this code ({list(CROP)}/{list(LABELS)})")
        model = cls(tuple(tuple(b) for b in config["blocks"]), config["hidden"], config["bin_factor"],
                    min_good_fraction=config["min_good_fraction"])
        expected = {k: v.shape for k, v in _Network(model.net.n_in, model.net.blocks, model.net.hidden,
                                                     len(LABELS), np.random.default_rng(0)).params.items()}
        shapes = {k: v.shape for k, v in params.items()}
        if shapes != expected:
            raise ApogeeNetError(f"{path}: weight arrays {shapes} do not match the architecture {expected}")
        if input_mean.shape != (model.net.n_in,):
            raise ApogeeNetError(f"{path}: input_mean has shape {input_mean.shape}, expected ({model.net.n_in},)")
        if (line_mean is None) != (line_basis is None) or (line_mean is not None and (
                line_mean.shape != (model.net.n_in,) or line_basis.ndim != 2 or line_basis.shape[0] != model.net.n_in)):
            raise ApogeeNetError(f"{path}: screen reference line_mean/line_basis has shapes "
                                 f"{None if line_mean is None else line_mean.shape}/"
                                 f"{None if line_basis is None else line_basis.shape}, expected "
                                 f"({model.net.n_in},)/({model.net.n_in}, k)")
        model.net.params = params
        model.input_mean = input_mean
        model.line_mean, model.line_basis = line_mean, line_basis
        model.label_mean = np.asarray(config["label_mean"], dtype=float)
        model.label_std = np.asarray(config["label_std"], dtype=float)
        model.label_range = {k: (float(v[0]), float(v[1])) for k, v in config["label_range"].items()}
        model.error_floor = np.asarray(config["error_floor"], dtype=float)
        if model.error_floor.shape != (2, len(LABELS)):
            raise ApogeeNetError(f"{path}: error_floor has shape {model.error_floor.shape}, "
                                 f"expected (2, {len(LABELS)})")
        report = config.get("report", {})
        model.report = TrainingReport(**{k: report[k] for k in TrainingReport().__dict__ if k in report})
        model.trained = True
        return model
