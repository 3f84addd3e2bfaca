"""Doppler's thresholds, its error and its result flags (:class:`DopplerFlag`)."""

from __future__ import annotations

import enum

#: Fewest usable pixels for a fit; fewer gives a flagged NaN result.
MIN_GOOD_PIXELS = 500
#: A chip with fewer usable pixels than this is left out (and flagged).
MIN_CHIP_PIXELS = 100
#: Order of the per-chip continuum polynomial fitted jointly with the labels.
CONTINUUM_ORDER = 3
#: Residuals beyond this many σ are masked after the first joint fit.
CLIP_SIGMA = 5.0
#: Reduced χ² above this is flagged.
HIGH_CHISQ = 10.0
#: CCF peak significance (√Δχ² against a flat spectrum) below which the result is flagged
#: WEAK_CCF, and below which nothing is measured (NO_SIGNAL; pure noise reaches ~4).
_WEAK_CCF = 12.0
_NO_SIGNAL = 6.0
#: With one template, the star's own (labels and broadening from its other visits), the
#: correlation peak of pure noise is far lower: 2.6-3.4 at the 99th percentile, at most 3.75, in
#: 200 noise spectra x 5 templates (giant, dwarf, M giant, hot star slow and at 130 km/s). A
#: visit without a signal of its own is measured with the star's template above this.
STAR_TEMPLATE_SIGNAL = 4.5
#: Coarse templates within this CCF χ² of the best one that place the star at a different
#: velocity are fitted too (at most _MAX_TEMPLATE_FITS fits per spectrum).
_AMBIGUOUS_DCHI2 = 100.0
_MAX_TEMPLATE_FITS = 3
#: A fitted RV farther from its coarse CCF peak than both of these (km/s; σ of the peak) is not
#: trusted: the fit walked off to another χ² minimum. Measured with the generator's templates:
#: real DR17 spectra 44-640 km/s off their peak (all wrong); 240 synthetic visits (S/N 10-500,
#: hot stars included) at most 8.8 km/s and, beyond 2 km/s, at most 3.4σ.
CCF_MISMATCH_KMS = 10.0
CCF_MISMATCH_SIGMA = 5.0
#: Residuals beyond the noise (√(χ²_red − 1) / S/N, a fraction of the continuum) above this mean
#: the template does not describe the spectrum. Measured: synthetic visits ≤ 0.014, real DR17
#: spectra on Synspec templates ≤ 0.029.
POOR_MATCH_RESIDUAL = 0.05
#: A label pinned on its template limit makes the RV untrusted only when the RV depends on it:
#: when the label's plausible excursion beyond the limit (how far beyond it the unconstrained
#: minimum lies, at least 3σ) would move the RV, by the fit's covariance (Σ_vL/Σ_LL), by more
#: than EDGE_RV_SIGMA of its uncertainty. Measured: the seed-3 release's hot star pinned at logg
#: 3.50, 0.17σ (its RV 0.4σ from the truth); a seed-1 YSO pinned at the warm family's 3851 K,
#: < 1σ (RVs within 0.04 km/s); real apVisit 5095 pinned at Teff 6493 K (generator templates),
#: 0.01σ; a toy family whose lines shift 1.5 km/s per dex of logg, pinned 0.6 dex short, 25σ.
EDGE_RV_SIGMA = 1.0
#: APOGEE chip boundaries (Å, vacuum): the middles of the two detector gaps.
APOGEE_CHIP_EDGES = (15833.0, 16454.0)


class DopplerError(RuntimeError):
    """The input cannot be fitted at all (wrong templates, malformed spectrum, ...)."""


class UnsupportedSpectrumError(DopplerError):
    """The spectrum lies outside the templates' wavelength range (e.g. a BOSS optical spectrum)."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class DopplerFlag(enum.IntFlag):
    """Bits of :attr:`VisitRV.flags`; ``FATAL`` bits mean the RV could not be measured."""

    LOW_GOOD_PIXELS = 1 << 0      # fewer than MIN_GOOD_PIXELS usable pixels: nothing measured
    CHIP_MASKED = 1 << 1          # at least one chip had no usable pixels and was left out
    CCF_EDGE = 1 << 2             # the correlation peak is at the edge of the search range
    NONFINITE_INPUT = 1 << 3      # NaN/inf flux or ivar were present (masked)
    LABEL_AT_EDGE = 1 << 4        # a label sits at its template range limit (a warning unless EDGE_RV)
    NOT_CONVERGED = 1 << 5        # the joint fit hit its iteration limit
    HIGH_CHISQ = 1 << 6           # reduced χ² > HIGH_CHISQ
    BC_COMPUTED = 1 << 7          # bc was computed with astropy (no bc in the metadata)
    NO_BC = 1 << 8                # bc unknown: vhelio is NaN
    REST_FRAME = 1 << 9           # rest-frame input: vrel is the residual shift, bc = 0
    WEAK_CCF = 1 << 10            # the correlation peak is not significant
    FIT_FAILED = 1 << 11          # the least-squares problem was singular: nothing measured
    RV_SCAN_EDGE = 1 << 12        # fine χ²(v) scan minimum at its edge (v from the joint fit)
    NO_SIGNAL = 1 << 13           # no significant correlation peak (noise only): nothing measured
    NO_GOOD_VISITS = 1 << 14      # fit_star: no visit gave a velocity
    CCF_MISMATCH = 1 << 15        # fitted RV > max(CCF_MISMATCH_KMS, CCF_MISMATCH_SIGMA σ) from the CCF peak
    POOR_MATCH = 1 << 16          # residuals beyond the noise > POOR_MATCH_RESIDUAL of the continuum
    BAD_RV = 1 << 17              # the fit ran but its RV is not trusted (RV_DOUBTS): velocity NaN
    EDGE_RV = 1 << 18             # the RV depends on a label at its limit (by more than EDGE_RV_SIGMA)
    STAR_TEMPLATE = 1 << 19       # no signal alone (NO_SIGNAL): RV measured with the star's template


#: Flags that leave the velocity unmeasured (NaN).
FATAL_FLAGS = (DopplerFlag.LOW_GOOD_PIXELS | DopplerFlag.CCF_EDGE | DopplerFlag.FIT_FAILED
               | DopplerFlag.NO_SIGNAL | DopplerFlag.NO_GOOD_VISITS | DopplerFlag.BAD_RV)
#: Any of these makes a fitted RV untrusted (BAD_RV). A label on its range limit alone does not:
#: the family does not cover the star, but where the RV does not depend on that label (a hot
#: star's logg, whose broad lines barely move the velocity) the boundary solution's RV is as good
#: as a minimum's; EDGE_RV marks the pinned labels the RV does depend on.
RV_DOUBTS = DopplerFlag.CCF_MISMATCH | DopplerFlag.EDGE_RV | DopplerFlag.POOR_MATCH


def flag_names(flags: int) -> list[str]:
    """Names of the bits set in ``flags``."""
    return [f.name for f in DopplerFlag if flags & f and f.name]
