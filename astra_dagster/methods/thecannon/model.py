"""The Cannon (Ness et al. 2015; Casey et al. 2016) in numpy/scipy: a data-driven model in which
every pixel's continuum-normalised flux is a polynomial in the stellar labels.

**Model.** For pixel p and star n, ``f_np = θ_p · ℓ(l_n) + noise`` with noise variance
``1/ivar_np + s²_p``. ``l`` are *scaled* labels ``(label - fiducial) / scale`` (fiducial = median,
scale = width of the 2.5-97.5 percentile range of the training labels, the convention of the
reference implementation ``annieslasso``), ``ℓ = [1, l_1..l_K, l_i l_j (i ≤ j), ...]`` all
monomials up to ``order`` (K = 4, order 2: 15 terms). ``s²_p`` is the pixel's intrinsic scatter:
what the model cannot explain.

**Training** (:meth:`CannonModel.train`), vectorised over all pixels at once:

1. with ``s²`` fixed, ``θ_p`` is the weighted least-squares solution with weights
   ``w_np = ivar_np / (1 + ivar_np s²_p)``: the normal matrices of all pixels come from one
   matrix product ``W.T @ (ℓ ⊗ ℓ)`` and are solved in one batched ``solve``;
2. with L1 regularisation ``Λ > 0`` the per-pixel objective is ``Σ_n w r² + Λ Σ_{j≥1} |θ_j|``
   (the constant term is not penalised, as in annieslasso; Λ is in χ² units), minimised by
   cyclic coordinate descent on the normal equations, again vectorised over pixels;
3. with ``θ`` fixed, ``s²_p`` is solved so that the pixel's χ² equals its degrees of freedom,
   ``Σ_n r²_np w_np(s²) = N_p - T`` (``scatter="dof"``, Newton iterations on ``1/χ²``, which
   converge monotonically), or so that the *median* χ² per star is 1 (``scatter="median"``,
   annieslasso's rule, by bisection);
4. steps 1-3 alternate ``n_iterations`` times (``n_iterations=1`` is annieslasso's scheme:
   θ at s² = 0, then s² once).

Pixels with no more usable training stars than coefficients (chip gaps, masked columns) are not
modelled: ``pixel_ok`` is False there, θ = [1, 0, ...], s² = inf, and the test step ignores them.

**Regions** (optional, ``regions=``): one polynomial cannot follow a spectrum from M dwarfs to
F dwarfs and K giants (on the project's synthetic survey a single quadratic model leaves
100-200 K Teff errors for dwarfs). With ``regions`` the model is *piecewise*: each region is a
*core* box in label space (e.g. :data:`SURVEY_REGIONS`: cool giants, warm giants, cool dwarfs,
warm dwarfs); its polynomial is trained on the training stars inside the core widened by
``region_margin``, so neighbouring pieces overlap and agree at the borders. The test step picks
the piece (below); ``predict`` uses the piece whose core contains the labels.

**Test** (:meth:`CannonModel.test`): non-linear least squares over the labels with θ, s² fixed,
by a Levenberg-Marquardt iteration written for a *batch* of stars (every matrix operation covers
all stars of a chunk, no per-star Python loop) with the analytic Jacobian ``θ · ∂ℓ/∂l``:

1. candidates, per piece: the labels of the spectrum's *linear* solution (ℓ treated as a free
   T-vector, solved with the piece's typical pixel weights, its linear terms read off) and the
   piece's fiducial point; each is scored by the noise χ² ``Σ ivar (f - model)²`` on the pixels
   every piece models;
2. LM from the ``n_starts`` best candidates, each in its own piece;
3. if the result lies outside its piece's core, LM again in the piece whose core holds it
   (starting there), at most ``max_hops`` times;
4. per star, the lowest noise-χ² result among those inside their piece's core (else the lowest
   overall, flagged OUTSIDE_REGION) is reported with its covariance: the formal ``(Jᵀ W J)⁻¹``
   (from ``ivar`` and ``s²``) plus, on the diagonal, the piece's systematic floor² from
   cross-validation at training time (:meth:`CannonModel.train`), and reduced
   χ² = objective χ² / (N_pix - K).

**Flags** (bits of ``CannonResult.flags``, see :data:`FLAGS`):
``OUTSIDE_HULL`` labels outside the convex hull of all training labels (exact test in scaled
label space: Delaunay triangulation for K ≤ 6, a linear-programming feasibility test otherwise);
``OUTSIDE_RANGE`` some label outside the training set's min-max range (or at the ±5-scale limit
of the fit); ``MOSTLY_MASKED`` fewer than half of the modelled pixels usable (still fitted);
``NO_DATA`` fewer than :data:`MIN_PIXELS` usable pixels (labels NaN, not fitted);
``NOT_CONVERGED`` the iteration limit was reached; ``HIGH_CHI2`` reduced χ² above
:data:`HIGH_CHI2`; ``SINGULAR`` the covariance could not be computed; ``OUTSIDE_REGION`` the
labels are outside the core of the piece that fitted them; ``HYDROGEN_LINES`` (set by
:func:`fit_spectra`) Brackett lines far deeper than the best model's: a hot star the model cannot
describe (:mod:`astra_dagster.methods.hydrogen`), labels None.

Models are written to / read from one ``.npz`` file (:meth:`CannonModel.write`, :meth:`CannonModel.read`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations_with_replacement
from pathlib import Path
from typing import Any

import numpy as np

from astra_dagster.methods.modelfile import read_arrays, write_arrays

FORMAT = "astra-thecannon/1"

FLAGS: dict[str, int] = {
    "OUTSIDE_HULL": 1 << 0,
    "OUTSIDE_RANGE": 1 << 1,
    "MOSTLY_MASKED": 1 << 2,
    "NO_DATA": 1 << 3,
    "NOT_CONVERGED": 1 << 4,
    "HIGH_CHI2": 1 << 5,
    "SINGULAR": 1 << 6,
    "OUTSIDE_REGION": 1 << 7,
    "HYDROGEN_LINES": 1 << 8,
}
#: Flags whose labels are not a measurement (written as None).
FATAL = FLAGS["NO_DATA"] | FLAGS["HYDROGEN_LINES"]
#: A spectrum needs at least this many usable modelled pixels to be fitted.
MIN_PIXELS = 100
#: Reduced χ² above which HIGH_CHI2 is set.
HIGH_CHI2 = 5.0
#: Scaled labels are kept within ±LABEL_LIMIT during the test step (5 × the 95 % width of the
#: training labels around the median: far outside any sensible model, but finite).
LABEL_LIMIT = 5.0

#: Core regions for the survey population (labels teff and logg): cool giants, warm giants,
#: cool dwarfs, warm dwarfs. Borders at logg 3.6 (between the giant branch and the subgiants),
#: 4300 K on the giant branch and 4500 K on the main sequence (where molecules take over).
SURVEY_REGIONS: tuple[dict[str, tuple[float | None, float | None]], ...] = (
    {"logg": (None, 3.6), "teff": (None, 4300.0)},
    {"logg": (None, 3.6), "teff": (4300.0, None)},
    {"logg": (3.6, None), "teff": (None, 4500.0)},
    {"logg": (3.6, None), "teff": (4500.0, None)},
)


def describe_flags(value: int) -> list[str]:
    """Names of the :data:`FLAGS` bits set in ``value``."""
    return [name for name, bit in FLAGS.items() if int(value) & bit]


class CannonError(ValueError):
    """Bad input to a Cannon model (the message names the problem and the counts)."""


# ----------------------------------------------------------------------------- vectorizer


def polynomial_terms(n_labels: int, order: int) -> np.ndarray:
    """Exponent matrix (T, K) of the label vector: row 0 is the constant term, then all monomials
    of degree 1..order in lexicographic order (the same order as annieslasso's
    ``PolynomialVectorizer``: ``1, a, b, a², ab, b²`` for two labels, order 2)."""
    if n_labels < 1:
        raise CannonError(f"a Cannon model needs at least one label, got {n_labels}")
    if not 1 <= order <= 4:
        raise CannonError(f"order must be 1..4, got {order}")
    rows = [np.zeros(n_labels, dtype=np.int64)]
    for degree in range(1, order + 1):
        for combo in combinations_with_replacement(range(n_labels), degree):
            row = np.zeros(n_labels, dtype=np.int64)
            for k in combo:
                row[k] += 1
            rows.append(row)
    return np.array(rows)


def _powers(scaled: np.ndarray, order: int) -> np.ndarray:
    """(B, K, order + 1) table of l**e."""
    out = np.empty((*scaled.shape, order + 1))
    out[..., 0] = 1.0
    for e in range(1, order + 1):
        out[..., e] = out[..., e - 1] * scaled
    return out


def label_vector(scaled: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """ℓ for scaled labels (B, K) → (B, T)."""
    pw = _powers(np.atleast_2d(scaled), int(terms.max()))
    k = np.arange(terms.shape[1])
    return np.prod(pw[:, k[None, :], terms], axis=2)


def label_vector_derivative(scaled: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """∂ℓ/∂l for scaled labels (B, K) → (B, T, K)."""
    pw = _powers(np.atleast_2d(scaled), int(terms.max()))
    kk = np.arange(terms.shape[1])
    factors = pw[:, kk[None, :], terms]                               # (B, T, K)
    dfactors = terms * pw[:, kk[None, :], np.maximum(terms - 1, 0)]   # d(l_k^e)/dl_k
    out = np.empty(factors.shape)
    for k in range(terms.shape[1]):
        others = np.prod(np.delete(factors, k, axis=2), axis=2) if terms.shape[1] > 1 else 1.0
        out[:, :, k] = dfactors[:, :, k] * others
    return out


# ----------------------------------------------------------------------------- label hull


class LabelHull:
    """Convex hull of training labels (scaled); ``contains`` is exact.

    Delaunay triangulation (Qhull) for 2 ≤ K ≤ 6 (falls back to the LP test if Qhull fails on
    degenerate points); for K = 1 the min-max interval; otherwise an LP feasibility test per point
    (is x a convex combination of the training points?).
    """

    def __init__(self, points: np.ndarray) -> None:
        self.points = np.asarray(points, dtype=float)
        self._delaunay: Any = None
        n, k = self.points.shape
        if 2 <= k <= 6 and n > k + 1:
            from scipy.spatial import Delaunay, QhullError

            try:
                self._delaunay = Delaunay(self.points)
            except QhullError:
                self._delaunay = None

    def contains(self, x: np.ndarray) -> np.ndarray:
        """Boolean (m,) for points (m, K); non-finite points are outside."""
        x = np.atleast_2d(np.asarray(x, dtype=float))
        finite = np.all(np.isfinite(x), axis=1)
        out = np.zeros(x.shape[0], dtype=bool)
        lo, hi = self.points.min(axis=0), self.points.max(axis=0)
        in_box = finite & np.all((x >= lo) & (x <= hi), axis=1)  # outside the box: outside the hull
        if not in_box.any():
            return out
        if self.points.shape[1] == 1:
            out[in_box] = True
        elif self._delaunay is not None:
            out[in_box] = self._delaunay.find_simplex(x[in_box]) >= 0
        else:
            out[in_box] = [self._lp_contains(p) for p in x[in_box]]
        return out

    def _lp_contains(self, x: np.ndarray) -> bool:
        from scipy.optimize import linprog

        n = self.points.shape[0]
        a_eq = np.vstack([self.points.T, np.ones((1, n))])
        b_eq = np.append(x, 1.0)
        res = linprog(np.zeros(n), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
        return bool(res.status == 0)


# ----------------------------------------------------------------------------- results


@dataclass
class CannonResult:
    """Test-step results for n spectra. ``labels`` (n, K) physical units, ``covariance``
    (n, K, K), ``r_chi_sq`` (objective χ² per degree of freedom), ``chi_sq`` (objective, with
    s²), ``n_pixels`` (usable pixels), ``flags`` (bits of :data:`FLAGS`), ``region`` (index of
    the piece that fitted the star, -1 if none); rows flagged NO_DATA are NaN."""

    label_names: tuple[str, ...]
    labels: np.ndarray
    covariance: np.ndarray
    r_chi_sq: np.ndarray
    chi_sq: np.ndarray
    n_pixels: np.ndarray
    flags: np.ndarray
    region: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def uncertainties(self) -> np.ndarray:
        """(n, K) square roots of the covariance diagonals."""
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.diagonal(self.covariance, axis1=1, axis2=2))

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{name: (n,), "u_" + name: (n,)}`` for every label, plus r_chi_sq and flags."""
        u = self.uncertainties
        out: dict[str, np.ndarray] = {}
        for k, name in enumerate(self.label_names):
            out[name] = self.labels[:, k]
            out[f"u_{name}"] = u[:, k]
        out["r_chi_sq"] = self.r_chi_sq
        out["flags"] = self.flags
        return out

    def __len__(self) -> int:
        return int(self.labels.shape[0])


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
              cv_folds: int = 2) -> CannonModel:
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
        """
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
        for r in range(1 if self.regions is None else len(self.regions)):
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
        self.pieces = pieces
        self.fiducials, self.scales, self.training_labels = fiducials, scales, L.copy()
        self._hull = None
        self._linear_ops = {}
        if cv_folds >= 2:
            self._cross_validate(F, IV, L, int(cv_folds))
        return self

    def _cross_validate(self, F: np.ndarray, IV: np.ndarray, L: np.ndarray, folds: int) -> None:
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


# ----------------------------------------------------------------------------- numerics


def _lasso_cd(A: np.ndarray, b: np.ndarray, lam: float, theta: np.ndarray,
              max_sweeps: int = 5000, tol: float = 1e-7) -> np.ndarray:
    """Minimise θᵀAθ - 2bᵀθ + λ Σ_{j≥1}|θ_j| for every pixel (A (P,T,T), b (P,T)) by cyclic
    coordinate descent, all pixels at once (warm start ``theta``).

    A pixel has converged when a whole sweep changes no coefficient by more than
    ``tol / √A_jj`` relative to ``√A_00`` (the model flux moves by less than ``tol`` in units of
    the pixel's weighted flux scale); converged pixels leave the working set every 10 sweeps.
    """
    theta = theta.copy()
    T = A.shape[1]
    work = np.arange(A.shape[0])
    Aw, bw, tw = A, b, theta.copy()
    diag = np.diagonal(Aw, axis1=1, axis2=2).copy()
    Atheta = np.einsum("pij,pj->pi", Aw, tw)
    half = 0.5 * lam
    for sweep in range(1, max_sweeps + 1):
        moved = np.zeros(work.size)
        for j in range(T):
            c = bw[:, j] - Atheta[:, j] + diag[:, j] * tw[:, j]
            new = c / diag[:, j] if j == 0 else np.sign(c) * np.maximum(np.abs(c) - half, 0.0) / diag[:, j]
            delta = new - tw[:, j]
            tw[:, j] = new
            Atheta += Aw[:, :, j] * delta[:, None]
            moved = np.maximum(moved, np.abs(delta) * np.sqrt(diag[:, j]))
        done = moved <= tol * np.sqrt(diag[:, 0])
        if done.all():
            theta[work] = tw
            return theta
        if sweep % 10 == 0 and done.any():
            theta[work[done]] = tw[done]
            keep = ~done
            work, Aw, bw, tw = work[keep], Aw[keep], bw[keep], tw[keep]
            diag, Atheta = diag[keep], Atheta[keep]
    theta[work] = tw
    return theta


def _scatter_dof(R2: np.ndarray, IV: np.ndarray, dof: np.ndarray, n_newton: int = 40) -> np.ndarray:
    """s² per pixel with Σ_n R2 IV / (1 + IV s²) = dof (0 where χ² ≤ dof already).

    Newton iterations on φ(s²) = 1/χ²(s²) - 1/dof, which is increasing and concave, so from
    s² = 0 they approach the root from below without overshooting (exact in one step when all
    ivar are equal and large, the noiseless-training case).
    """
    a = R2 * IV
    s2 = np.zeros(R2.shape[1])
    active = a.sum(axis=0) > dof
    for _ in range(n_newton):
        if not active.any():
            break
        ivk = IV[:, active]
        denom = 1.0 + ivk * s2[active]
        g = np.sum(a[:, active] / denom, axis=0)
        dg = -np.sum(a[:, active] * ivk / denom**2, axis=0)
        step = (1.0 / g - 1.0 / dof[active]) * g**2 / dg
        new = s2[active] + step
        done = np.abs(step) <= 1e-12 * np.maximum(new, 1e-30)
        s2[active] = new
        idx = np.flatnonzero(active)
        active[idx[done]] = False
    return s2


def _scatter_median(R2: np.ndarray, IV: np.ndarray, n_bisect: int = 100) -> np.ndarray:
    """s² per pixel with median_n(R2 IV / (1 + IV s²)) = 1 (annieslasso's rule), by bisection
    in log s² (the median is decreasing in s²); stars with ivar 0 count as χ² = 0 as there."""
    def med(s2: np.ndarray) -> np.ndarray:
        return np.median(R2 * IV / (1.0 + IV * s2), axis=0)

    s2 = np.zeros(R2.shape[1])
    need = med(s2) > 1.0
    if not need.any():
        return s2
    lo = np.full(int(need.sum()), -40.0)
    hi = np.log(np.max(R2[:, need], axis=0) + 1e-300) + 1.0
    Rn, IVn = R2[:, need], IV[:, need]
    for _ in range(n_bisect):
        mid = 0.5 * (lo + hi)
        above = np.median(Rn * IVn / (1.0 + IVn * np.exp(mid)), axis=0) > 1.0
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    s2[need] = np.exp(0.5 * (lo + hi))
    return s2


def _levenberg_marquardt(theta_t: np.ndarray, theta_t32: np.ndarray, terms: np.ndarray, x0: np.ndarray,
                         F: np.ndarray, W: np.ndarray, max_iterations: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched Levenberg-Marquardt for B problems: minimise Σ_p W (F - ℓ(x) θᵀ)² over scaled
    labels x (B, K), within ±LABEL_LIMIT. ``theta_t`` is θᵀ (T, P) (float64 for the model and
    χ², a float32 copy for the Jacobian, whose precision only affects the step direction).
    Returns x, χ² (B,), Jᵀ W J at x (B, K, K), converged (B,), residuals F - model (B, P)."""
    B, K = x0.shape
    W32 = W.astype(np.float32)

    def evaluate(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        vec = label_vector(x, terms)
        dvec = label_vector_derivative(x, terms).astype(np.float32)          # (b, T, K)
        r = F[rows] - vec @ theta_t
        jac = (dvec.transpose(0, 2, 1).reshape(-1, dvec.shape[1]) @ theta_t32).reshape(x.shape[0], K, -1)
        return r, jac, np.sum(W[rows] * r * r, axis=1)

    def normal(rows: np.ndarray, r: np.ndarray, jac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        jw = jac * W32[rows][:, None, :]
        return ((jw @ jac.transpose(0, 2, 1)).astype(float),
                np.einsum("bkp,bp->bk", jw, r.astype(np.float32)).astype(float))

    everyone = np.arange(B)
    x = x0.astype(float).copy()
    r, jac, chi2 = evaluate(x, everyone)
    H, g = normal(everyone, r, jac)
    resid = r
    lam = np.full(B, 1e-3)
    converged = np.zeros(B, dtype=bool)
    eye = np.eye(K)
    for _ in range(max_iterations):
        act = np.flatnonzero(~converged)
        if act.size == 0:
            break
        Ha = H[act]
        damp = Ha + lam[act, None, None] * (np.diagonal(Ha, axis1=1, axis2=2)[:, :, None] * eye) + 1e-12 * eye
        try:
            step = np.linalg.solve(damp, g[act][..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.stack([np.linalg.lstsq(d, gg, rcond=None)[0] for d, gg in zip(damp, g[act], strict=True)])
        xn = np.clip(x[act] + step, -LABEL_LIMIT, LABEL_LIMIT)
        rn, jn, cn = evaluate(xn, act)
        better = np.isfinite(cn) & (cn <= chi2[act])
        acc = act[better]
        gain = chi2[acc] - cn[better]
        small = (gain <= 1e-4 + 1e-10 * chi2[acc]) | (np.max(np.abs(xn[better] - x[acc]), axis=1) < 1e-8)
        x[acc], chi2[acc], resid[acc] = xn[better], cn[better], rn[better]
        if acc.size:
            H[acc], g[acc] = normal(acc, rn[better], jn[better])
        lam[acc] = np.maximum(lam[acc] * 0.2, 1e-9)
        converged[acc[small]] = True
        rej = act[~better]
        lam[rej] = lam[rej] * 10.0
        converged[rej[lam[rej] > 1e10]] = True   # no step downhill at any damping: a minimum
    return x, chi2, H, converged, resid


def _invert(H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of each (K, K) matrix; NaN and a True flag where not positive definite."""
    try:
        ci = np.linalg.inv(np.linalg.cholesky(H))
        return ci.transpose(0, 2, 1) @ ci, np.zeros(H.shape[0], dtype=bool)
    except np.linalg.LinAlgError:
        pass
    out = np.full(H.shape, np.nan)
    bad = np.zeros(H.shape[0], dtype=bool)
    for i, h in enumerate(H):   # only when some matrix is singular: find which
        try:
            ci = np.linalg.inv(np.linalg.cholesky(h))
            out[i] = ci.T @ ci
        except np.linalg.LinAlgError:
            bad[i] = True
    return out, bad


# ----------------------------------------------------------------------------- training and fitting spectra

#: Default training size: small enough for CI (generation ~20 s, training ~10 s on one core).
DEFAULT_TRAINING: dict[str, Any] = {"n_train": 600, "seed": 101}
#: Full-size settings (a few minutes on one core).
FULL_TRAINING: dict[str, Any] = {"n_train": 3000, "seed": 101}
#: Populations of the generator the default model covers; a quadratic model cannot span the hot stars.
TRAINING_KINDS: tuple[str, ...] = ("giant", "dwarf", "yso")
#: Label order of the per-spectrum results and of ``astra.thecannon``.
LABELS: tuple[str, ...] = ("teff", "logg", "fe_h", "alpha_m")


def training_spectra(n_train: int, seed: int, *, kinds: Sequence[str] = TRAINING_KINDS,
                     hidden_scatter: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``n_train`` noiseless generator spectra (TRAINING_SETTINGS: an independent draw and
    instrument settings from any release) of the populations ``kinds``, normalised with the
    shared continuum rule: (flux, ivar, labels).

    ``hidden_scatter``: the labels the model does not fit (microturbulence, rotation, [C/Fe],
    [N/Fe]) scatter about their mean relations as they do in real stars, so the trained s²
    carries that variance and the test step down-weights the pixels it affects, as a Cannon
    trained on survey spectra would. Without it those pixels look perfectly predictable and
    their star-to-star differences are read as label changes."""
    import dataclasses

    from astra_dagster.methods import continuum
    from astra_dagster.spectra import synth

    if n_train < 1:
        raise CannonError(f"training set size must be >= 1, got {n_train}")
    settings = dataclasses.replace(synth.TRAINING_SETTINGS, vary_hidden=hidden_scatter)
    ts = synth.make_training_set(int(np.ceil(n_train / 0.85)) + 10, seed, settings=settings)
    keep = np.flatnonzero(np.isin(ts.kind, tuple(kinds)))[:n_train]
    flux, ivar = continuum.normalize_arrays(ts.wavelength, ts.flux[keep], ts.ivar[keep])
    return flux, ivar, {k: ts.labels[k][keep] for k in LABELS}


def train_model(*, n_train: int = DEFAULT_TRAINING["n_train"], seed: int = DEFAULT_TRAINING["seed"],
                order: int = 2, regularization: float = 0.0, regions: str = "survey", cv_folds: int = 2,
                hidden_scatter: bool = True) -> CannonModel:
    """Train a Cannon model on :func:`training_spectra`. ``regions``: "survey" (the piecewise
    :data:`SURVEY_REGIONS` model) or "none" (one polynomial); ``hidden_scatter`` see there."""
    import time

    from astra_dagster.methods import continuum

    if regions not in ("survey", "none"):
        raise CannonError(f"regions must be 'survey' or 'none', got {regions!r}")
    start = time.perf_counter()
    flux, ivar, labels = training_spectra(n_train, seed, hidden_scatter=hidden_scatter)
    meta = {"n_train": int(flux.shape[0]), "seed": int(seed), "hidden_scatter": bool(hidden_scatter),
            "continuum": continuum.continuum_fingerprint()}
    model = CannonModel(LABELS, order=order, regularization=regularization, meta=meta,
                        regions=SURVEY_REGIONS if regions == "survey" else None)
    model.train(flux, ivar, labels, cv_folds=cv_folds)
    model.meta["training_seconds"] = round(time.perf_counter() - start, 2)
    return model


def _value(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def fit_spectra(model: CannonModel, spectra: Sequence[Any]) -> list[dict[str, Any]]:
    """Labels for rest-frame apStar spectra (:class:`~astra_dagster.spectra.spectrum.Spectrum`):
    one dict per spectrum with the ``astra.thecannon`` columns. Spectra the test step cannot fit
    (NO_DATA, e.g. all chips masked) get None labels and their flag bits."""
    from astra_dagster.methods import continuum, hydrogen

    if not spectra:
        return []
    normalised = [continuum.normalize(s) for s in spectra]
    flux = np.vstack([s.flux for s in normalised])
    ivar = np.vstack([s.ivar for s in normalised])
    result = model.test(flux, ivar)
    u = result.uncertainties
    fitted = np.all(np.isfinite(result.labels), axis=1)
    best = np.ones_like(flux)
    if fitted.any():
        best[fitted] = model.predict(result.labels[fitted])
    wavelength = normalised[0].wavelength
    rows = []
    for i, s in enumerate(spectra):
        flags = int(result.flags[i])
        if fitted[i] and hydrogen.has_hot_star_lines(wavelength, flux[i], best[i], ivar[i]):
            flags |= FLAGS["HYDROGEN_LINES"]
        measured = not flags & FATAL
        row: dict[str, Any] = {"snr": _value(float(s.meta.get("snr") or np.nan))}
        for k, name in enumerate(model.label_names):
            row[name] = _value(result.labels[i, k]) if measured else None
            row[f"u_{name}"] = _value(u[i, k]) if measured else None
        row["r_chi_sq"] = _value(result.r_chi_sq[i])
        row["bitmask_flag"] = flags
        rows.append(row)
    return rows
