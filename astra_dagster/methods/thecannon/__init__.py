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

Modules: :mod:`.flags` (FLAGS, thresholds, CannonError), :mod:`.vectorizer` (label vector),
:mod:`.hull` (LabelHull), :mod:`.results` (CannonResult), :mod:`.model` (CannonModel, CannonPiece,
SURVEY_REGIONS), :mod:`.numerics` (coordinate descent, s², batched LM) and :mod:`.pipeline`
(training set, :func:`train_model`, :func:`fit_spectra`).
"""

from astra_dagster.methods.thecannon.flags import (
    FATAL,
    FLAGS,
    HIGH_CHI2,
    LABEL_LIMIT,
    MIN_PIXELS,
    CannonError,
    describe_flags,
)
from astra_dagster.methods.thecannon.hull import LabelHull
from astra_dagster.methods.thecannon.model import FORMAT, SURVEY_REGIONS, CannonModel, CannonPiece
from astra_dagster.methods.thecannon.pipeline import (
    DEFAULT_TRAINING,
    FULL_TRAINING,
    LABELS,
    TRAINING_KINDS,
    fit_spectra,
    train_model,
    training_spectra,
)
from astra_dagster.methods.thecannon.results import CannonResult
from astra_dagster.methods.thecannon.vectorizer import label_vector, label_vector_derivative, polynomial_terms

__all__ = [
    "DEFAULT_TRAINING",
    "FATAL",
    "FLAGS",
    "FORMAT",
    "FULL_TRAINING",
    "HIGH_CHI2",
    "LABELS",
    "LABEL_LIMIT",
    "MIN_PIXELS",
    "SURVEY_REGIONS",
    "TRAINING_KINDS",
    "CannonError",
    "CannonModel",
    "CannonPiece",
    "CannonResult",
    "LabelHull",
    "describe_flags",
    "fit_spectra",
    "label_vector",
    "label_vector_derivative",
    "polynomial_terms",
    "train_model",
    "training_spectra",
]
