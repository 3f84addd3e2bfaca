"""Doppler-style radial velocities and coarse stellar labels (numpy/scipy only).

The flow follows Doppler's ``fit_cannon`` (reference/methods.md §2.1) with a Cannon emulator
(:mod:`.emulator`) as the template family:

1. **prep** — mask bad pixels with the Doppler mask, non-finite values and large positive
   outliers; normalise each chip by a polynomial through upper percentiles of the flux.
2. **coarse CCF** — χ²-based FFT cross-correlation over ±``vrange`` km/s against Doppler's
   coarse template set (of every emulator given: that is how template families compete). A
   peak at the edge of the range, or no significant peak, ends the fit with a flagged result.
3. **labels at fixed RV** — Levenberg–Marquardt over (Teff, logg, [Fe/H]) and a per-chip
   continuum polynomial, starting from the best coarse template.
4. **second CCF** against the best-label template (plus a 1 km/s χ²(v) scan for broad-lined,
   e.g. hot, stars).
5. **joint fit** of Teff, logg, [Fe/H], RV and the continuum with the analytic emulator
   Jacobian, then 5σ outlier rejection and a refit. Doubtful fits (labels on a range limit,
   no convergence, ambiguous CCF) are repeated from other templates; the lowest χ² wins.
6. **rotation** — the extra rotational broadening that best fits the line shapes (depths
   free); when it is significant the joint fit is repeated with broadened templates, and the
   broadening measured again at the new labels until it settles. A fit left on a label limit
   has the other families' fits broadened too, and the lowest χ² wins.
7. **fine RV** — χ²(v) on a fine grid around the solution at fixed labels (continuum re-solved
   at every v), minimum from a parabola.
8. **verdict** — an RV more than max(10 km/s, 5σ) from its CCF peak (``CCF_MISMATCH``), a label
   on its template limit (``LABEL_AT_EDGE``) or residuals beyond the noise above 5 % of the
   continuum (``POOR_MATCH``) make the RV untrusted: ``BAD_RV`` (fatal), NaN velocity and labels.

:func:`fit_star` fits a star's measured visits jointly (common labels, one RV per visit) and
then measures a visit with no signal of its own (``NO_SIGNAL``) with the star's template, its
velocity and continuum only (``STAR_TEMPLATE``).

Uncertainties come from the inverse of JᵀWJ at the solution, inflated by √χ²_red when the
model does not describe the data to the noise level, plus (in quadrature) the templates'
calibrated systematic floors (:func:`error_floors`). Velocities: ``vrel`` is the shift of the
spectrum relative to the template (observed frame for visits, the residual shift for
rest-frame rows); ``vhelio = vrel + bc`` (APOGEE convention, barycentric despite the name).

Modules: :mod:`.flags` (thresholds, :class:`DopplerFlag`), :mod:`.results` (:class:`VisitRV`,
:class:`StarRV`), :mod:`.barycentric`, :mod:`.prepare` (step 1), :mod:`.ccf` (steps 2 and 4),
:mod:`.model` (template × continuum), :mod:`.lm` (Levenberg–Marquardt), :mod:`.rotation` (step 6),
:mod:`.fit` (:func:`fit_visit`), :mod:`.star` (:func:`fit_star`), :mod:`.floors` and
:mod:`.calibrate` (error floors), :mod:`.emulator` (the template emulator) and :mod:`.templates`
(the template sets: generator-trained and Synspec).
"""

from astra_dagster.methods.doppler.barycentric import SITES, barycentric_correction
from astra_dagster.methods.doppler.calibrate import calibrate_error_floors
from astra_dagster.methods.doppler.emulator import (
    APOGEE_RESOLUTION,
    COARSE_FE_H,
    COARSE_TEFF_LOGG,
    LABEL_NAMES,
    SYNSPEC_FAMILIES,
    TEMPLATE_LAMBDA_MAX,
    TEMPLATE_LAMBDA_MIN,
    TEMPLATE_LOG10_STEP,
    Emulator,
    EmulatorError,
    air_to_vacuum,
    convert_cannon_model,
    cubic_exponents,
    load_synspec_emulators,
    read_cannon_pickle,
    template_log10_grid,
    train_cannon,
    vacuum_to_air,
)
from astra_dagster.methods.doppler.fit import fit_visit
from astra_dagster.methods.doppler.flags import (
    APOGEE_CHIP_EDGES,
    CCF_MISMATCH_KMS,
    CCF_MISMATCH_SIGMA,
    CLIP_SIGMA,
    CONTINUUM_ORDER,
    FATAL_FLAGS,
    HIGH_CHISQ,
    MIN_CHIP_PIXELS,
    MIN_GOOD_PIXELS,
    POOR_MATCH_RESIDUAL,
    RV_DOUBTS,
    DopplerError,
    DopplerFlag,
    UnsupportedSpectrumError,
    flag_names,
)
from astra_dagster.methods.doppler.floors import FLOOR_NAMES, error_floors
from astra_dagster.methods.doppler.prepare import as_emulators
from astra_dagster.methods.doppler.results import StarRV, VisitRV
from astra_dagster.methods.doppler.star import fit_star
from astra_dagster.methods.doppler.templates import (
    GENERATOR_BANDS,
    TEMPLATE_KINDS,
    TEMPLATE_SELECTIONS,
    generator_training_settings,
    load_templates,
    select_templates,
    train_generator_emulator,
    train_generator_emulators,
)

__all__ = [
    "APOGEE_CHIP_EDGES",
    "APOGEE_RESOLUTION",
    "CCF_MISMATCH_KMS",
    "CCF_MISMATCH_SIGMA",
    "CLIP_SIGMA",
    "COARSE_FE_H",
    "COARSE_TEFF_LOGG",
    "CONTINUUM_ORDER",
    "FATAL_FLAGS",
    "FLOOR_NAMES",
    "GENERATOR_BANDS",
    "HIGH_CHISQ",
    "LABEL_NAMES",
    "MIN_CHIP_PIXELS",
    "MIN_GOOD_PIXELS",
    "POOR_MATCH_RESIDUAL",
    "RV_DOUBTS",
    "SITES",
    "SYNSPEC_FAMILIES",
    "TEMPLATE_KINDS",
    "TEMPLATE_LAMBDA_MAX",
    "TEMPLATE_LAMBDA_MIN",
    "TEMPLATE_LOG10_STEP",
    "TEMPLATE_SELECTIONS",
    "DopplerError",
    "DopplerFlag",
    "Emulator",
    "EmulatorError",
    "StarRV",
    "UnsupportedSpectrumError",
    "VisitRV",
    "air_to_vacuum",
    "as_emulators",
    "barycentric_correction",
    "calibrate_error_floors",
    "convert_cannon_model",
    "cubic_exponents",
    "error_floors",
    "fit_star",
    "fit_visit",
    "flag_names",
    "generator_training_settings",
    "load_synspec_emulators",
    "load_templates",
    "read_cannon_pickle",
    "select_templates",
    "template_log10_grid",
    "train_cannon",
    "train_generator_emulator",
    "train_generator_emulators",
    "vacuum_to_air",
]
