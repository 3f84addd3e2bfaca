"""The Cannon model (:class:`CannonModel`): one polynomial or a piecewise one (:class:`CannonPiece`
per region), training, the batched test step, and its ``.npz`` file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astra_dagster.methods.modelfile import read_arrays, write_arrays
from astra_dagster.methods.progress import Progress, reporter
from astra_dagster.methods.thecannon.flags import FLAGS, HIGH_CHI2, LABEL_LIMIT, MIN_PIXELS, CannonError
from astra_dagster.methods.thecannon.hull import LabelHull
from astra_dagster.methods.thecannon.numerics import (
    _invert,
    _lasso_cd,
    _levenberg_marquardt,
    _scatter_dof,
    _scatter_median,
)
from astra_dagster.methods.thecannon.results import CannonResult
from astra_dagster.methods.thecannon.vectorizer import label_vector, polynomial_terms

FORMAT = "astra-thecannon/1"

#: Core regions for the survey population (labels teff and logg): cool giants, warm giants,
#: cool dwarfs, warm dwarfs. Borders at logg 3.6 (between the giant branch and the subgiants),
#: 4300 K on the giant branch and 4500 K on the main sequence (where molecules take over).
SURVEY_REGIONS: tuple[dict[str, tuple[float | None, float | None]], ...] = (
    {"logg": (None, 3.6), "teff": (None, 4300.0)},
    {"logg": (None, 3.6), "teff": (4300.0, None)},
    {"logg": (3.6, None), "teff": (None, 4500.0)},
    {"logg": (3.6, None), "teff": (4500.0, None)},
)


# ----------------------------------------------------------------------------- one polynomial


@dataclass
class CannonPiece:
    """One polynomial model (the whole model, or one region of a piecewise model)."""

    core: np.ndarray              # (K, 2) physical bounds of the core (±inf = open)
    theta: np.ndarray             # (P, T)
    s2: np.ndarray                # (P,)
    pixel_ok: np.ndarray          # (P,) bool
    fiducials: np.ndarray         # (K,)
    scales: np.ndarray            # (K,)
    training_labels: np.ndarray   # (n, K) of the stars this piece was trained on
    label_floor: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) systematic σ, see train()

    def scale(self, labels: np.ndarray) -> np.ndarray:
        return (np.asarray(labels, dtype=float) - self.fiducials) / self.scales

    def unscale(self, scaled: np.ndarray) -> np.ndarray:
        return np.asarray(scaled, dtype=float) * self.scales + self.fiducials

    def in_core(self, labels: np.ndarray) -> np.ndarray:
        labels = np.atleast_2d(labels)
        return np.all((labels >= self.core[:, 0]) & (labels < self.core[:, 1]), axis=1)

    def core_distance(self, labels: np.ndarray) -> np.ndarray:
        """Distance (in this piece's scale units) from labels (m, K) to the core box."""
        labels = np.atleast_2d(labels)
        below = np.maximum(self.core[:, 0] - labels, 0.0)
        above = np.maximum(labels - self.core[:, 1], 0.0)
        return np.sqrt(np.sum(((below + above) / self.scales) ** 2, axis=1))


def _as_2d_float(name: str, a: Any) -> np.ndarray:
    arr = np.asarray(a, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise CannonError(f"{name} must be (n_spectra, n_pixels), got shape {arr.shape}")
    return arr


def _scaling(labels: np.ndarray, names: Sequence[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    fiducials = np.percentile(labels, 50, axis=0)
    lo, hi = np.percentile(labels, [2.5, 97.5], axis=0)
    scales = hi - lo
    flat = [names[k] for k in range(len(names)) if not scales[k] > 0]
    if flat:
        raise CannonError(f"{where}: training labels {flat} do not vary (2.5-97.5 percentile range is 0)")
    return fiducials, scales


# ----------------------------------------------------------------------------- the model


class CannonModel:
    """A polynomial-in-labels spectral model (see the module docstring).

    ``label_names``: names of the K labels (the order of every label array). ``order``: polynomial
    order (2 = quadratic). ``regularization``: L1 strength Λ (0 = none). ``regions``: None for
    one polynomial, or a sequence of core boxes ``{label: (lo, hi)}`` (None = open bound) for a
    piecewise model, e.g. :data:`SURVEY_REGIONS`. ``region_margin``: how far each core is widened
    for training its piece: a fraction of each label's training-set scale (float) or absolute
    widths per label (mapping). ``scatter``: "dof" or "median" rule for s². ``n_iterations``:
    θ / s² alternations. ``meta``: free JSON-able dict stored with the model (e.g. the continuum
    fingerprint and the training-set parameters).
    """

    def __init__(self, label_names: Sequence[str], order: int = 2, regularization: float = 0.0, *,
                 regions: Sequence[Mapping[str, tuple[float | None, float | None]]] | None = None,
                 region_margin: float | Mapping[str, float] = 0.1, scatter: str = "dof", n_iterations: int = 4,
                 meta: Mapping[str, Any] | None = None) -> None:
        if isinstance(label_names, str):
            raise CannonError(f"label_names must be a sequence of names, got the string {label_names!r}")
        names = tuple(str(n) for n in label_names)
        if len(names) == 0:
            raise CannonError("label_names is empty")
        if len(set(names)) != len(names):
            raise CannonError(f"label_names has duplicates: {names}")
        if not (math.isfinite(regularization) and regularization >= 0):
            raise CannonError(f"regularization must be finite and >= 0, got {regularization}")
        if scatter not in ("dof", "median"):
            raise CannonError(f"scatter must be 'dof' or 'median', got {scatter!r}")
        if n_iterations < 1:
            raise CannonError(f"n_iterations must be >= 1, got {n_iterations}")
        self.label_names = names
        self.order = int(order)
        self.terms = polynomial_terms(len(names), self.order)
        self.regularization = float(regularization)
        self.scatter = scatter
        self.n_iterations = int(n_iterations)
        self.meta: dict[str, Any] = dict(meta or {})
        self.regions = None if regions is None else [self._region_dict(r) for r in regions]
        if self.regions is not None and len(self.regions) == 0:
            raise CannonError("regions is empty (use None for a single polynomial)")
        if isinstance(region_margin, Mapping):
            unknown = sorted(set(region_margin) - set(names))
            if unknown:
                raise CannonError(f"region_margin names unknown labels {unknown} (model labels: {list(names)})")
            self.region_margin: float | dict[str, float] = {str(k): float(v) for k, v in region_margin.items()}
        else:
            self.region_margin = float(region_margin)
        self.pieces: list[CannonPiece] = []
        self.fiducials: np.ndarray | None = None
        self.scales: np.ndarray | None = None
        self.training_labels: np.ndarray | None = None
        self._hull: LabelHull | None = None
        self._linear_ops: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _region_dict(self, region: Mapping[str, Any]) -> dict[str, list[float | None]]:
        if not isinstance(region, Mapping):
            raise CannonError(f"a region must be a mapping label -> (lo, hi), got {region!r}")
        out: dict[str, list[float | None]] = {}
        for name, bounds in region.items():
            if name not in self.label_names:
                raise CannonError(f"region {dict(region)} names unknown label {name!r} "
                                  f"(model labels: {list(self.label_names)})")
            lo, hi = bounds
            lo = None if lo is None else float(lo)
            hi = None if hi is None else float(hi)
            if lo is not None and hi is not None and not lo < hi:
                raise CannonError(f"region {dict(region)}: bounds of {name} must have lo < hi")
            out[str(name)] = [lo, hi]
        return out

    def _core(self, r: int | None) -> np.ndarray:
        core = np.tile([-np.inf, np.inf], (self.n_labels, 1))
        if r is not None and self.regions is not None:
            for name, (lo, hi) in self.regions[r].items():
                k = self.label_names.index(name)
                core[k] = (-np.inf if lo is None else lo, np.inf if hi is None else hi)
        return core

    # -- basic properties

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_terms(self) -> int:
        """Coefficients per pixel (T)."""
        return int(self.terms.shape[0])

    @property
    def is_trained(self) -> bool:
        return bool(self.pieces)

    @property
    def n_pixels(self) -> int:
        self._require_trained()
        return int(self.pieces[0].theta.shape[0])

    def _single(self, what: str) -> CannonPiece:
        self._require_trained()
        if len(self.pieces) != 1:
            raise CannonError(f"{what}: this model has {len(self.pieces)} regions; use model.pieces[i].{what}")
        return self.pieces[0]

    @property
    def theta(self) -> np.ndarray:
        """Coefficients (P, T) of a single-polynomial model."""
        return self._single("theta").theta

    @property
    def s2(self) -> np.ndarray:
        """Intrinsic scatter s² (P,) of a single-polynomial model."""
        return self._single("s2").s2

    @property
    def pixel_ok(self) -> np.ndarray:
        """(P,) pixels modelled by every piece (the ones the test step uses)."""
        self._require_trained()
        return np.logical_and.reduce([p.pixel_ok for p in self.pieces])

    def summary(self) -> dict[str, Any]:
        """Small JSON-able facts about a trained model (for asset metadata)."""
        self._require_trained()
        return {"labels": list(self.label_names), "order": self.order, "pieces": len(self.pieces),
                "terms": self.n_terms, "pixels_modelled": int(self.pixel_ok.sum()),
                **{k: v for k, v in self.meta.items() if isinstance(v, int | float | str)}}

    def __repr__(self) -> str:
        state = f"{self.n_pixels} pixels, {len(self.pieces)} piece(s)" if self.is_trained else "untrained"
        return (f"CannonModel({list(self.label_names)}, order={self.order}, "
                f"regularization={self.regularization}, {state})")

    def _require_trained(self) -> None:
        if not self.pieces:
            raise CannonError("the Cannon model is not trained (call train() or CannonModel.read())")

    # -- labels

    def _label_array(self, labels: Mapping[str, Any] | np.ndarray, where: str) -> np.ndarray:
        if isinstance(labels, Mapping):
            missing = [n for n in self.label_names if n not in labels]
            if missing:
                raise CannonError(f"{where}: labels lack {missing} (model labels: {list(self.label_names)})")
            cols = [np.atleast_1d(np.asarray(labels[n], dtype=float)) for n in self.label_names]
            if len({c.shape for c in cols}) != 1 or cols[0].ndim != 1:
                raise CannonError(f"{where}: label columns must be 1-D of one length, got shapes "
                                  f"{dict(zip(self.label_names, [c.shape for c in cols], strict=True))}")
            arr = np.column_stack(cols)
        else:
            arr = np.asarray(labels, dtype=float)
            if arr.ndim == 1:
                arr = arr[None, :]
            if arr.ndim != 2 or arr.shape[1] != self.n_labels:
                raise CannonError(f"{where}: labels must be (n, {self.n_labels}) for {list(self.label_names)}, "
                                  f"got shape {arr.shape}")
        bad = ~np.isfinite(arr)
        if bad.any():
            detail = {n: int(bad[:, k].sum()) for k, n in enumerate(self.label_names) if bad[:, k].any()}
            raise CannonError(f"{where}: non-finite label values (count per label: {detail})")
        return arr

    def scale_labels(self, labels: np.ndarray) -> np.ndarray:
        """Physical → scaled labels (the whole training set's fiducials and scales)."""
        self._require_trained()
        return (np.asarray(labels, dtype=float) - self.fiducials) / self.scales

    def unscale_labels(self, scaled: np.ndarray) -> np.ndarray:
        """Scaled → physical labels."""
        self._require_trained()
        return np.asarray(scaled, dtype=float) * self.scales + self.fiducials

    @property
    def hull(self) -> LabelHull:
        """Convex hull of all training labels in scaled space (built on first use)."""
        self._require_trained()
        if self._hull is None:
            self._hull = LabelHull(self.scale_labels(self.training_labels))
        return self._hull

    def assign_piece(self, labels: np.ndarray) -> np.ndarray:
        """Index of the piece for each label row (m, K): the first whose core holds it, else
        the one whose core is nearest."""
        self._require_trained()
        labels = np.atleast_2d(labels)
        inside = np.array([p.in_core(labels) for p in self.pieces])          # (J, m)
        dist = np.array([p.core_distance(labels) for p in self.pieces])
        return np.where(inside.any(axis=0), np.argmax(inside, axis=0), np.argmin(dist, axis=0))

    # -- training

    def train(self, flux: np.ndarray, ivar: np.ndarray, labels: Mapping[str, Any] | np.ndarray, *,
              cv_folds: int = 2, progress: Progress | None = None) -> CannonModel:
        """Fit θ and s² from continuum-normalised training spectra ``flux``, ``ivar`` (n, P) and
        their labels (a dict name → (n,) or an (n, K) array in ``label_names`` order).

        ``cv_folds`` ≥ 2: estimate each piece's *systematic* label error by k-fold
        cross-validation (models trained without one fold fit that fold's spectra; per label,
        the robust σ of the held-out residuals with the median formal variance removed). The
        test step adds it in quadrature to the formal covariance, because the formal errors
        only know the pixel noise and s², not the correlated model mismatch that dominates at
        high S/N. 0 or 1: no cross-validation (formal errors only). If a fold leaves a region
        too small, the floor stays 0 and ``meta["cv"]`` says why.

        Raises :class:`CannonError` for a training set (or region) with no more stars than
        coefficients per pixel, non-finite or constant labels, negative ivar or mismatched shapes.

        ``progress`` gets a line per region trained and per cross-validation fold.
        """
        report = reporter(progress, "thecannon")
        F = _as_2d_float("training flux", flux)
        IV = _as_2d_float("training ivar", ivar)
        if F.shape != IV.shape:
            raise CannonError(f"training flux {F.shape} and ivar {IV.shape} differ in shape")
        n = F.shape[0]
        L = self._label_array(labels, "training set")
        if L.shape[0] != n:
            raise CannonError(f"training set: {L.shape[0]} label rows for {n} spectra")
        self._check_size(n, "training set")
        if np.any(IV < 0) or np.any(np.isnan(IV)):
            raise CannonError("training ivar has negative or NaN values")
        IV = np.where(np.isfinite(F) & np.isfinite(IV), IV, 0.0)
        F = np.where(IV > 0, F, 0.0)
        fiducials, scales = _scaling(L, self.label_names, "training set")

        pieces = []
        n_regions = 1 if self.regions is None else len(self.regions)
        for r in range(n_regions):
            core = self._core(None if self.regions is None else r)
            if isinstance(self.region_margin, dict):
                margin = np.array([self.region_margin.get(nm, 0.0) for nm in self.label_names])
            else:
                margin = self.region_margin * scales
            lo, hi = core[:, 0] - margin, core[:, 1] + margin
            sel = np.flatnonzero(np.all((lo <= L) & (hi > L), axis=1))
            where = "training set" if self.regions is None else f"region {r} {self.regions[r]}"
            self._check_size(sel.size, where)
            pieces.append(self._train_piece(F[sel], IV[sel], L[sel], core, where))
            piece = pieces[-1]
            bounds = "all labels" if self.regions is None else _bounds_text(self.regions[r])
            report(f"region {r + 1}/{n_regions} ({bounds}): {sel.size} spectra, "
                   f"{int(piece.pixel_ok.sum())} pixels, median s² {_median_finite(piece.s2):.2e}")
        self.pieces = pieces
        self.fiducials, self.scales, self.training_labels = fiducials, scales, L.copy()
        self._hull = None
        self._linear_ops = {}
        if cv_folds >= 2:
            self._cross_validate(F, IV, L, int(cv_folds), report)
        return self

    def _cross_validate(self, F: np.ndarray, IV: np.ndarray, L: np.ndarray, folds: int,
                        report: Progress | None = None) -> None:
        """Set each piece's ``label_floor`` from k-fold held-out residuals (see :meth:`train`)."""
        n, K = L.shape
        fold = np.random.default_rng(0).permutation(n) % folds   # deterministic
        est = np.full((n, K), np.nan)
        formal = np.full((n, K), np.nan)
        for f in range(folds):
            held = fold == f
            sub = CannonModel(self.label_names, self.order, self.regularization, regions=self.regions,
                              region_margin=self.region_margin, scatter=self.scatter, n_iterations=self.n_iterations)
            try:
                sub.train(F[~held], IV[~held], L[~held], cv_folds=0)
            except CannonError as exc:
                self.meta["cv"] = f"skipped: {exc}"
                return
            res = sub.test(F[held], IV[held], n_starts=2)
            est[held] = res.labels
            formal[held] = res.uncertainties**2
            if report is not None:
                report(f"cross-validation fold {f + 1}/{folds}: {int(held.sum())} held-out spectra fitted")
        resid = est - L
        which = self.assign_piece(L)
        ok = np.all(np.isfinite(resid), axis=1)

        def floor(rows: np.ndarray) -> np.ndarray:
            d = resid[rows]
            robust = 1.4826 * np.median(np.abs(d - np.median(d, axis=0)), axis=0)
            return np.sqrt(np.maximum(robust**2 - np.median(formal[rows], axis=0), 0.0))

        overall = floor(ok) if ok.sum() >= 10 else np.zeros(K)
        for j, piece in enumerate(self.pieces):
            rows = ok & (which == j)
            piece.label_floor = floor(rows) if rows.sum() >= 10 else overall.copy()
        self.meta["cv"] = {"folds": folds, "n_held_out": int(ok.sum()),
                           "robust_sigma": dict(zip(self.label_names, (1.4826 * np.median(
                               np.abs(resid[ok] - np.median(resid[ok], axis=0)), axis=0)).tolist(), strict=True))}

    def _check_size(self, n: int, where: str) -> None:
        T = self.n_terms
        if n <= T:
            raise CannonError(
                f"{where} too small: {n} spectra for an order-{self.order} model in {self.n_labels} labels "
                f"with {T} coefficients per pixel; need more spectra than coefficients (at least {T + 1}, "
                f"in practice several times {T})")

    def _train_piece(self, F: np.ndarray, IV: np.ndarray, L: np.ndarray, core: np.ndarray, where: str) -> CannonPiece:
        n, P = F.shape
        T = self.n_terms
        fiducials, scales = _scaling(L, self.label_names, where)
        D = label_vector((L - fiducials) / scales, self.terms)      # (n, T)
        DD = (D[:, :, None] * D[:, None, :]).reshape(n, T * T)      # (n, T²)
        n_good = (IV > 0).sum(axis=0)
        ok = n_good > T
        theta = np.zeros((P, T))
        theta[:, 0] = 1.0
        s2 = np.full(P, np.inf)
        Fk, IVk = F[:, ok], IV[:, ok]
        s2k = np.zeros(int(ok.sum()))
        thetak = theta[ok]
        for _ in range(self.n_iterations):
            W = IVk / (1.0 + IVk * s2k)
            thetak = self._solve_theta(W, Fk, D, DD)
            R2 = np.where(IVk > 0, (Fk - D @ thetak.T) ** 2, 0.0)
            s2k = self._solve_scatter(R2, IVk, n_good[ok] - T)
        theta[ok] = thetak
        s2[ok] = s2k
        ok &= np.all(np.isfinite(theta), axis=1) & np.isfinite(s2)
        theta[~ok] = np.eye(1, T)[0]
        s2[~ok] = np.inf
        return CannonPiece(core=core, theta=theta, s2=s2, pixel_ok=ok, fiducials=fiducials, scales=scales,
                           training_labels=L.copy(), label_floor=np.zeros(self.n_labels))

    def _solve_theta(self, W: np.ndarray, F: np.ndarray, D: np.ndarray, DD: np.ndarray) -> np.ndarray:
        """Weighted least squares (optionally L1-regularised) for all pixels at once."""
        T = D.shape[1]
        A = (W.T @ DD).reshape(-1, T, T)
        b = (W * F).T @ D
        # a relative ridge of 1e-12 keeps a degenerate pixel solvable without changing others
        ridge = 1e-12 * np.trace(A, axis1=1, axis2=2) / T
        A = A + ridge[:, None, None] * np.eye(T)
        theta = np.linalg.solve(A, b[..., None])[..., 0]
        if self.regularization > 0:
            theta = _lasso_cd(A, b, self.regularization, theta)
        return theta

    def _solve_scatter(self, R2: np.ndarray, IV: np.ndarray, dof: np.ndarray) -> np.ndarray:
        """s² per pixel from squared residuals R2 (n, P) and ivar."""
        if self.scatter == "median":
            return _scatter_median(R2, IV)
        return _scatter_dof(R2, IV, np.maximum(dof, 1))

    # -- evaluation

    def predict(self, labels: Mapping[str, Any] | np.ndarray) -> np.ndarray:
        """Model flux (n, P) for physical labels (dict or (n, K) array); a single label vector
        (K,) gives (P,). Pixels a piece does not model are 1.0. A piecewise model uses, per row,
        the piece whose core holds the labels (:meth:`assign_piece`)."""
        self._require_trained()
        single = not isinstance(labels, Mapping) and np.ndim(labels) == 1
        L = self._label_array(labels, "predict")
        out = np.empty((L.shape[0], self.n_pixels))
        which = self.assign_piece(L)
        for j, piece in enumerate(self.pieces):
            rows = np.flatnonzero(which == j)
            if rows.size:
                out[rows] = label_vector(piece.scale(L[rows]), self.terms) @ piece.theta.T
        return out[0] if single else out

    def _linear_operator(self, j: int, common: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(G (T, Pc), fill (Pc,)) so that ``v = f_filled @ G.T`` is the linear solution of piece j
        with its typical pixel weights 1 / (s² + 1e-4) (S/N 100), masked pixels filled with the
        piece's fiducial spectrum."""
        if j not in self._linear_ops:
            piece = self.pieces[j]
            th = piece.theta[common]
            w = 1.0 / (piece.s2[common] + 1e-4)
            M = th.T @ (th * w[:, None])
            M = M + 1e-10 * np.trace(M) / M.shape[0] * np.eye(M.shape[0])
            G = np.linalg.solve(M, (th * w[:, None]).T)
            self._linear_ops[j] = (G, th[:, 0].copy())
        return self._linear_ops[j]

    def test(self, flux: np.ndarray, ivar: np.ndarray, *, initial_labels: np.ndarray | Mapping[str, Any] | None = None,
             n_starts: int = 2, max_hops: int = 2, max_iterations: int = 60, chunk: int = 128) -> CannonResult:
        """Fit labels to continuum-normalised spectra ``flux``, ``ivar`` ((n, P) or (P,)).

        ``initial_labels``: physical labels, (K,) for all stars, (n, K), or (n, m, K) for m
        starting points per star (a dict name → (n,) is accepted too); all of them are iterated.
        Without them the ``n_starts`` best automatic candidates are (module docstring).
        """
        self._require_trained()
        F = _as_2d_float("test flux", flux)
        IV = _as_2d_float("test ivar", ivar)
        if F.shape != IV.shape:
            raise CannonError(f"test flux {F.shape} and ivar {IV.shape} differ in shape")
        if F.shape[1] != self.n_pixels:
            raise CannonError(f"test spectra have {F.shape[1]} pixels, the model has {self.n_pixels}")
        if np.any(IV < 0):
            raise CannonError("test ivar has negative values")
        n, K, J = F.shape[0], self.n_labels, len(self.pieces)
        user_starts = self._initial_points(initial_labels, n)

        common = self.pixel_ok
        Fc, IVc = F[:, common], IV[:, common]
        usable = np.isfinite(Fc) & np.isfinite(IVc) & (IVc > 0)
        IVc = np.where(usable, IVc, 0.0)
        Fc = np.where(usable, Fc, 0.0)
        n_pix = usable.sum(axis=1)
        flags = np.where(n_pix < 0.5 * common.sum(), FLAGS["MOSTLY_MASKED"], 0).astype(np.int64)
        fit = n_pix >= max(MIN_PIXELS, 2 * K + 1)
        flags |= np.where(~fit, FLAGS["NO_DATA"], 0)
        rows = np.flatnonzero(fit)
        Fc, IVc, usable = Fc[rows], IVc[rows], usable[rows]
        nf = rows.size

        if user_starts is not None:
            starts = user_starts[rows]
            start_piece = self.assign_piece(starts.reshape(-1, K)).reshape(starts.shape[:2])
        else:
            starts, start_piece = self._auto_starts(Fc, IVc, usable, common, n_starts)

        attempts: list[dict[str, np.ndarray]] = []
        visited = np.zeros((nf, J), dtype=bool)
        for s in range(starts.shape[1]):
            attempts.append(self._fit_attempt(starts[:, s], start_piece[:, s], Fc, IVc, common,
                                              max_iterations, chunk))
            visited[np.arange(nf), start_piece[:, s]] = True
        for _ in range(max_hops if J > 1 else 0):
            best = _best_attempt(attempts)
            lab = np.stack([a["labels"] for a in attempts])[best, np.arange(nf)]
            cur = np.stack([a["piece"] for a in attempts])[best, np.arange(nf)]
            target = self.assign_piece(lab)
            hop = (target != cur) & ~visited[np.arange(nf), target]
            if not hop.any():
                break
            piece_idx = np.where(hop, target, -1)
            attempts.append(self._fit_attempt(lab, piece_idx, Fc, IVc, common, max_iterations, chunk))
            visited[np.flatnonzero(hop), target[hop]] = True

        best = _best_attempt(attempts)
        pick = {key: np.stack([a[key] for a in attempts])[best, np.arange(nf)] for key in attempts[0]}
        labels = np.full((n, K), np.nan)
        cov = np.full((n, K, K), np.nan)
        chi2 = np.full(n, np.nan)
        region = np.full(n, -1, dtype=np.int64)
        labels[rows], cov[rows] = pick["labels"], pick["cov"]
        chi2[rows], region[rows] = pick["objective"], pick["piece"]
        flags[rows] |= np.where(pick["converged"], 0, FLAGS["NOT_CONVERGED"])
        flags[rows] |= np.where(pick["singular"], FLAGS["SINGULAR"], 0)
        flags[rows] |= np.where(pick["at_limit"], FLAGS["OUTSIDE_RANGE"], 0)
        if J > 1:
            flags[rows] |= np.where(pick["in_core"], 0, FLAGS["OUTSIDE_REGION"])

        fitted = np.isfinite(labels).all(axis=1)
        lo_l, hi_l = self.training_labels.min(axis=0), self.training_labels.max(axis=0)
        with np.errstate(invalid="ignore"):
            outside_range = fitted & np.any((labels < lo_l) | (labels > hi_l), axis=1)
        flags |= np.where(outside_range, FLAGS["OUTSIDE_RANGE"], 0)
        inside = np.zeros(n, dtype=bool)
        if fitted.any():
            inside[fitted] = self.hull.contains(self.scale_labels(labels[fitted]))
        flags |= np.where(fitted & ~inside, FLAGS["OUTSIDE_HULL"], 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r_chi_sq = np.where(fitted, chi2 / np.maximum(n_pix - K, 1), np.nan)
        flags |= np.where(fitted & (r_chi_sq > HIGH_CHI2), FLAGS["HIGH_CHI2"], 0)
        return CannonResult(self.label_names, labels, cov, r_chi_sq, chi2, n_pix, flags, region)

    def _initial_points(self, initial: np.ndarray | Mapping[str, Any] | None, n: int) -> np.ndarray | None:
        """User starting points → physical (n, m, K), or None for the automatic ones."""
        if initial is None:
            return None
        K = self.n_labels
        if isinstance(initial, Mapping):
            arr = self._label_array(initial, "initial_labels")[:, None, :]
        else:
            arr = np.asarray(initial, dtype=float)
            if arr.shape == (K,):
                arr = np.broadcast_to(arr, (n, 1, K))
            elif arr.ndim == 2:
                arr = arr[:, None, :]
        if arr.ndim != 3 or arr.shape[0] != n or arr.shape[2] != K:
            raise CannonError(f"initial_labels must be ({K},), ({n}, {K}) or ({n}, m, {K}); got {np.shape(initial)}")
        if not np.all(np.isfinite(arr)):
            raise CannonError("initial_labels has non-finite values")
        return np.array(arr, dtype=float)

    def _auto_starts(self, F: np.ndarray, IV: np.ndarray, usable: np.ndarray, common: np.ndarray,
                     n_starts: int) -> tuple[np.ndarray, np.ndarray]:
        """Physical starting points (nf, n_starts, K) and their pieces (nf, n_starts): the best
        by noise χ² of each piece's linear solution and fiducial point."""
        nf, K = F.shape[0], self.n_labels
        cands, pieces, scores = [], [], []
        for j, piece in enumerate(self.pieces):
            G, fill = self._linear_operator(j, common)
            v = np.where(usable, F, fill) @ G.T
            lin = piece.unscale(np.clip(v[:, 1:K + 1], -3.0, 3.0))
            for c in (lin, np.broadcast_to(piece.fiducials, (nf, K))):
                model = label_vector(piece.scale(c), self.terms) @ piece.theta[common].T
                scores.append(np.sum(IV * (F - model) ** 2, axis=1))
                cands.append(c)
                pieces.append(j)
        scores_a = np.array(scores)                                   # (C, nf)
        order = np.argsort(scores_a, axis=0)[:max(1, min(n_starts, len(cands)))]   # (S, nf)
        cand_a = np.stack(cands)                                      # (C, nf, K)
        starts = cand_a[order, np.arange(nf)[None, :]].transpose(1, 0, 2)
        return starts, np.asarray(pieces)[order].T

    def _fit_attempt(self, x0: np.ndarray, piece_idx: np.ndarray, F: np.ndarray, IV: np.ndarray, common: np.ndarray,
                     max_iterations: int, chunk: int) -> dict[str, np.ndarray]:
        """LM for every star whose ``piece_idx`` ≥ 0, in that piece, from physical labels x0."""
        nf, K = x0.shape
        out = {"labels": np.full((nf, K), np.nan), "cov": np.full((nf, K, K), np.nan),
               "objective": np.full(nf, np.inf), "noise": np.full(nf, np.inf),
               "converged": np.zeros(nf, dtype=bool), "singular": np.zeros(nf, dtype=bool),
               "at_limit": np.zeros(nf, dtype=bool), "in_core": np.zeros(nf, dtype=bool),
               "piece": np.asarray(piece_idx, dtype=np.int64).copy()}
        for j, piece in enumerate(self.pieces):
            idx = np.flatnonzero(piece_idx == j)
            if idx.size == 0:
                continue
            theta_t = np.ascontiguousarray(piece.theta[common].T)
            theta_t32 = theta_t.astype(np.float32)
            s2 = piece.s2[common]
            for lo in range(0, idx.size, chunk):
                sel = idx[lo:lo + chunk]
                Fs, IVs = F[sel], IV[sel]
                W = IVs / (1.0 + IVs * s2)
                x, obj, H, conv, resid = _levenberg_marquardt(
                    theta_t, theta_t32, self.terms, np.clip(piece.scale(x0[sel]), -LABEL_LIMIT, LABEL_LIMIT),
                    Fs, W, max_iterations)
                cov_s, singular = _invert(H)
                lab = piece.unscale(x)
                out["labels"][sel] = lab
                out["cov"][sel] = cov_s * np.outer(piece.scales, piece.scales) + np.diag(piece.label_floor**2)
                out["objective"][sel] = obj
                out["noise"][sel] = np.sum(IVs * resid**2, axis=1)
                out["converged"][sel] = conv
                out["singular"][sel] = singular
                out["at_limit"][sel] = np.any(np.abs(x) >= LABEL_LIMIT * (1 - 1e-9), axis=1)
                out["in_core"][sel] = piece.in_core(lab)
        return out

    # -- persistence

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the trained model to one ``.npz`` file (atomically: temp file + rename)."""
        self._require_trained()
        path = Path(path)
        config = {"label_names": list(self.label_names), "order": self.order, "regularization": self.regularization,
                  "regions": self.regions, "region_margin": self.region_margin, "scatter": self.scatter,
                  "n_iterations": self.n_iterations, "meta": self.meta, "n_pieces": len(self.pieces)}
        arrays: dict[str, np.ndarray] = {
            "format": np.array(FORMAT),
            "config": np.array(json.dumps(config, sort_keys=True)),
            "fiducials": self.fiducials, "scales": self.scales, "training_labels": self.training_labels,
        }
        for i, p in enumerate(self.pieces):
            for key in _PIECE_ARRAYS:
                arrays[f"piece{i}_{key}"] = getattr(p, key)
        return write_arrays(path, arrays)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> CannonModel:
        """Read a model written by :meth:`write`; :class:`CannonError` naming the file for
        anything else (FileNotFoundError if it does not exist)."""
        path = Path(path)
        contents = read_arrays(path, what="Cannon model", error=CannonError, file_format=FORMAT,
                               required=("format", "config", "fiducials", "scales", "training_labels"))
        try:
            config = json.loads(str(contents["config"]))
            model = cls(config["label_names"], order=config["order"], regularization=config["regularization"],
                        regions=config["regions"], region_margin=config["region_margin"], scatter=config["scatter"],
                        n_iterations=config["n_iterations"], meta=config["meta"])
            n_pieces = int(config["n_pieces"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CannonError(f"{path}: bad model configuration ({exc})") from exc
        K, T = model.n_labels, model.n_terms
        pieces = []
        for i in range(n_pieces):
            missing = [k for k in _PIECE_ARRAYS if f"piece{i}_{k}" not in contents]
            if missing:
                raise CannonError(f"{path}: piece {i} lacks {missing}")
            a = {k: contents[f"piece{i}_{k}"] for k in _PIECE_ARRAYS}
            P = a["theta"].shape[0] if a["theta"].ndim == 2 else -1
            expected = {"core": (K, 2), "theta": (P, T), "s2": (P,), "pixel_ok": (P,), "fiducials": (K,),
                        "scales": (K,), "label_floor": (K,)}
            for key, shape in expected.items():
                if a[key].shape != shape:
                    raise CannonError(f"{path}: piece {i} {key} has shape {a[key].shape}, expected {shape}")
            pieces.append(CannonPiece(core=a["core"].astype(float), theta=a["theta"].astype(float),
                                      s2=a["s2"].astype(float), pixel_ok=a["pixel_ok"].astype(bool),
                                      fiducials=a["fiducials"].astype(float), scales=a["scales"].astype(float),
                                      training_labels=a["training_labels"].astype(float).reshape(-1, K),
                                      label_floor=a["label_floor"].astype(float)))
        if not pieces or len({p.theta.shape[0] for p in pieces}) != 1:
            raise CannonError(f"{path}: pieces missing or with different pixel counts")
        if contents["training_labels"].ndim != 2 or contents["training_labels"].shape[1] != K:
            raise CannonError(f"{path}: training_labels has shape {contents['training_labels'].shape}")
        model.pieces = pieces
        model.fiducials = contents["fiducials"].astype(float)
        model.scales = contents["scales"].astype(float)
        model.training_labels = contents["training_labels"].astype(float)
        return model


_PIECE_ARRAYS = ("core", "theta", "s2", "pixel_ok", "fiducials", "scales", "training_labels", "label_floor")


def _best_attempt(attempts: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Per star, the attempt with the lowest noise χ², preferring results inside their core."""
    noise = np.stack([a["noise"] for a in attempts])
    in_core = np.stack([a["in_core"] for a in attempts])
    finite = np.isfinite(noise)
    score = np.where(finite, noise, np.inf) + np.where(in_core | ~finite, 0.0, 1e300)
    return np.argmin(np.where(finite, score, np.inf), axis=0)


def _bounds_text(region: Mapping[str, Any]) -> str:
    """``{"teff": (None, 4300)}`` as ``teff < 4300`` (for progress lines)."""
    parts = []
    for name, (lo, hi) in region.items():
        if lo is None and hi is None:
            continue
        parts.append(f"{name} < {hi:g}" if lo is None else f"{name} >= {lo:g}" if hi is None
                     else f"{lo:g} <= {name} < {hi:g}")
    return ", ".join(parts) or "all labels"


def _median_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")
