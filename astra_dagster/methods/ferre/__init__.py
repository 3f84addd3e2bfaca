"""A compact FERRE (Allende Prieto; ASPCAP, García Pérez et al. 2016) in numpy/scipy: χ² fits
of continuum-normalised APOGEE spectra against a regular grid of synthetic spectra.

**Grid** (:class:`FerreGrid`, built by :func:`train_model`). A regular, rectangular grid over
``teff``, ``logg``, ``metals`` ([M/H]) and ``o_mg_si_s_ca_ti`` ([α/M]), optionally
``log10vdop`` (log10 micro-turbulence, km/s) and ``lgvsini`` (log10 v sin i, km/s), at
ASPCAP-like spacing (default 3500-7000 K in 250 K, logg 0-5 in 0.5, [M/H] -2.5..+0.5 and
[α/M] -0.25..+0.5 in 0.25 dex: 8580 nodes). Every node is rendered noiselessly by the project's
generator (:func:`astra_dagster.spectra.synth.synthesize` with ``TRAINING_SETTINGS``, the
hidden labels that are not grid dimensions on their mean relations) on the apStar grid and then
normalised with :func:`astra_dagster.methods.continuum.normalize_arrays` — the same rule that
normalises the data. Only detector pixels are kept; the line depth ``1 - flux`` is stored as
16-bit fixed point (:data:`DEPTH_QUANTUM` = 1/32000 of the continuum, far below the noise at
any S/N; int16 → float32 is ten times faster to unpack than float16) in one ``.npz`` file
together with the axes, the build facts and the held-out errors. The generator's line list is fixed,
so the grid does not depend on a seed.

**Model.** Multilinear interpolation between the 2^D corners of the grid cell (FERRE's
``inter=1``). The observed spectrum may differ from the model by a smooth factor per detector
chip: a Legendre polynomial of degree :data:`CONTINUUM_DEGREE` per chip multiplies the model,
and its coefficients are solved *linearly* at every χ² evaluation (so χ² is the profile over
the continuum: ``χ² = Σ w y² − Σ_chips bᵀ A⁻¹ b``, with ``A = Σ w m² P Pᵀ`` and
``b = Σ w y m P``).

**Fit** (:func:`fit_spectra`, one spectrum at a time):

1. normalise the raw apStar spectrum (:func:`continuum.normalize`); pixel weights are its ivar;
2. starting points: a χ² scan over *all* grid nodes (every :data:`COARSE_STRIDE`-th pixel, a
   scale factor per chip) and the :data:`N_STARTS` best nodes that are at least two nodes apart,
   plus a caller-given initial guess (clipped into the grid and flagged if outside);
3. Nelder–Mead (``scipy.optimize.minimize``, bounded to the grid, in grid-index units so the
   simplex is isotropic) from each start, and once more from the best result (a restart guards
   against a collapsed simplex);
4. uncertainties from the curvature of χ² at the minimum: a central finite-difference Hessian
   (step :data:`HESSIAN_STEP` of a grid cell), ``cov = 2 H⁻¹``, scaled by the reduced χ² when
   that exceeds one, plus in quadrature the grid's held-out error floor (``floor_<dim>``,
   see :func:`train_model`): the curvature alone knows nothing of model mismatch;
5. optional frozen dimensions (``frozen={"o_mg_si_s_ca_ti": 0.0}``): held at the given value.

**Flags** (``bitmask_flag``, :data:`FLAGS`): ``START_OUTSIDE_GRID`` a given initial guess was
outside the grid (clipped); ``AT_GRID_EDGE`` a free label ended on the grid boundary (the true
value may lie beyond; the lowest v sin i node is exempt: slower rotation is unresolved);
``FLAT_CHI2`` the spectrum carries no line information — the best grid model is not better
than a line-free continuum by :data:`FLAT_DELTA_CHI2` — labels None;
``TOO_FEW_PIXELS`` fewer than :data:`MIN_PIXELS` usable pixels — labels None;
``NOT_CONVERGED`` Nelder–Mead hit its iteration limit; ``HIGH_CHI2`` reduced χ² above
:data:`HIGH_CHI2`; ``CHIP_FAILED`` the continuum normalisation dropped a chip; ``BAD_CURVATURE``
the χ² Hessian is not positive definite (uncertainties None); ``HYDROGEN_LINES`` the Brackett
lines are far deeper than the best grid model's (a hot star beyond the grid's warm edge,
:mod:`astra_dagster.methods.hydrogen`) — labels None.

**Measured** (default grid, one core; ``bench/ferre_accuracy.py``): build ~50-70 s + ~15 s of
held-out fits, 127 MB file; 0.13 s CPU per spectrum. On 196 release-like giants and dwarfs at
S/N 100-200: robust σ 15 K (0.3 % of Teff), 0.07 dex logg, 0.035 dex [M/H] vs [Fe/H], 0.014 dex
[α/M]; rms 30 K, 0.14, 0.08, 0.03 — the tails are cool upper-RGB giants whose hidden [C/Fe],
[N/Fe] and turbulence scatter (the grid keeps them on mean relations) trade logg for [M/H]
(:data:`FULL_GRID` fits [C/M] and [N/M] and meets the targets in rms), and fast-rotating warm
dwarfs (:data:`ROTATION_GRID` fits v sin i and does better). Without an
initial guess every spectrum starts from the node scan, so no upstream estimate is needed.

Modules: :mod:`.flags` (FLAGS, thresholds, FerreError), :mod:`.grid` (FerreGrid, GridAxis), :mod:`.build`
(grid options, :func:`train_model`, held-out errors) and :mod:`.fit` (:func:`fit_spectra`).
"""

from astra_dagster.methods.ferre.build import DEFAULT_GRID, FULL_GRID, ROTATION_GRID, held_out_errors, train_model
from astra_dagster.methods.ferre.fit import fit_spectra
from astra_dagster.methods.ferre.flags import (
    COARSE_STRIDE,
    CONTINUUM_DEGREE,
    EDGE_TOLERANCE,
    FLAGS,
    FLAT_DELTA_CHI2,
    HESSIAN_STEP,
    HIGH_CHI2,
    MIN_PIXELS,
    N_STARTS,
    FerreError,
    describe_flags,
)
from astra_dagster.methods.ferre.grid import (
    DEPTH_QUANTUM,
    DIMENSIONS,
    FORMAT,
    GRID_DIMENSIONS,
    OPTIONAL_DIMENSIONS,
    FerreGrid,
    GridAxis,
)

__all__ = [
    "COARSE_STRIDE",
    "CONTINUUM_DEGREE",
    "DEFAULT_GRID",
    "DEPTH_QUANTUM",
    "DIMENSIONS",
    "EDGE_TOLERANCE",
    "FLAGS",
    "FLAT_DELTA_CHI2",
    "FORMAT",
    "FULL_GRID",
    "GRID_DIMENSIONS",
    "HESSIAN_STEP",
    "HIGH_CHI2",
    "MIN_PIXELS",
    "N_STARTS",
    "OPTIONAL_DIMENSIONS",
    "ROTATION_GRID",
    "FerreError",
    "FerreGrid",
    "GridAxis",
    "describe_flags",
    "fit_spectra",
    "held_out_errors",
    "train_model",
]
