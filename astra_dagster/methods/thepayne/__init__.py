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

Modules: :mod:`.flags` (FLAGS, thresholds, PayneError), :mod:`.model` (PayneModel, label sets),
:mod:`.training` (:func:`train_on_arrays`, :func:`train_model`) and :mod:`.fit` (:func:`fit_normalized`,
:func:`fit_spectra`).
"""

from astra_dagster.methods.thepayne.fit import check_labels, fit_normalized, fit_spectra, row_labels
from astra_dagster.methods.thepayne.flags import (
    BOUND_TOL,
    COVERAGE_DISTANCE,
    FATAL,
    FLAGS,
    HIGH_CHI2,
    KMS_PER_PIXEL,
    MIN_PIXELS,
    N_STARTS,
    RANGE_LABELS,
    RV_LIMIT,
    PayneError,
    describe_flags,
)
from astra_dagster.methods.thepayne.model import (
    COLUMNS,
    EDGE_PIXELS,
    FIT_LABELS,
    FORMAT,
    LABELS,
    LEAK,
    REQUIRED_LABELS,
    PayneModel,
    model_pixels,
)
from astra_dagster.methods.thepayne.training import (
    DEFAULT_TRAINING,
    FULL_TRAINING,
    TRAINING_CHUNK,
    calibrate_floor,
    train_model,
    train_on_arrays,
    training_data,
)

__all__ = [
    "BOUND_TOL",
    "COLUMNS",
    "COVERAGE_DISTANCE",
    "DEFAULT_TRAINING",
    "EDGE_PIXELS",
    "FATAL",
    "FIT_LABELS",
    "FLAGS",
    "FORMAT",
    "FULL_TRAINING",
    "HIGH_CHI2",
    "KMS_PER_PIXEL",
    "LABELS",
    "LEAK",
    "MIN_PIXELS",
    "N_STARTS",
    "RANGE_LABELS",
    "REQUIRED_LABELS",
    "RV_LIMIT",
    "TRAINING_CHUNK",
    "PayneError",
    "PayneModel",
    "calibrate_floor",
    "check_labels",
    "describe_flags",
    "fit_normalized",
    "fit_spectra",
    "model_pixels",
    "row_labels",
    "train_model",
    "train_on_arrays",
    "training_data",
]
