"""APOGEENet: a small 1-D convolutional network that predicts Teff, logg and [Fe/H] from apStar flux.

Pure numpy, forward and backward passes written out (reference/methods.md §2.5, §6.7).

* **Input** is the raw apStar flux on the 8575-pixel rest-frame grid, physical continuum
  included (no continuum normalisation). Pre-processing follows APOGEENet III: bad pixels are
  masked, the flux is divided by its median (the per-spectrum normalisation), the log is taken
  of the flux clipped below (at :data:`LOG_FLOOR` of the median rather than 1e-6, see
  :func:`preprocess`), and values above the 95th percentile + 1 (and below the 5th − 1) are
  clipped (sky-line residuals, cosmic rays). The result is averaged 4× over the good pixels;
  bins without any are filled by linear interpolation.
* **Network**: blocks of [Conv1d ('same' padding) → ReLU → MaxPool 2], a dense ReLU layer and a
  linear output: standardised log10 Teff, logg, [Fe/H]. A convolution is k matrix products of
  shifted row slices of the zero-padded activations (:func:`_conv`); float32 throughout.
* **Training**: mean squared error on the standardised labels, Adam, mini-batches, cosine
  learning-rate decay, early stopping on a validation split (whole stars held out). Each epoch
  draws fresh noise (a random S/N per spectrum), a smooth random throughput per chip,
  extinction, masked pixel runs and occasional persistence, so a few thousand noiseless
  generator spectra (:func:`make_training_spectra`) go a long way.
* **Uncertainties**: the labels are the direct forward pass; ``n_draws`` (20) noisy copies of the
  input go through the network too, the noise drawn on the binned log-flux with the σ the pixel
  errors propagate to (:func:`input_sigma`; one pre-processing per spectrum, not per copy). Their
  standard deviation plus an error floor is the uncertainty; the floors (one set for cool, one
  for hot stars) are fitted on the validation split so that residual / uncertainty has unit
  robust spread there.
* **Flags** (:class:`ApogeeNetFlag`): predictions outside the trained label ranges; [Fe/H] of
  stars outside 3200-8000 K; non-finite input (masked); spectra with too few usable pixels or
  no positive flux level get no labels (None in the result rows).

Entry points for the Dagster wiring: :func:`train_model` (→ :class:`ApogeeNet`, with
:meth:`ApogeeNet.summary`, :meth:`~ApogeeNet.write`, :meth:`~ApogeeNet.read`) and
:func:`fit_spectra` (rows with the ``astra.apogeenet`` columns). The weights live in one small
``.npz`` that a Dagster asset produces; they are never committed.

Modules: :mod:`.flags` (labels, ApogeeNetFlag, ApogeeNetError), :mod:`.preprocess`, :mod:`.network`
(the network and Adam), :mod:`.augment`, :mod:`.results` (ApogeeNetResult), :mod:`.model` (ApogeeNet,
TrainingReport) and :mod:`.pipeline` (training data, :func:`train_model`, :func:`fit_spectra`).
"""

from astra_dagster.methods.apogeenet.augment import Augmentation, augment
from astra_dagster.methods.apogeenet.flags import (
    FATAL_FLAGS,
    FE_H_RELIABLE_TEFF,
    LABELS,
    ApogeeNetError,
    ApogeeNetFlag,
    flag_names,
)
from astra_dagster.methods.apogeenet.model import (
    FILE_FORMAT,
    HOT_TEFF,
    MIN_FLOOR_STARS,
    MIN_TRAINING_SPECTRA,
    ApogeeNet,
    TrainingReport,
)
from astra_dagster.methods.apogeenet.network import DEFAULT_BLOCKS, DEFAULT_HIDDEN
from astra_dagster.methods.apogeenet.pipeline import (
    DEFAULT_MIX,
    DEFAULT_TRAINING,
    FULL_TRAINING,
    RESULT_COLUMNS,
    fit_spectra,
    make_training_spectra,
    train_default,
    train_model,
)
from astra_dagster.methods.apogeenet.preprocess import (
    CHIP_PIXELS,
    CROP,
    IVAR_RATIO_BAD,
    LOG_FLOOR,
    MASK_BITS,
    SIGMA_CAP,
    input_sigma,
    preprocess,
    usable_pixels,
)
from astra_dagster.methods.apogeenet.results import ApogeeNetResult

__all__ = [
    "CHIP_PIXELS",
    "CROP",
    "DEFAULT_BLOCKS",
    "DEFAULT_HIDDEN",
    "DEFAULT_MIX",
    "DEFAULT_TRAINING",
    "FATAL_FLAGS",
    "FE_H_RELIABLE_TEFF",
    "FILE_FORMAT",
    "FULL_TRAINING",
    "HOT_TEFF",
    "IVAR_RATIO_BAD",
    "LABELS",
    "LOG_FLOOR",
    "MASK_BITS",
    "MIN_FLOOR_STARS",
    "MIN_TRAINING_SPECTRA",
    "RESULT_COLUMNS",
    "SIGMA_CAP",
    "ApogeeNet",
    "ApogeeNetError",
    "ApogeeNetFlag",
    "ApogeeNetResult",
    "Augmentation",
    "TrainingReport",
    "augment",
    "fit_spectra",
    "flag_names",
    "input_sigma",
    "make_training_spectra",
    "preprocess",
    "train_default",
    "train_model",
    "usable_pixels",
]
