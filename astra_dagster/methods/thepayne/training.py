"""The Payne (Ting et al. 2019) in numpy/scipy: a small neural-network emulator of
continuum-normalised APOGEE spectra, fitted to each spectrum by bounded non-linear least squares.

**Emulator.** flux(ℓ) = b₃ + W₃·σ(W₁·σ(W₀·ℓ̃ + b₀) + b₁), σ = leaky ReLU (slope 0.01), ℓ̃ the
labels (by default :data:`LABELS`: teff, logg, fe_h, alpha_m, vmicro, c_fe, n_fe) min-max scaled
to [-0.5, 0.5] over the training set. The
output is every pixel of the three detector chips of the apStar grid (7791 of 8575 pixels;
the gaps carry no data). Training (Adam, hand-written backpropagation, float32, mini-batches):

1. noiseless spectra from :func:`astra_dagster.spectra.synth.make_training_set` with
   ``TRAINING_SETTINGS`` (its own draw and settings, independent of any release), the survey
   population restricted to ``kinds`` (giants, dwarfs, YSO-like stars: hot stars are out of
   scope), normalised with :func:`astra_dagster.methods.continuum.normalize_arrays`, the same
   code the data go through;
2. a held-out part (``validation_fraction``) is put aside;
3. the output layer is factorised as W₃ = W₂·B with B the leading ``n_components`` principal
   components of the training fluxes (orthonormal rows). The network is trained on the PCA
   coefficients; because B is orthonormal the loss is exactly the pixel-space mean squared
   error within the subspace, and an epoch costs n·H² instead of n·H·7791 (the subspace
   truncation error is ~1e-4 rms at 96 components, far below the emulation error). After
   training, W₂·B is folded into one ordinary (H, 7791) output layer;
4. early stopping on the held-out rms (best epoch kept); the held-out per-pixel rms becomes the
   model's per-pixel emulator error, added in quadrature to the data errors when fitting (it
   down-weights the pixels the network renders badly).

**Fit** (:func:`fit_spectra`): continuum-normalise with :func:`continuum.normalize`; start from
the best few of a fixed set of training-label points by χ² (one batched forward pass); then
``scipy.optimize.least_squares`` (TRF) on (scaled labels, pixel shift) with the analytic
Jacobian of the network, labels bounded to the scaled box [-0.5, 0.5] and the shift to
±:data:`RV_LIMIT` km/s. The RV offset shifts the model on the log-λ grid by Catmull-Rom
interpolation (C¹ in the shift, so its Jacobian, from the interpolation weights' derivative,
is exact). The best χ² over the starts wins. Uncertainties from (JᵀWJ)⁻¹; reduced χ² over
the usable pixels. Per-spectrum problems go into ``bitmask_flag`` (:data:`FLAGS`); the labels
are None when the fit is not a measurement (too few pixels, a label pinned at the edge of the
training range, no convergence).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from astra_dagster.methods import continuum, hydrogen
from astra_dagster.methods.modelfile import read_arrays, write_arrays
from astra_dagster.spectra.spectrum import APSTAR_CDELT1, APSTAR_NPIX, C_KMS, Spectrum, apstar_wavelength

FORMAT = "astra-thepayne/1"
#: Labels an emulator can take. vmicro, [C/Fe] and [N/Fe] are fitted (as ASPCAP and the
#: original Payne do) because leaving them out costs accuracy on the main labels: on the upper
#: giant branch a star's own C and N (CN, CO bands) read as 0.2-0.4 dex of logg and [Fe/H].
FIT_LABELS: tuple[str, ...] = ("teff", "logg", "fe_h", "alpha_m", "vmicro", "c_fe", "n_fe")
#: Labels every model must have.
REQUIRED_LABELS: tuple[str, ...] = ("teff", "logg", "fe_h")
#: The default label set.
LABELS: tuple[str, ...] = FIT_LABELS
#: astra.thepayne column of each label; [C/Fe] and [N/Fe] are stored as [C/H] and [N/H].
COLUMNS: dict[str, str] = {"teff": "teff", "logg": "logg", "fe_h": "fe_h", "alpha_m": "alpha_m",
                           "vmicro": "v_turb", "c_fe": "c_h", "n_fe": "n_h"}
#: Labels relative to iron whose column is relative to hydrogen.
_PER_FE = ("c_fe", "n_fe")
LEAK = 0.01

FLAGS: dict[str, int] = {
    "NO_DATA": 1 << 0,            # too few usable pixels: not fitted
    "NON_FINITE_INPUT": 1 << 1,   # NaN/inf flux or ivar in pixels that carry weight (masked)
    "CONTINUUM_FAILED": 1 << 2,   # at least one chip could not be normalised (its pixels unused)
    "OUTSIDE_RANGE": 1 << 3,      # teff or logg pinned at the edge of the training range: labels None
    "RV_AT_BOUND": 1 << 4,        # the RV offset pinned at ±RV_LIMIT
    "NOT_CONVERGED": 1 << 5,      # least squares stopped on its evaluation budget
    "HIGH_CHI2": 1 << 6,          # reduced χ² above HIGH_CHI2: poor match (e.g. a star out of scope)
    "SINGULAR": 1 << 7,           # JᵀWJ not invertible: no uncertainties
    "AT_BOUND": 1 << 8,           # fe_h or alpha_m pinned at the edge of the training range: a limit
    "HYDROGEN_LINES": 1 << 9,     # Brackett lines far deeper than the best model: a hot star (methods.hydrogen)
}
#: Flags that make the labels meaningless (they are returned as None).
FATAL = FLAGS["NO_DATA"] | FLAGS["OUTSIDE_RANGE"] | FLAGS["NOT_CONVERGED"] | FLAGS["HYDROGEN_LINES"]
#: Labels whose pinning at a bound means the star is outside the emulator's domain (hot stars,
#: giants above the training branch); the abundance labels of the training set span a narrower
#: range than the data's scatter, so at their bounds the value is a limit, not a failure.
RANGE_LABELS = ("teff", "logg")
#: A spectrum needs this many usable modelled pixels to be fitted.
MIN_PIXELS = 500
#: Reduced χ² above which HIGH_CHI2 is set.
HIGH_CHI2 = 5.0
#: Bound on the fitted RV offset (km/s): spectra are already in the rest frame.
RV_LIMIT = 10.0
#: Scaled label within this distance of ±0.5 counts as at the bound.
BOUND_TOL = 2e-3
#: km/s per apStar pixel (log-linear grid).
KMS_PER_PIXEL = C_KMS * (10.0 ** APSTAR_CDELT1 - 1.0)
#: Pixels at each chip end left out of the fit (a shifted model has no data beyond the chip).
EDGE_PIXELS = 4
#: Training spectra generated and normalised per chunk.
TRAINING_CHUNK = 2500
#: Starting points tried per spectrum (best by χ² over the start grid).
N_STARTS = 2

#: Default (CI-size) training settings: about 2 minutes on one core.
DEFAULT_TRAINING: dict[str, Any] = {"n_train": 4000, "seed": 0, "hidden": 256, "epochs": 800}
#: Full-size training (bench / production): estimated 6-10 minutes on one core (not yet timed end to end).
FULL_TRAINING: dict[str, Any] = {"n_train": 12000, "seed": 0, "hidden": 256, "epochs": 1200}


class PayneError(ValueError):
    """Bad input to The Payne: unusable training set, wrong model file or array shapes."""


def describe_flags(value: int) -> list[str]:
    """Names of the :data:`FLAGS` bits set in ``value``."""
    return [name for name, bit in FLAGS.items() if int(value) & bit]


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


# ----------------------------------------------------------------------------- training


def _adam_train(x: np.ndarray, c: np.ndarray, xv: np.ndarray, cv: np.ndarray, *, hidden: int, epochs: int,
                batch_size: int, learning_rate: float, n_out_pixels: int, rng: np.random.Generator,
                log_every: int = 0) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Train the MLP x (n, k) → c (n, K) with Adam and hand-written backpropagation (float32).
    Loss: Σ_K (ĉ - c)² / n_out_pixels, the pixel mean squared error when c are coefficients of
    an orthonormal basis. Returns the weights of the best held-out epoch and training facts."""
    f32 = np.float32
    n, k = x.shape
    kk = c.shape[1]
    params = [
        (rng.standard_normal((k, hidden)) * np.sqrt(2.0 / k)).astype(f32),
        np.zeros(hidden, f32),
        (rng.standard_normal((hidden, hidden)) * np.sqrt(2.0 / hidden)).astype(f32),
        np.zeros(hidden, f32),
        (rng.standard_normal((hidden, kk)) * np.sqrt(1.0 / hidden) * c.std(axis=0)).astype(f32),
        c.mean(axis=0).astype(f32),
    ]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = 0
    n_batches = max(1, int(np.ceil(n / batch_size)))

    def evaluate(xx: np.ndarray, cc: np.ndarray, p: list[np.ndarray]) -> float:
        a1 = _leaky(xx @ p[0] + p[1])
        a2 = _leaky(a1 @ p[2] + p[3])
        return float(np.sqrt(np.sum((a2 @ p[4] + p[5] - cc) ** 2, dtype=np.float64) / (cc.shape[0] * n_out_pixels)))

    best = (np.inf, [p.copy() for p in params], 0)
    history = []
    for epoch in range(1, epochs + 1):
        # cosine decay to 2 % of the initial rate: large steps first, fine convergence at the end
        lr = learning_rate * (0.02 + 0.98 * 0.5 * (1.0 + np.cos(np.pi * (epoch - 1) / epochs)))
        order = rng.permutation(n)
        for bi in range(n_batches):
            idx = order[bi * batch_size:(bi + 1) * batch_size]
            xb, cb = x[idx], c[idx]
            z1 = xb @ params[0] + params[1]
            a1 = _leaky(z1)
            z2 = a1 @ params[2] + params[3]
            a2 = _leaky(z2)
            out = a2 @ params[4] + params[5]
            d_out = (2.0 / (idx.size * n_out_pixels)) * (out - cb)
            d_z2 = (d_out @ params[4].T) * _leaky_slope(z2)
            d_z1 = (d_z2 @ params[2].T) * _leaky_slope(z1)
            grads = [xb.T @ d_z1, d_z1.sum(0), a1.T @ d_z2, d_z2.sum(0), a2.T @ d_out, d_out.sum(0)]
            step += 1
            corr = np.sqrt(1.0 - b2**step) / (1.0 - b1**step)
            for p, g, mi, vi in zip(params, grads, m, v, strict=True):
                mi *= b1
                mi += (1.0 - b1) * g
                vi *= b2
                vi += (1.0 - b2) * g * g
                p -= f32(lr * corr) * mi / (np.sqrt(vi) + f32(eps))
        if epoch % 10 == 0 or epoch == epochs:
            val = evaluate(xv, cv, params)
            history.append((epoch, val))
            if log_every and epoch % log_every == 0:
                print(f"epoch {epoch}: held-out rms (subspace) {val:.2e}", file=sys.stderr, flush=True)
            if val < best[0]:
                best = (val, [p.copy() for p in params], epoch)
    return best[1], {"best_epoch": int(best[2]), "history": history}


def train_on_arrays(flux: np.ndarray, labels: np.ndarray, *, label_names: Sequence[str] = LABELS,
                    hidden: int = 128, epochs: int = 600, batch_size: int = 128, learning_rate: float = 3e-3,
                    n_components: int = 96, validation_fraction: float = 0.1, seed: int = 0,
                    log_every: int = 0, meta: Mapping[str, Any] | None = None) -> PayneModel:
    """Train an emulator on continuum-normalised spectra ``flux`` (n, 8575) (or (n, 7791) on
    :func:`model_pixels`) with physical ``labels`` (n, k). Raises :class:`PayneError` for a set
    that is too small, non-finite, or has a label without spread."""
    t0 = time.perf_counter()
    pix = model_pixels()
    flux = np.asarray(flux)
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    k = len(label_names)
    if flux.ndim != 2 or flux.shape[1] not in (APSTAR_NPIX, pix.size):
        raise PayneError(f"training flux must be (n, {APSTAR_NPIX}) or (n, {pix.size}), got {flux.shape}")
    if flux.shape[1] == APSTAR_NPIX:
        flux = flux[:, pix]
    if labels.shape != (flux.shape[0], k):
        raise PayneError(f"training labels have shape {labels.shape}, expected ({flux.shape[0]}, {k})")
    n = flux.shape[0]
    n_val = max(10, round(validation_fraction * n))
    min_train = max(50, 10 * k, 2 * n_components)
    if n - n_val < min_train:
        raise PayneError(f"training set too small: {n} spectra leave {n - n_val} for training after {n_val} "
                         f"held out; need at least {min_train} (n_components={n_components})")
    bad = ~(np.all(np.isfinite(flux), axis=1) & np.all(np.isfinite(labels), axis=1))
    if bad.any():
        raise PayneError(f"training set has {int(bad.sum())} of {n} spectra with non-finite flux or labels")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x7061796E]))  # "payn"
    order = rng.permutation(n)
    val, tr = order[:n_val], order[n_val:]
    x_min, x_max = labels[tr].min(axis=0), labels[tr].max(axis=0)
    flat = [label_names[i] for i in np.flatnonzero(~(x_max > x_min))]
    if flat:
        raise PayneError(f"training labels {flat} have no spread: cannot scale them")
    xs = ((labels - x_min) / (x_max - x_min) - 0.5).astype(np.float32)
    xs[val] = np.clip(xs[val], -0.5, 0.5)
    f32 = flux.astype(np.float32)
    mean = f32[tr].mean(axis=0)
    # Principal components from the Gram matrix of (at most 3000) training spectra.
    sub = tr[:3000]
    centred = f32[sub] - mean
    gram = (centred @ centred.T).astype(np.float64)
    w, vecs = np.linalg.eigh(gram)
    top = np.argsort(w)[::-1][:n_components]
    top = top[w[top] > 1e-12 * w.max()]
    basis = ((vecs[:, top].T @ centred) / np.sqrt(w[top])[:, None]).astype(np.float32)   # (K, npix), orthonormal
    coef_tr = (f32[tr] - mean) @ basis.T
    coef_val = (f32[val] - mean) @ basis.T
    weights, info = _adam_train(xs[tr], coef_tr, xs[val], coef_val, hidden=hidden, epochs=epochs,
                                batch_size=batch_size, learning_rate=learning_rate, n_out_pixels=pix.size,
                                rng=rng, log_every=log_every)
    starts = xs[tr][rng.permutation(tr.size)[:256]].astype(float)
    model = PayneModel(label_names=label_names, x_min=x_min, x_max=x_max, pixels=pix,
                       weights=weights, basis=basis, mean=mean, model_sigma=np.zeros(pix.size),
                       start_points=starts)
    resid_val = model.predict_scaled(xs[val]) - flux[val]
    resid_tr = model.predict_scaled(xs[tr[:1000]]) - flux[tr[:1000]]
    model.model_sigma = np.sqrt(np.mean(resid_val**2, axis=0))
    per_spec = np.sqrt(np.mean(resid_val**2, axis=1))
    model.meta = dict(meta or {})
    model.meta.update({
        "n_train": int(tr.size), "n_validation": int(n_val), "seed": int(seed), "hidden": int(hidden),
        "epochs": int(epochs), "best_epoch": info["best_epoch"], "n_components": int(basis.shape[0]),
        "heldout_rms": float(np.sqrt(np.mean(resid_val**2))), "heldout_p95": float(np.percentile(per_spec, 95)),
        "train_rms": float(np.sqrt(np.mean(resid_tr**2))),
        "training_seconds": round(time.perf_counter() - t0, 2),
        "continuum_fingerprint": continuum.continuum_fingerprint(),
    })
    return model


def training_data(n_train: int, seed: int, kinds: Sequence[str] = ("giant", "dwarf", "yso"),
                  labels: Sequence[str] = LABELS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_train`` noiseless normalised training spectra (flux on :func:`model_pixels`, labels
    (n, len(labels)), kind) of the survey population restricted to ``kinds``, from the
    generator's ``TRAINING_SETTINGS`` (an independent draw from any release). The generator's
    hidden labels among ``labels`` scatter about their relations; the others stay on them."""
    from astra_dagster.spectra import synth  # the generator is only needed for training

    label_names = check_labels(labels)
    scatter = [n for n in label_names if n in synth.HIDDEN_LABELS]
    bad_kinds = [k for k in kinds if k not in ("giant", "dwarf", "yso", "hot")]
    if bad_kinds:
        raise PayneError(f"unknown stellar kinds {bad_kinds}")
    share = sum(synth.SURVEY_MIX[k] for k in kinds)
    if share <= 0:
        raise PayneError("no stellar kind selected for training")
    pix = model_pixels()
    fluxes, label_rows, kind = [], [], []
    n_have = 0
    # chunks keep the float64 work arrays small (a 20k set would need several GB at once);
    # each chunk is its own make_training_set draw with a seed derived from (seed, chunk)
    for chunk in range(10_000):
        if n_have >= n_train:
            break
        n_draw = int(np.ceil(min(n_train - n_have, TRAINING_CHUNK) / share * 1.05)) + 20
        sub_seed = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, chunk]).generate_state(1)[0]) if chunk else seed
        ts = synth.make_training_set(n_draw, sub_seed, settings=synth.TRAINING_SETTINGS, population="survey",
                                     scatter=scatter)
        keep = np.flatnonzero(np.isin(ts.kind, list(kinds)))[:n_train - n_have]
        flux, _ivar, cflags = continuum.normalize_arrays(ts.wavelength, ts.flux[keep], ts.ivar[keep],
                                                         return_flags=True)
        ok = cflags == 0
        fluxes.append(flux[ok][:, pix].astype(np.float32))
        label_rows.append(ts.label_array(label_names)[keep][ok])
        kind.append(ts.kind[keep][ok])
        n_have += int(ok.sum())
    return np.vstack(fluxes), np.vstack(label_rows), np.concatenate(kind)


def train_model(*, n_train: int = DEFAULT_TRAINING["n_train"], seed: int = DEFAULT_TRAINING["seed"],
                hidden: int = DEFAULT_TRAINING["hidden"], epochs: int = DEFAULT_TRAINING["epochs"],
                batch_size: int = 128, learning_rate: float = 3e-3, n_components: int = 96,
                validation_fraction: float = 0.1, kinds: str = "giant,dwarf,yso", n_calibration: int = 120,
                labels: str = ",".join(LABELS), log_every: int = 0) -> PayneModel:
    """Generate ``n_train`` noiseless training spectra (:func:`training_data`; ``kinds`` a
    comma-separated list) and train an emulator on them (:func:`train_on_arrays`) over ``labels``
    (comma-separated, a subset of :data:`FIT_LABELS` with :data:`REQUIRED_LABELS`). The default
    trains in about 2 minutes on one core; see :data:`FULL_TRAINING` for the full size.

    ``n_calibration`` > 0: the systematic error floor per label (:func:`calibrate_floor`) from
    that many further noiseless stars whose hidden labels scatter about their relations."""
    if n_train < 1:
        raise PayneError(f"training set size must be >= 1, got n_train={n_train}")
    t0 = time.perf_counter()
    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip())
    label_names = check_labels(n.strip() for n in labels.split(",") if n.strip())
    flux, label_values, _kind = training_data(n_train, seed, kind_list, label_names)
    gen_seconds = time.perf_counter() - t0
    model = train_on_arrays(flux, label_values, label_names=label_names, hidden=hidden, epochs=epochs,
                            batch_size=batch_size,
                            learning_rate=learning_rate, n_components=n_components,
                            validation_fraction=validation_fraction, seed=seed, log_every=log_every,
                            meta={"kinds": ",".join(kind_list)})
    model.meta["generation_seconds"] = round(gen_seconds, 2)
    if n_calibration > 0:
        calibrate_floor(model, n_calibration, seed=seed + 7919, kinds=tuple(k for k in kind_list if k != "yso"))
    model.meta["training_seconds"] = round(time.perf_counter() - t0, 2)
    return model


def calibrate_floor(model: PayneModel, n: int, *, seed: int, kinds: Sequence[str] = ("giant", "dwarf")) -> None:
    """Set ``model.label_floor``: the robust σ (1.4826 MAD) of the label errors of ``n`` noiseless
    training-style stars whose hidden labels (vmicro, vmacro, vsini, [C/Fe], [N/Fe]) scatter about
    their relations — the model-mismatch part of the error that JᵀWJ does not see. It is added in
    quadrature to the formal uncertainties. Data with other mismatches (LSF) will still have
    pulls above 1."""
    from dataclasses import replace

    from astra_dagster.spectra import synth

    settings = replace(synth.TRAINING_SETTINGS, vary_hidden=True)
    ts = synth.make_training_set(int(np.ceil(n / 0.85)) + 5, seed, settings=settings, population="survey")
    keep = np.flatnonzero(np.isin(ts.kind, list(kinds or ("giant", "dwarf"))))[:n]
    flux, ivar, cflags = continuum.normalize_arrays(ts.wavelength, ts.flux[keep], ts.ivar[keep], return_flags=True)
    truth = ts.label_array(model.label_names)[keep]
    floor_before = model.label_floor
    model.label_floor = np.zeros(model.n_labels)
    est = np.full(truth.shape, np.nan)
    for i in range(keep.size):
        row = fit_normalized(model, flux[i], ivar[i], continuum_flags=int(cflags[i]))
        est[i] = row_labels(model, row)
    ok = np.all(np.isfinite(est), axis=1)
    if ok.sum() < 10:
        model.label_floor = floor_before
        raise PayneError(f"floor calibration: only {int(ok.sum())} of {keep.size} calibration fits succeeded")
    delta = est[ok] - truth[ok]
    model.label_floor = 1.4826 * np.median(np.abs(delta - np.median(delta, axis=0)), axis=0)
    model.meta["n_calibration"] = int(keep.size)
    model.meta["calibration_failed"] = int((~ok).sum())


# ----------------------------------------------------------------------------- fitting


def _shift_operator(model: PayneModel, s: float, use: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Catmull-Rom sampling of a model at pixel positions i - s (a shift by s pixels, clamped
    to each chip) for the model pixels ``use``: indices (4, m), weights (4,) and their
    derivative w.r.t. s (4,)."""
    p = -float(s)
    j = int(np.floor(p))
    t = p - j
    lo, hi = model._lo[use], model._hi[use]
    idx = np.stack([np.clip(use + j + m, lo, hi) for m in (-1, 0, 1, 2)])
    t2, t3 = t * t, t * t * t
    w = 0.5 * np.array([-t3 + 2 * t2 - t, 3 * t3 - 5 * t2 + 2, -3 * t3 + 4 * t2 + t, t3 - t2])
    dw_dt = 0.5 * np.array([-3 * t2 + 4 * t - 1, 9 * t2 - 10 * t, -9 * t2 + 8 * t + 1, 3 * t2 - 2 * t])
    return idx, w, -dw_dt   # dt/ds = -1


class _Problem:
    """Residuals and Jacobian of one spectrum for least_squares, with a one-point cache."""

    def __init__(self, model: PayneModel, flux: np.ndarray, weight: np.ndarray) -> None:
        self.model = model
        self.use = np.flatnonzero(weight > 0)
        self.sw = np.sqrt(weight[self.use])
        self.flux = flux[self.use]
        self._key: bytes | None = None

    def _eval(self, p: np.ndarray) -> None:
        key = p.tobytes()
        if key == self._key:
            return
        k = self.model.n_labels
        f, df = self.model._value_and_jacobian(p[:k])
        idx, w, dw = _shift_operator(self.model, p[k], self.use)
        both = np.vstack([f, df])[:, idx]                     # (k + 1, 4, m): the 4 taps of each pixel
        shifted = np.einsum("t,ltm->lm", w, both)             # value and label derivatives, shifted
        self.resid = self.sw * (shifted[0] - self.flux)
        jac = np.empty((self.use.size, k + 1))
        jac[:, :k] = (shifted[1:] * self.sw).T
        jac[:, k] = self.sw * (dw @ both[0])
        self.jac = jac
        self._key = key

    def residuals(self, p: np.ndarray) -> np.ndarray:
        self._eval(p)
        return self.resid

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        self._eval(p)
        return self.jac


def _snr(spectrum: Spectrum) -> float | None:
    value = spectrum.snr
    if value is not None and np.isfinite(value):
        return value
    good = np.isfinite(spectrum.flux) & np.isfinite(spectrum.ivar) & (spectrum.ivar > 0)
    if not good.any():
        return None
    return float(np.median(spectrum.flux[good] * np.sqrt(spectrum.ivar[good])))


def _empty_row(snr: float | None, flag: int) -> dict[str, Any]:
    row: dict[str, Any] = {"snr": snr}
    for column in COLUMNS.values():
        row[column] = None
        row[f"u_{column}"] = None
    row.update({"rv": None, "u_rv": None, "r_chi_sq": None, "bitmask_flag": int(flag)})
    return row


def check_labels(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple if they are a valid label set (known, no repeats, with
    :data:`REQUIRED_LABELS`), else :class:`PayneError`."""
    names = tuple(names)
    unknown = [n for n in names if n not in FIT_LABELS]
    missing = [n for n in REQUIRED_LABELS if n not in names]
    if unknown or missing or len(set(names)) != len(names):
        raise PayneError(f"labels {list(names)}: unknown {unknown}, missing {missing} (known: {list(FIT_LABELS)}, "
                         f"required: {list(REQUIRED_LABELS)}, no repeats)")
    return names


def row_labels(model: PayneModel, row: Mapping[str, Any]) -> list[float]:
    """The model's labels (its own names and units: [C/Fe], not [C/H]) from an output row."""
    out = []
    for name in model.label_names:
        value = row[COLUMNS[name]]
        if value is not None and name in _PER_FE:
            value = None if row["fe_h"] is None else value - row["fe_h"]
        out.append(np.nan if value is None else float(value))
    return out


def _clean(value: float) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def fit_normalized(model: PayneModel, flux: np.ndarray, ivar: np.ndarray, *, continuum_flags: int = 0,
                   non_finite: bool = False, snr: float | None = None) -> dict[str, Any]:
    """Fit one continuum-normalised spectrum (8575 apStar pixels, or the model's pixels).
    Returns one output row (see :func:`fit_spectra`)."""
    flux = np.asarray(flux, dtype=float)
    ivar = np.asarray(ivar, dtype=float)
    if flux.shape != ivar.shape or flux.ndim != 1:
        raise PayneError(f"flux {flux.shape} and ivar {ivar.shape} must be 1-D and alike")
    if flux.shape[0] == APSTAR_NPIX:
        flux, ivar = flux[model.pixels], ivar[model.pixels]
    elif flux.shape[0] != model.n_pixels:
        raise PayneError(f"spectrum has {flux.shape[0]} pixels; the model needs {APSTAR_NPIX} or {model.n_pixels}")
    flag = FLAGS["NON_FINITE_INPUT"] if non_finite else 0
    if continuum_flags:
        flag |= FLAGS["CONTINUUM_FAILED"]
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0) & model._fit_ok
    if int(good.sum()) < MIN_PIXELS:
        return _empty_row(snr, flag | FLAGS["NO_DATA"])
    # data errors and emulator error in quadrature
    weight = np.where(good, 1.0 / (1.0 / np.where(good, ivar, 1.0) + model.model_sigma**2), 0.0)
    flux = np.where(good, flux, 1.0)
    prob = _Problem(model, flux, weight)
    k = model.n_labels
    # starting points: the best few of the start grid by χ² (one batched forward pass, no shift)
    grid = model.start_points
    pred = model.predict_scaled(grid)[:, prob.use]
    chi2 = np.sum(((pred - prob.flux) * prob.sw) ** 2, axis=1)
    starts = grid[np.argsort(chi2)[:N_STARTS]]
    lo = np.r_[np.full(k, -0.5), -RV_LIMIT / KMS_PER_PIXEL]
    hi = -lo
    best = None
    for x0 in starts:
        p0 = np.r_[np.clip(x0, -0.5 + 1e-6, 0.5 - 1e-6), 0.0]
        res = least_squares(prob.residuals, p0, jac=prob.jacobian, bounds=(lo, hi), method="trf",
                            x_scale=np.r_[np.full(k, 0.1), 0.5], ftol=1e-6, xtol=1e-6, gtol=1e-8, max_nfev=100)
        if best is None or res.cost < best.cost:
            best = res
    assert best is not None
    p = best.x
    n_use = prob.use.size
    chi2_best = 2.0 * best.cost
    r_chi_sq = chi2_best / max(n_use - (k + 1), 1)
    if best.status == 0:
        flag |= FLAGS["NOT_CONVERGED"]
    pinned = np.abs(p[:k]) >= 0.5 - BOUND_TOL
    in_range_labels = np.isin(model.label_names, RANGE_LABELS)
    if np.any(pinned & in_range_labels):
        flag |= FLAGS["OUTSIDE_RANGE"]
    if np.any(pinned & ~in_range_labels):
        flag |= FLAGS["AT_BOUND"]
    if abs(p[k]) * KMS_PER_PIXEL >= RV_LIMIT * (1 - 1e-3):
        flag |= FLAGS["RV_AT_BOUND"]
    if r_chi_sq > HIGH_CHI2:
        flag |= FLAGS["HIGH_CHI2"]
    if hydrogen.has_hot_star_lines(apstar_wavelength()[model.pixels], flux,
                                   model.predict_scaled(p[None, :k])[0], weight):
        flag |= FLAGS["HYDROGEN_LINES"]
    jac = prob.jacobian(p)
    try:
        cov = np.linalg.inv(jac.T @ jac)
        err = np.sqrt(np.diag(cov))
        if not np.all(np.isfinite(err)):
            raise np.linalg.LinAlgError("non-finite covariance")
    except np.linalg.LinAlgError:
        err = np.full(k + 1, np.nan)
        flag |= FLAGS["SINGULAR"]
    row = _empty_row(snr, flag)
    row["r_chi_sq"] = _clean(r_chi_sq)
    if flag & FATAL:
        return row
    labels = model.unscale(p[:k])
    span = model.x_max - model.x_min
    cov_labels = cov[:k, :k] * np.outer(span, span) if np.all(np.isfinite(err)) else np.full((k, k), np.nan)
    iron = model.label_names.index("fe_h")
    for i, name in enumerate(model.label_names):
        value, var = labels[i], cov_labels[i, i] + model.label_floor[i] ** 2
        if name in _PER_FE:   # [X/H] = [X/Fe] + [Fe/H], with their covariance
            value += labels[iron]
            var += cov_labels[iron, iron] + 2.0 * cov_labels[i, iron] + model.label_floor[iron] ** 2
        row[COLUMNS[name]] = _clean(value)
        row[f"u_{COLUMNS[name]}"] = _clean(np.sqrt(var))
    row["rv"] = _clean(p[k] * KMS_PER_PIXEL)
    row["u_rv"] = _clean(err[k] * KMS_PER_PIXEL)
    return row


def fit_spectra(model: PayneModel, spectra: Sequence[Spectrum]) -> list[dict[str, Any]]:
    """Fit every rest-frame apStar-grid spectrum: continuum normalisation
    (:func:`continuum.normalize`), then the emulator fit. One dict per spectrum with the
    ``astra.thepayne`` columns snr, teff, u_teff, logg, u_logg, fe_h, u_fe_h, alpha_m, u_alpha_m,
    v_turb, u_v_turb, c_h, u_c_h, n_h, u_n_h (columns of labels the model lacks are None), rv, u_rv,
    r_chi_sq, bitmask_flag (None where not measured; see :data:`FLAGS`).
    Raises :class:`PayneError` for a model of other labels or another continuum rule, and
    ValueError (naming the file) for a spectrum not on the rest-frame apStar grid."""
    if not isinstance(model, PayneModel):
        raise PayneError(f"fit_spectra needs a PayneModel, got {type(model).__name__}")
    check_labels(model.label_names)
    trained_with = model.meta.get("continuum_fingerprint")
    if trained_with is not None and trained_with != continuum.continuum_fingerprint():
        raise PayneError(f"model was trained on spectra normalised with continuum rule {trained_with}; "
                         f"this code normalises with {continuum.continuum_fingerprint()}: retrain the model")
    rows = []
    for spectrum in spectra:
        norm = continuum.normalize(spectrum)
        weighted = (spectrum.ivar != 0) & (continuum.chip_index() >= 0)
        non_finite = bool(np.any(weighted & ~(np.isfinite(spectrum.flux) & np.isfinite(spectrum.ivar))))
        rows.append(fit_normalized(model, norm.flux, norm.ivar, continuum_flags=int(norm.meta["continuum_flags"]),
                                   non_finite=non_finite, snr=_snr(spectrum)))
    return rows
