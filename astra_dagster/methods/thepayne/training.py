"""Training the emulator: Adam with hand-written backpropagation (:func:`train_on_arrays`), the
generator training set, :func:`train_model` and the error floor.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from astra_dagster.methods import continuum
from astra_dagster.methods.progress import Progress, reporter
from astra_dagster.methods.thepayne.fit import check_labels, fit_normalized, row_labels
from astra_dagster.methods.thepayne.flags import PayneError
from astra_dagster.methods.thepayne.model import LABELS, PayneModel, _leaky, _leaky_slope, model_pixels
from astra_dagster.spectra.spectrum import APSTAR_NPIX

#: Training spectra generated and normalised per chunk.
TRAINING_CHUNK = 2500
#: Default (CI-size) training settings: about 2 minutes on one core.
DEFAULT_TRAINING: dict[str, Any] = {"n_train": 4000, "seed": 0, "hidden": 256, "epochs": 800}
#: Full-size training (bench / production): estimated 6-10 minutes on one core (not yet timed end to end).
FULL_TRAINING: dict[str, Any] = {"n_train": 12000, "seed": 0, "hidden": 256, "epochs": 1200}

# ----------------------------------------------------------------------------- training


def _adam_train(x: np.ndarray, c: np.ndarray, xv: np.ndarray, cv: np.ndarray, *, hidden: int, epochs: int,
                batch_size: int, learning_rate: float, n_out_pixels: int, rng: np.random.Generator,
                log_every: int = 0, progress: Progress | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Train the MLP x (n, k) → c (n, K) with Adam and hand-written backpropagation (float32).
    Loss: Σ_K (ĉ - c)² / n_out_pixels, the pixel mean squared error when c are coefficients of
    an orthonormal basis. Returns the weights of the best held-out epoch and training facts.
    ``progress`` gets a line at every held-out evaluation (each 10th epoch)."""
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
    report = reporter(progress, "thepayne")
    for epoch in range(1, epochs + 1):
        # cosine decay to 2 % of the initial rate: large steps first, fine convergence at the end
        lr = learning_rate * (0.02 + 0.98 * 0.5 * (1.0 + np.cos(np.pi * (epoch - 1) / epochs)))
        order = rng.permutation(n)
        # the training loss is only summed for epochs that report it (read-only: same weights)
        track = progress is not None and (epoch % 10 == 0 or epoch == epochs)
        sq_sum = 0.0
        for bi in range(n_batches):
            idx = order[bi * batch_size:(bi + 1) * batch_size]
            xb, cb = x[idx], c[idx]
            z1 = xb @ params[0] + params[1]
            a1 = _leaky(z1)
            z2 = a1 @ params[2] + params[3]
            a2 = _leaky(z2)
            out = a2 @ params[4] + params[5]
            d_out = (2.0 / (idx.size * n_out_pixels)) * (out - cb)
            if track:
                sq_sum += float(np.sum((out - cb) ** 2, dtype=np.float64))
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
            if track:
                report(f"epoch {epoch}/{epochs}: train rms {np.sqrt(sq_sum / (n * n_out_pixels)):.2e}, "
                       f"held-out rms {val:.2e} (best {best[0]:.2e} at epoch {best[2]})")
    return best[1], {"best_epoch": int(best[2]), "history": history}


def train_on_arrays(flux: np.ndarray, labels: np.ndarray, *, label_names: Sequence[str] = LABELS,
                    hidden: int = 128, epochs: int = 600, batch_size: int = 128, learning_rate: float = 3e-3,
                    n_components: int = 96, validation_fraction: float = 0.1, seed: int = 0,
                    log_every: int = 0, meta: Mapping[str, Any] | None = None,
                    progress: Progress | None = None) -> PayneModel:
    """Train an emulator on continuum-normalised spectra ``flux`` (n, 8575) (or (n, 7791) on
    :func:`model_pixels`) with physical ``labels`` (n, k). Raises :class:`PayneError` for a set
    that is too small, non-finite, or has a label without spread. ``progress``: a line every 10
    epochs (:func:`_adam_train`)."""
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
                                rng=rng, log_every=log_every, progress=progress)
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
                  labels: Sequence[str] = LABELS, progress: Progress | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_train`` noiseless normalised training spectra (flux on :func:`model_pixels`, labels
    (n, len(labels)), kind) of the survey population restricted to ``kinds``, from the
    generator's ``TRAINING_SETTINGS`` (an independent draw from any release). The generator's
    hidden labels among ``labels`` scatter about their relations; the others stay on them.
    ``progress``: a line per generated chunk."""
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
    report = reporter(progress, "thepayne")
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
        report(f"training set: {min(n_have, n_train)}/{n_train} spectra generated")
    return np.vstack(fluxes), np.vstack(label_rows), np.concatenate(kind)


def train_model(*, n_train: int = DEFAULT_TRAINING["n_train"], seed: int = DEFAULT_TRAINING["seed"],
                hidden: int = DEFAULT_TRAINING["hidden"], epochs: int = DEFAULT_TRAINING["epochs"],
                batch_size: int = 128, learning_rate: float = 3e-3, n_components: int = 96,
                validation_fraction: float = 0.1, kinds: str = "giant,dwarf,yso", n_calibration: int = 120,
                labels: str = ",".join(LABELS), log_every: int = 0,
                progress: Progress | None = None) -> PayneModel:
    """Generate ``n_train`` noiseless training spectra (:func:`training_data`; ``kinds`` a
    comma-separated list) and train an emulator on them (:func:`train_on_arrays`) over ``labels``
    (comma-separated, a subset of :data:`FIT_LABELS` with :data:`REQUIRED_LABELS`). The default
    trains in about 2 minutes on one core; see :data:`FULL_TRAINING` for the full size.

    ``n_calibration`` > 0: the systematic error floor per label (:func:`calibrate_floor`) from
    that many further noiseless stars whose hidden labels scatter about their relations.

    ``progress`` (e.g. a logger's ``info``) gets a line per generated chunk, every 10 epochs
    (train and held-out rms, elapsed seconds) and around the floor calibration; it does not change
    the model. ``log_every`` still prints the held-out rms to stderr."""
    if n_train < 1:
        raise PayneError(f"training set size must be >= 1, got n_train={n_train}")
    t0 = time.perf_counter()
    progress = reporter(progress, "thepayne") if progress is not None else None
    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip())
    label_names = check_labels(n.strip() for n in labels.split(",") if n.strip())
    flux, label_values, _kind = training_data(n_train, seed, kind_list, label_names, progress=progress)
    gen_seconds = time.perf_counter() - t0
    model = train_on_arrays(flux, label_values, label_names=label_names, hidden=hidden, epochs=epochs,
                            batch_size=batch_size,
                            learning_rate=learning_rate, n_components=n_components,
                            validation_fraction=validation_fraction, seed=seed, log_every=log_every,
                            meta={"kinds": ",".join(kind_list)}, progress=progress)
    model.meta["generation_seconds"] = round(gen_seconds, 2)
    if n_calibration > 0:
        report = reporter(progress, "thepayne")
        report(f"emulator trained (held-out rms {model.meta['heldout_rms']:.2e}, best epoch "
               f"{model.meta['best_epoch']}); calibrating the error floor on {n_calibration} stars")
        calibrate_floor(model, n_calibration, seed=seed + 7919, kinds=tuple(k for k in kind_list if k != "yso"),
                        progress=progress)
    model.meta["training_seconds"] = round(time.perf_counter() - t0, 2)
    return model


def calibrate_floor(model: PayneModel, n: int, *, seed: int, kinds: Sequence[str] = ("giant", "dwarf"),
                    progress: Progress | None = None) -> None:
    """Set ``model.label_floor``: the robust σ (1.4826 MAD) of the label errors of ``n`` noiseless
    stars the emulator was not trained on, whose hidden labels (vmicro, vmacro, vsini, [C/Fe],
    [N/Fe]) scatter about their relations and which are observed like survey spectra: the
    instrument's fiber-dependent resolution, its LSF shape and the detector's pixel box (each
    star on a random fiber), where the training grid has one Gaussian LSF. That is the
    model-mismatch part of the error that JᵀWJ does not see; it is added in quadrature to the
    formal uncertainties. (Doppler's template floors are calibrated the same way.) Calibrated on
    training-like spectra alone, the floors left pulls of 4.5-6.9 on releases.
    ``progress``: a line every 30 fits."""
    from dataclasses import replace

    from astra_dagster.spectra import synth

    settings = replace(synth.TRAINING_SETTINGS, vary_hidden=True)
    ts = synth.make_training_set(int(np.ceil(n / 0.85)) + 5, seed, settings=settings, population="survey")
    keep = np.flatnonzero(np.isin(ts.kind, list(kinds or ("giant", "dwarf"))))[:n]
    instrument = synth.RELEASE_SETTINGS
    observed = replace(settings, resolution=instrument.resolution, fiber_resolution=True, pixel_integration=True,
                       lsf_h3=instrument.lsf_h3, lsf_h4=instrument.lsf_h4)
    fibers = np.random.default_rng([seed, 0x706179]).integers(1, 301, keep.size)
    rendered = np.array([synth.synthesize({k: float(ts.labels[k][i]) for k in synth.ALL_LABELS}, ts.wavelength,
                                          observed, fiber=int(fiber))
                         for i, fiber in zip(keep, fibers, strict=True)])
    flux, ivar, cflags = continuum.normalize_arrays(ts.wavelength, rendered, ts.ivar[keep], return_flags=True)
    truth = ts.label_array(model.label_names)[keep]
    floor_before = model.label_floor
    report = reporter(progress, "thepayne")
    model.label_floor = np.zeros(model.n_labels)
    est = np.full(truth.shape, np.nan)
    for i in range(keep.size):
        row = fit_normalized(model, flux[i], ivar[i], continuum_flags=int(cflags[i]), screen_mismatch=False)
        est[i] = row_labels(model, row)
        if (i + 1) % 30 == 0 or i + 1 == keep.size:
            report(f"error floor: {i + 1}/{keep.size} calibration stars fitted")
    ok = np.all(np.isfinite(est), axis=1)
    if ok.sum() < 10:
        model.label_floor = floor_before
        raise PayneError(f"floor calibration: only {int(ok.sum())} of {keep.size} calibration fits succeeded")
    delta = est[ok] - truth[ok]
    model.label_floor = 1.4826 * np.median(np.abs(delta - np.median(delta, axis=0)), axis=0)
    model.meta["n_calibration"] = int(keep.size)
    model.meta["calibration_failed"] = int((~ok).sum())
