"""Model-mismatch screen shared by the label methods (issue #11).

Every label model is trained on the synthetic generator. A spectrum the generator cannot make
(today: any real star, whose lines sit elsewhere than the generator's) is still fitted, and the
best fit lands somewhere in label space with numbers that look like labels but are not. Its
reduced χ² gives it away: the noise allows ~1, a generator star fitted by a generator-trained
model gives at most a few, a real star gives tens to hundreds. Above :data:`POOR_MATCH_CHI2`
the methods set their ``POOR_MODEL_MATCH`` flag and write NULL labels and uncertainties (the
χ² and the flag stay, so the user sees why).

Measured with the small test configs of ``test_label_assets.py`` (r_chi_sq; FERRE's
10**log_chisq_fit), synthetic release stars (8 stars, S/N ~50-300) vs the two real DR17 apStar stars
2M17335483 (giant) / 2M19485057 (dwarf):

* The Cannon: synthetic 0.66-1.39; real 127 / 24.
* The Payne: synthetic 1.0-1.92; real 242 / 41.6.
* FERRE: synthetic 1.4-3.6; real 459 / 69.

APOGEENet has no χ²; refining the generator from its labels gave synthetic 1.37-3.4, real
468 / 72.5, but cost 1-2 s per star against a 5 ms budget. It has its own cheap screen instead
(:mod:`astra_dagster.methods.apogeenet.screen`, threshold 20 on its own statistic).

The threshold sits a factor ~3 above the largest synthetic value and ~2.4 below the smallest
real one (the existing HIGH_CHI2 flags, 5-10, stay as warnings with labels written). A model's
small error grows in χ² as (S/N)², so where the S/N is known the residual beyond the noise,
√(χ² − 1)/(S/N), must also exceed :data:`POOR_MATCH_FRACTION` (2 % of the continuum): bright
synthetic stars reach χ² ~15 at 1 % off, the real stars are 3.5-14 % off.
"""

from __future__ import annotations

import numpy as np

#: Reduced χ² above which the best model cannot explain the spectrum (see the module docstring).
POOR_MATCH_CHI2 = 10.0
#: ... and the residual beyond the noise, √(χ² − 1)/(S/N) as a fraction of the continuum, above
#: which it is a mismatch, not a bright star's small model error: a synthetic giant at S/N ~400
#: with χ² 15 is 0.9 % off (The Payne, default model); the real stars are 3.5-14 % off
#: (χ² 24-459 at S/N 137-154). χ² alone would null every bright star whose model is 1 % off.
POOR_MATCH_FRACTION = 0.02


def reduced_chi_square(flux: np.ndarray, model: np.ndarray, ivar: np.ndarray, n_params: int = 0) -> float:
    """Σ ivar (flux - model)² / (N - n_params) over the pixels with finite values and ivar > 0;
    NaN when there are none. Normalised spectra on one grid."""
    flux, model, ivar = (np.asarray(a, dtype=float) for a in (flux, model, ivar))
    good = np.isfinite(flux) & np.isfinite(model) & np.isfinite(ivar) & (ivar > 0)
    n = int(good.sum())
    if n <= n_params:
        return float("nan")
    return float(np.sum(ivar[good] * (flux[good] - model[good]) ** 2) / (n - n_params))


def is_poor_match(r_chi_sq: float | None, snr: float | None = None) -> bool:
    """True when ``r_chi_sq`` is above :data:`POOR_MATCH_CHI2` and, where the spectrum's S/N is
    known, the excess residual √(χ² − 1)/(S/N) is above :data:`POOR_MATCH_FRACTION` (never for
    None/NaN χ²: no fit, no verdict)."""
    if r_chi_sq is None or not np.isfinite(r_chi_sq) or float(r_chi_sq) <= POOR_MATCH_CHI2:
        return False
    if snr is None or not np.isfinite(snr) or float(snr) <= 0:
        return True
    return float(np.sqrt(float(r_chi_sq) - 1.0) / float(snr)) > POOR_MATCH_FRACTION
