"""Hot-star screen for the label methods whose models cover only cool stars (The Cannon, The Payne).

A 8000-20000 K star has few metal lines and strong, broad Brackett lines. A cool-star model fits
it as a metal-poor F dwarf, sometimes with a modest χ² and labels that look plausible, but it
cannot make those hydrogen lines. So after the fit the data in windows around the Brackett lines
(n = 11..21 -> 4, vacuum) are compared with the best model: a weighted mean of (model - data)
of at least :data:`EXCESS` that is also :data:`SIGNIFICANCE` σ from zero marks a star outside the
model's domain. Measured on generator spectra at S/N 70-190 with the default Payne: hot stars
0.03-0.045 (60-180 σ); giants, dwarfs up to 6500 K and YSO-like stars below 0.004 (10 σ).
"""

from __future__ import annotations

import numpy as np

#: Vacuum wavelengths (Å) of the Brackett lines n = 11..21 -> 4 (Rydberg formula, hydrogen's
#: reduced-mass constant), all on the APOGEE chips.
BRACKETT_WAVELENGTHS: tuple[float, ...] = tuple(1e10 / (1.0967758e7 * (1 / 16 - 1 / n**2)) for n in range(11, 22))
#: Half width (Å) of the window around each line.
HALF_WIDTH = 6.0
#: Mean depth (normalised flux) by which the data must exceed the model in the windows...
EXCESS = 0.01
#: ...and how many σ that must be.
SIGNIFICANCE = 15.0
#: The same two thresholds for a fit already outside the model's training hull. On the physical
#: generator (Synspec hydrogen lines, 8000-20000 K, v sin i up to 200 km/s) a cool-star Cannon
#: puts most hot stars at 5600-6900 K, just outside its hull, with Brackett excesses of only
#: 0.3-1 % (8-25 σ); cool stars reach 0.5 % at 10 σ only inside the hull, and 0.2 % outside it
#: (measured on 120 cool and 120 hot generator stars at S/N 40-220). Hull plus excess says why
#: the star is foreign. On an independent draw through The Cannon's fit_spectra: 35 of 48 hot
#: stars caught (the rest keep OUTSIDE_HULL), 0 of 180 giants, dwarfs and YSOs.
EXCESS_OUTSIDE_HULL = 0.003
SIGNIFICANCE_OUTSIDE_HULL = 8.0


def brackett_windows(wavelength: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels within :data:`HALF_WIDTH` of a Brackett line."""
    wavelength = np.asarray(wavelength, dtype=float)
    near = np.zeros(wavelength.shape, dtype=bool)
    for centre in BRACKETT_WAVELENGTHS:
        near |= np.abs(wavelength - centre) < HALF_WIDTH
    return near


def hydrogen_excess(wavelength: np.ndarray, flux: np.ndarray, model: np.ndarray, weight: np.ndarray
                    ) -> tuple[float, float]:
    """(excess, significance): the ``weight``-ed mean of ``model - flux`` over the Brackett
    windows and that mean over its σ (1/√Σw). (0, 0) when no window pixel has weight. Arrays are
    normalised spectra on one grid; ``weight`` is 1/σ² (0 for unusable pixels)."""
    w = np.where(brackett_windows(wavelength) & np.isfinite(flux) & np.isfinite(model), weight, 0.0)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    total = float(np.sum(w))
    if total <= 0:
        return 0.0, 0.0
    excess = float(np.sum(w * np.where(w > 0, model - flux, 0.0)) / total)
    return excess, excess * float(np.sqrt(total))


def has_hot_star_lines(wavelength: np.ndarray, flux: np.ndarray, model: np.ndarray, weight: np.ndarray,
                       *, outside_hull: bool = False) -> bool:
    """True when the Brackett lines are deeper than the model by :data:`EXCESS` and
    :data:`SIGNIFICANCE` σ: a hot star outside a cool-star model (see the module docstring).
    ``outside_hull``: the fit already lies outside the model's training set, and the lower
    :data:`EXCESS_OUTSIDE_HULL` / :data:`SIGNIFICANCE_OUTSIDE_HULL` apply."""
    excess, significance = hydrogen_excess(wavelength, flux, model, weight)
    if outside_hull:
        return excess >= EXCESS_OUTSIDE_HULL and significance >= SIGNIFICANCE_OUTSIDE_HULL
    return excess >= EXCESS and significance >= SIGNIFICANCE
