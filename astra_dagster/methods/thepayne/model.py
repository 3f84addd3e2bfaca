"""The emulator (:class:`PayneModel`): the label sets it can take, the modelled pixels, the network's
forward pass and Jacobian, and its ``.npz`` file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astra_dagster.methods import continuum
from astra_dagster.methods.modelfile import read_arrays, write_arrays
from astra_dagster.methods.thepayne.flags import PayneError
from astra_dagster.spectra.spectrum import APSTAR_NPIX

FORMAT = "astra-thepayne/1"
#: Labels an emulator can take. vmicro, [C/Fe] and [N/Fe] are fitted (as ASPCAP and the
#: original Payne do) because leaving them out costs accuracy on the main labels: on the upper
#: giant branch a star's own C and N (CN, CO bands) read as 0.2-0.4 dex of logg and [Fe/H].
FIT_LABELS: tuple[str, ...] = ("teff", "logg", "fe_h", "alpha_m", "vmicro", "c_fe", "n_fe")
#: Labels every model must have.
REQUIRED_LABELS: tuple[str, ...] = ("teff", "logg", "fe_h")
#: The default label set: the labels the generator's physical model carries (its spectra do not
#: depend on [α/M], vmicro, [C/Fe] or [N/Fe]; a model fitting them would fit noise).
LABELS: tuple[str, ...] = REQUIRED_LABELS
#: astra.thepayne column of each label; [C/Fe] and [N/Fe] are stored as [C/H] and [N/H].
COLUMNS: dict[str, str] = {"teff": "teff", "logg": "logg", "fe_h": "fe_h", "alpha_m": "alpha_m",
                           "vmicro": "v_turb", "c_fe": "c_h", "n_fe": "n_h"}
#: Labels relative to iron whose column is relative to hydrogen.
_PER_FE = ("c_fe", "n_fe")
LEAK = 0.01

#: Pixels at each chip end left out of the fit (a shifted model has no data beyond the chip).
EDGE_PIXELS = 4
def model_pixels() -> np.ndarray:
    """Indices (7791,) of the apStar pixels the emulator renders: the three detector chips."""
    return np.flatnonzero(continuum.chip_index() >= 0)


def _leaky(z: np.ndarray) -> np.ndarray:
    return np.where(z > 0, z, LEAK * z)


def _leaky_slope(z: np.ndarray) -> np.ndarray:
    return np.where(z > 0, np.float32(1.0), np.float32(LEAK)).astype(z.dtype)


# ----------------------------------------------------------------------------- model


class PayneModel:
    """A trained emulator: weights (float32), label scaling, per-pixel emulator error, the
    start grid for fits and a ``meta`` dict of training facts."""

    def __init__(self, *, label_names: Sequence[str], x_min: np.ndarray, x_max: np.ndarray, pixels: np.ndarray,
                 weights: Sequence[np.ndarray], basis: np.ndarray, mean: np.ndarray, model_sigma: np.ndarray,
                 start_points: np.ndarray, label_floor: np.ndarray | None = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.label_names = tuple(str(n) for n in label_names)
        k = len(self.label_names)
        self.x_min = np.asarray(x_min, dtype=float).reshape(k)
        self.x_max = np.asarray(x_max, dtype=float).reshape(k)
        if not np.all(self.x_max > self.x_min):
            raise PayneError(f"label ranges must be non-empty: min {self.x_min}, max {self.x_max}")
        self.pixels = np.asarray(pixels, dtype=np.int64)
        w0, b0, w1, b1, w2, b2 = (np.asarray(w, dtype=np.float32) for w in weights)
        basis = np.asarray(basis, dtype=np.float32)
        mean = np.asarray(mean, dtype=np.float32)
        h = w0.shape[1]
        nc = basis.shape[0] if basis.ndim == 2 else -1
        npix = self.pixels.size
        shapes = {"w0": (w0.shape, (k, h)), "b0": (b0.shape, (h,)), "w1": (w1.shape, (h, h)), "b1": (b1.shape, (h,)),
                  "w2": (w2.shape, (h, nc)), "b2": (b2.shape, (nc,)), "basis": (basis.shape, (nc, npix)),
                  "mean": (mean.shape, (npix,))}
        for name, (got, want) in shapes.items():
            if got != want:
                raise PayneError(f"emulator weight {name} has shape {got}, expected {want}")
        self.w0, self.b0, self.w1, self.b1, self.w2, self.b2 = w0, b0, w1, b1, w2, b2
        self.basis, self.mean = basis, mean
        self.model_sigma = np.asarray(model_sigma, dtype=float).reshape(npix)
        self.start_points = np.asarray(start_points, dtype=float).reshape(-1, k)
        self.label_floor = np.zeros(k) if label_floor is None else np.asarray(label_floor, dtype=float).reshape(k)
        self.meta = dict(meta or {})
        # Pixel shift machinery: chip bounds of every modelled pixel (in model-pixel indices).
        chip = continuum.chip_index()[self.pixels]
        lo = np.zeros(npix, dtype=np.int64)
        hi = np.zeros(npix, dtype=np.int64)
        for c in np.unique(chip):
            sel = np.flatnonzero(chip == c)
            lo[sel], hi[sel] = sel[0], sel[-1]
        self._lo, self._hi = lo, hi
        pos = np.arange(npix)
        self._fit_ok = (pos - lo >= EDGE_PIXELS) & (hi - pos >= EDGE_PIXELS)

    # -- sizes and scaling
    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def hidden(self) -> int:
        return int(self.w0.shape[1])

    @property
    def n_pixels(self) -> int:
        return int(self.pixels.size)

    def scale(self, labels: np.ndarray) -> np.ndarray:
        """Physical labels (..., k) → scaled labels in [-0.5, 0.5] over the training range."""
        return (np.asarray(labels, dtype=float) - self.x_min) / (self.x_max - self.x_min) - 0.5

    def unscale(self, scaled: np.ndarray) -> np.ndarray:
        """Scaled labels (..., k) → physical labels."""
        return self.x_min + (np.asarray(scaled, dtype=float) + 0.5) * (self.x_max - self.x_min)

    # -- evaluation
    def predict_scaled(self, xs: np.ndarray) -> np.ndarray:
        """Normalised flux (n, n_pixels) at scaled labels (n, k)."""
        a1 = _leaky(np.atleast_2d(xs).astype(np.float32) @ self.w0 + self.b0)
        a2 = _leaky(a1 @ self.w1 + self.b1)
        return ((a2 @ self.w2 + self.b2) @ self.basis + self.mean).astype(float)

    def predict(self, labels: Mapping[str, Any] | np.ndarray) -> np.ndarray:
        """Normalised flux (n, n_pixels) on :attr:`pixels` for physical labels: an (n, k)
        array in :attr:`label_names` order or a mapping name → value(s)."""
        if isinstance(labels, Mapping):
            missing = [n for n in self.label_names if n not in labels]
            if missing:
                raise PayneError(f"labels lack {missing} (model labels {self.label_names})")
            arr = np.column_stack([np.atleast_1d(np.asarray(labels[n], dtype=float)) for n in self.label_names])
        else:
            arr = np.atleast_2d(np.asarray(labels, dtype=float))
        if arr.shape[-1] != self.n_labels:
            raise PayneError(f"labels have {arr.shape[-1]} columns, the model has {self.n_labels}")
        return self.predict_scaled(self.scale(arr))

    def predict_full(self, labels: Mapping[str, Any] | np.ndarray) -> np.ndarray:
        """:meth:`predict` on the whole 8575-pixel apStar grid (NaN outside the chips)."""
        flux = self.predict(labels)
        out = np.full((flux.shape[0], APSTAR_NPIX), np.nan)
        out[:, self.pixels] = flux
        return out

    def _value_and_jacobian(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flux (n_pixels,) and its derivative (k, n_pixels) w.r.t. the scaled labels at one point."""
        x = np.asarray(xs, dtype=np.float32).reshape(1, -1)
        z1 = x @ self.w0 + self.b0
        a1 = _leaky(z1)
        z2 = a1 @ self.w1 + self.b1
        # d flux / d x = W0 diag(σ'(z1)) W1 diag(σ'(z2)) W_out, chained from the input side;
        # with W_out = W2·B factorised; the activations and the k derivative rows go through
        # the basis B (the only large matrix) in one product
        d1 = self.w0 * _leaky_slope(z1[0])[None, :]
        d2 = (d1 @ self.w1) * _leaky_slope(z2[0])[None, :]
        coef = np.vstack([_leaky(z2), d2]) @ self.w2
        coef[0] += self.b2
        both = (coef @ self.basis).astype(float)
        both[0] += self.mean
        return both[0], both[1:]

    # -- bookkeeping
    def summary(self) -> dict[str, Any]:
        """Small JSON-able facts for the model asset's metadata."""
        keys = ("n_train", "n_validation", "seed", "epochs", "best_epoch", "n_components", "kinds",
                "heldout_rms", "heldout_p95", "train_rms", "n_calibration", "calibration_failed",
                "generation_seconds", "training_seconds", "continuum_fingerprint")
        out: dict[str, Any] = {"format": FORMAT, "label_names": list(self.label_names), "hidden": self.hidden,
                               "n_pixels": self.n_pixels,
                               "label_min": [float(v) for v in self.x_min], "label_max": [float(v) for v in self.x_max]}
        out.update({k: self.meta[k] for k in keys if k in self.meta})
        out["label_floor"] = {n: float(v) for n, v in zip(self.label_names, self.label_floor, strict=True)}
        return out

    def __repr__(self) -> str:
        return (f"PayneModel(labels={self.label_names}, hidden={self.hidden}, pixels={self.n_pixels}, "
                f"heldout_rms={self.meta.get('heldout_rms')})")

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the model to exactly ``path`` as one ``.npz`` file (temp file + rename)."""
        path = Path(path)
        arrays = {
            "format": np.array(FORMAT),
            "config": np.array(json.dumps({"label_names": list(self.label_names), "meta": self.meta}, sort_keys=True)),
            "x_min": self.x_min, "x_max": self.x_max, "pixels": self.pixels,
            "w0": self.w0, "b0": self.b0, "w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2,
            "basis": self.basis, "mean": self.mean,
            "model_sigma": self.model_sigma, "start_points": self.start_points, "label_floor": self.label_floor,
        }
        return write_arrays(path, arrays)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> PayneModel:
        """Read a model written by :meth:`write`; :class:`PayneError` naming the file for anything
        else (FileNotFoundError if it does not exist)."""
        path = Path(path)
        needed = ("format", "config", "x_min", "x_max", "pixels", "w0", "b0", "w1", "b1", "w2", "b2", "basis",
                  "mean", "model_sigma", "start_points", "label_floor")
        contents = read_arrays(path, what="Payne model", error=PayneError, required=needed, file_format=FORMAT)
        try:
            config = json.loads(str(contents["config"]))
            return cls(label_names=config["label_names"], x_min=contents["x_min"], x_max=contents["x_max"],
                       pixels=contents["pixels"],
                       weights=[contents[k] for k in ("w0", "b0", "w1", "b1", "w2", "b2")],
                       basis=contents["basis"], mean=contents["mean"], model_sigma=contents["model_sigma"],
                       start_points=contents["start_points"], label_floor=contents["label_floor"],
                       meta=config["meta"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PayneError(f"{path}: bad Payne model contents ({exc})") from exc
