"""Cannon-style spectral emulators: normalised flux as a polynomial in (Teff, logg, [Fe/H]).

An :class:`Emulator` predicts continuum-normalised flux on a log-uniform, vacuum, rest-frame
wavelength grid as ``theta @ v(labels)``, where ``v`` is a polynomial label vector built from
scaled labels ``(label - fiducial) / scale``. Evaluation and its analytic Jacobian are one small
matrix product, which is what makes a Doppler-style fit cheap.

Two template sources:

* :func:`load_synspec_emulators` — the Synspec/Kurucz Cannon models shipped in the
  ``thedoppler`` wheel (Doppler's default templates), read with a numpy-only unpickler,
  converted from air to vacuum wavelengths, convolved to APOGEE resolution and cut to the
  APOGEE range with room for ±1000 km/s shifts. The converted arrays are cached as ``.npz``.
* :func:`~astra_dagster.methods.doppler.templates.train_generator_emulator` — a cubic Cannon
  trained on an independent grid from the project's synthetic generator
  (:mod:`astra_dagster.spectra.synth`); use it for synthetic releases, whose line list is the
  generator's.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter1d

from astra_dagster.spectra.spectrum import APSTAR_CDELT1, APSTAR_CRVAL1, C_KMS

LABEL_NAMES: tuple[str, str, str] = ("teff", "logg", "fe_h")

#: Template grid: log10 step of 2e-6 (1.38 km/s), a third of the apStar step, with the grid
#: phase tied to the apStar grid so that apStar pixels fall exactly on every third template
#: pixel. 14950-17150 Å covers APOGEE (15100-17000 Å) shifted by ±1000 km/s plus kernel margin.
TEMPLATE_LOG10_STEP = APSTAR_CDELT1 / 3.0
TEMPLATE_LAMBDA_MIN = 14950.0
TEMPLATE_LAMBDA_MAX = 17150.0

#: APOGEE resolving power used when convolving unconvolved templates.
APOGEE_RESOLUTION = 22500.0

#: Doppler's coarse cross-correlation grid: (Teff, logg) pairs at [Fe/H] = -0.5.
COARSE_TEFF_LOGG: tuple[tuple[float, float], ...] = (
    (3500.0, 4.8), (4000.0, 4.8), (5000.0, 4.6), (6000.0, 4.4), (7500.0, 4.0), (15000.0, 4.0),
    (25000.0, 4.0), (40000.0, 4.0), (3500.0, 0.5), (4300.0, 1.0), (4700.0, 2.0), (5200.0, 3.0),
)
COARSE_FE_H = -0.5

SYNSPEC_FAMILIES: tuple[str, str] = ("coolstars", "hotdwarfs")
_SYNSPEC_MEMBER = "doppler/data/cannongrid_3000_18000_{family}_norm_cubic_model.pkl"
#: Bump when the conversion changes so stale caches are not reused.
_SYNSPEC_CACHE_VERSION = 1


class EmulatorError(RuntimeError):
    """An emulator could not be built or loaded (bad file, bad training set)."""


def template_log10_grid(
    lambda_min: float = TEMPLATE_LAMBDA_MIN, lambda_max: float = TEMPLATE_LAMBDA_MAX,
    step: float = TEMPLATE_LOG10_STEP,
) -> tuple[float, int]:
    """Start (log10 Å) and length of a log-uniform grid phased with the apStar grid."""
    k0 = int(np.floor((np.log10(lambda_min) - APSTAR_CRVAL1) / step))
    start = APSTAR_CRVAL1 + k0 * step
    n = int(np.ceil((np.log10(lambda_max) - start) / step)) + 1
    return start, n


def air_to_vacuum(wavelength_air: np.ndarray) -> np.ndarray:
    """Air → vacuum wavelengths (Å) with the IAU standard refractive index (Morton 2000 form)."""
    lam = np.asarray(wavelength_air, dtype=float)
    s2 = (1e4 / lam) ** 2
    n = 1.0 + 8.336624212083e-5 + 2.408926869968e-2 / (130.1065924522 - s2) \
        + 1.599740894897e-4 / (38.92568793293 - s2)
    return lam * n


def vacuum_to_air(wavelength_vac: np.ndarray) -> np.ndarray:
    """Vacuum → air wavelengths (Å): the inverse of :func:`air_to_vacuum` by fixed-point iteration."""
    vac = np.asarray(wavelength_vac, dtype=float)
    air = vac / 1.00027
    for _ in range(4):
        air = air * vac / air_to_vacuum(air)
    return air


@dataclass
class Emulator:
    """Normalised flux on a log-uniform vacuum grid as a polynomial in scaled labels.

    ``flux = theta @ v`` with ``v_j = prod_k s_k ** exponents[j, k]`` and
    ``s = (labels - fiducials) / scales``; labels are ordered as :data:`LABEL_NAMES`.
    ``s2`` is the per-pixel model variance (intrinsic scatter), or None when unknown.
    """

    name: str
    log10_start: float
    log10_step: float
    theta: np.ndarray
    exponents: np.ndarray
    fiducials: np.ndarray
    scales: np.ndarray
    ranges: np.ndarray
    s2: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.theta = np.ascontiguousarray(self.theta, dtype=float)
        self.exponents = np.asarray(self.exponents, dtype=np.int64)
        self.fiducials = np.asarray(self.fiducials, dtype=float)
        self.scales = np.asarray(self.scales, dtype=float)
        self.ranges = np.asarray(self.ranges, dtype=float)
        n_pix, n_terms = self.theta.shape
        if self.exponents.shape != (n_terms, len(LABEL_NAMES)):
            raise EmulatorError(
                f"emulator {self.name!r}: exponents shape {self.exponents.shape} does not match "
                f"{n_terms} terms x {len(LABEL_NAMES)} labels"
            )
        if self.ranges.shape != (len(LABEL_NAMES), 2) or np.any(self.scales <= 0):
            raise EmulatorError(f"emulator {self.name!r}: bad label ranges or scales")
        if self.s2 is not None:
            self.s2 = np.asarray(self.s2, dtype=float)
            if self.s2.shape != (n_pix,):
                raise EmulatorError(f"emulator {self.name!r}: s2 shape {self.s2.shape} != ({n_pix},)")
        self._coarse_cache: dict[Any, Any] = {}

    # -- grid ---------------------------------------------------------------------------------
    @property
    def n_pixels(self) -> int:
        return int(self.theta.shape[0])

    @property
    def log10_wavelength(self) -> np.ndarray:
        return self.log10_start + self.log10_step * np.arange(self.n_pixels)

    @property
    def wavelength(self) -> np.ndarray:
        """Vacuum rest-frame wavelengths (Å) of the emulator pixels, log-uniform."""
        return 10.0 ** self.log10_wavelength

    @property
    def ln_start(self) -> float:
        return float(self.log10_start * np.log(10.0))

    @property
    def ln_step(self) -> float:
        return float(self.log10_step * np.log(10.0))

    @property
    def velocity_step(self) -> float:
        """Pixel size in km/s."""
        return float(C_KMS * self.ln_step)

    # -- labels -------------------------------------------------------------------------------
    def label_ranges(self) -> dict[str, tuple[float, float]]:
        """The training range of each label, e.g. ``{"teff": (3500.0, 8000.0), ...}``."""
        return {n: (float(lo), float(hi)) for n, (lo, hi) in zip(LABEL_NAMES, self.ranges, strict=True)}

    def clip(self, labels: Sequence[float]) -> np.ndarray:
        """Labels clipped to the training range."""
        return np.clip(np.asarray(labels, dtype=float), self.ranges[:, 0], self.ranges[:, 1])

    def in_range(self, labels: Sequence[float]) -> bool:
        lab = np.asarray(labels, dtype=float)
        return bool(np.all((lab >= self.ranges[:, 0]) & (lab <= self.ranges[:, 1])))

    def label_vector(self, labels: np.ndarray) -> np.ndarray:
        """Polynomial label vectors, shape (n_terms,) for one star or (n, n_terms) for many."""
        lab = np.asarray(labels, dtype=float)
        s = (lab - self.fiducials) / self.scales
        # s[..., None, :] ** exponents: (..., n_terms, 3) then product over labels.
        return np.prod(s[..., None, :] ** self.exponents, axis=-1)

    def label_vector_and_derivatives(self, labels: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Label vector (n_terms,) and its derivative with respect to the labels (n_terms, 3)."""
        s = (np.asarray(labels, dtype=float) - self.fiducials) / self.scales
        powers = s[None, :] ** self.exponents  # (n_terms, 3)
        v = np.prod(powers, axis=1)
        dv = np.empty((v.size, s.size))
        for k in range(s.size):
            e = self.exponents[:, k]
            others = np.prod(np.delete(powers, k, axis=1), axis=1)
            # d(s^e)/ds = e s^(e-1); e = 0 gives 0 whatever s is.
            dpow = np.where(e > 0, e * s[k] ** np.maximum(e - 1, 0), 0.0)
            dv[:, k] = dpow * others / self.scales[k]
        return v, dv

    # -- evaluation ---------------------------------------------------------------------------
    def flux(self, labels: Sequence[float] | np.ndarray, pixels: slice | None = None) -> np.ndarray:
        """Normalised model flux for one label triple (n_pix,) or many (n, n_pix)."""
        theta = self.theta if pixels is None else self.theta[pixels]
        return self.label_vector(np.asarray(labels, dtype=float)) @ theta.T

    def flux_and_jacobian(
        self, labels: Sequence[float], pixels: slice | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flux (n_pix,) and its analytic derivative with respect to the labels (n_pix, 3)."""
        theta = self.theta if pixels is None else self.theta[pixels]
        v, dv = self.label_vector_and_derivatives(labels)
        out = theta @ np.column_stack([v, dv])
        return out[:, 0], out[:, 1:]

    def rotation_kernel(self, vsini: float, epsilon: float = 0.6) -> np.ndarray:
        """Rotational broadening profile (limb darkening ``epsilon``) sampled on this grid,
        each pixel the average of the profile over its width, normalised to unit sum."""
        dv = self.velocity_step
        half = int(np.ceil(vsini / dv)) + 1
        sub = 16  # sub-samples per pixel: the profile is resolved even for vsini ~ 1 pixel
        x = (np.arange(-half * sub, (half + 1) * sub) + 0.5) / sub - 0.5  # pixel units
        xi = np.clip(x * dv / vsini, -1.0, 1.0)
        prof = 2 * (1 - epsilon) * np.sqrt(1 - xi**2) + 0.5 * np.pi * epsilon * (1 - xi**2)
        kernel = prof.reshape(2 * half + 1, sub).mean(axis=1)
        return kernel / kernel.sum()

    def coarse_labels(self) -> np.ndarray:
        """Doppler's coarse CCF grid points that this emulator covers (clipped, de-duplicated)."""
        points = []
        for teff, logg in COARSE_TEFF_LOGG:
            lab = np.array([teff, logg, COARSE_FE_H])
            lo, hi = self.ranges[:, 0], self.ranges[:, 1]
            # A point more than 2 % outside the Teff range belongs to another family (clipping
            # it would put a template on the range edge, where fits get stuck).
            if teff < 0.98 * lo[0] or teff > 1.02 * hi[0]:
                continue
            points.append(np.clip(lab, lo, hi))
        if not points:
            mid = self.ranges.mean(axis=1)
            points.append(mid)
        return np.unique(np.round(np.array(points), 6), axis=0)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the emulator to an ``.npz`` file (atomic rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.part.npz")
        arrays = dict(
            theta=self.theta, exponents=self.exponents, fiducials=self.fiducials,
            scales=self.scales, ranges=self.ranges,
            grid=np.array([self.log10_start, self.log10_step]),
            header=np.array(json.dumps({"name": self.name, "meta": self.meta})),
        )
        if self.s2 is not None:
            arrays["s2"] = self.s2
        np.savez(partial, **arrays)
        partial.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Emulator:
        """Read an emulator written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                return cls(
                    name=header["name"], log10_start=float(data["grid"][0]),
                    log10_step=float(data["grid"][1]), theta=data["theta"],
                    exponents=data["exponents"], fiducials=data["fiducials"],
                    scales=data["scales"], ranges=data["ranges"],
                    s2=data["s2"] if "s2" in data.files else None, meta=header["meta"],
                )
        except (OSError, KeyError, ValueError) as exc:
            raise EmulatorError(f"cannot read emulator file {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Doppler's Synspec Cannon models
# ---------------------------------------------------------------------------------------------

#: The only globals a shipped model pickle may reference (dicts, lists, numpy arrays).
_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Protocol-2 pickles written by Python 3 store array bytes through codecs.encode (a pure
    # str → bytes conversion).
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only plain numpy array machinery (no code can be run)."""

    def find_class(self, module: str, name: str) -> Any:
        # Pickles written with numpy 1.x name numpy.core, which numpy 2 moved to numpy._core.
        if module == "numpy.core" or module.startswith("numpy.core."):
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a model pickle")
        return super().find_class(module, name)


def read_cannon_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a Cannon model pickle (dicts + numpy arrays only) without executing any code."""
    try:
        with open(path, "rb") as fh:
            data = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise EmulatorError(f"cannot read Cannon model {path}: {exc}") from exc
    if not isinstance(data, dict) or "theta" not in data or "vectorizer" not in data:
        raise EmulatorError(f"{path} is not a Cannon model pickle (no theta/vectorizer)")
    return data


def _exponents_from_terms(terms: Sequence[Sequence[tuple[int, float]]], n_labels: int) -> np.ndarray:
    """Exponent matrix (1 + n_terms, n_labels) from a PolynomialVectorizer term list."""
    rows = [np.zeros(n_labels, dtype=np.int64)]  # the constant term comes first
    for term in terms:
        row = np.zeros(n_labels, dtype=np.int64)
        for index, power in term:
            row[int(index)] += round(float(power))
        rows.append(row)
    return np.array(rows)


def convert_cannon_model(
    data: dict[str, Any], name: str, *, resolution: float = APOGEE_RESOLUTION,
    lambda_min: float = TEMPLATE_LAMBDA_MIN, lambda_max: float = TEMPLATE_LAMBDA_MAX,
) -> Emulator:
    """Turn a Cannon model dict (air, linear λ, unconvolved) into an APOGEE-ready emulator.

    Steps: air → vacuum; linear interpolation of every theta column onto a fine log grid;
    Gaussian convolution at constant resolving power (a constant width in log λ); sampling on
    the template grid. Convolution commutes with ``theta @ v``, so convolving theta convolves
    the flux for every label triple.
    """
    theta = np.asarray(data["theta"], dtype=float)
    disp = np.asarray(data["dispersion"], dtype=float)
    if theta.ndim != 2 or disp.shape != (theta.shape[0],):
        raise EmulatorError(f"Cannon model {name}: theta {theta.shape} and dispersion {disp.shape} disagree")
    wavevac = bool(data.get("wavevac", False))
    vac = disp if wavevac else air_to_vacuum(disp)

    start, n = template_log10_grid(lambda_min, lambda_max)
    step = TEMPLATE_LOG10_STEP
    if vac[0] > 10 ** start or vac[-1] < 10 ** (start + step * (n - 1)):
        raise EmulatorError(f"Cannon model {name} does not cover {lambda_min}-{lambda_max} Å")
    # Fine grid: 4x finer than the template grid, with margin for the kernel.
    fine_factor = 4
    sigma_kms = C_KMS / resolution / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    fine_step = step / fine_factor
    sigma_px = sigma_kms / (C_KMS * fine_step * np.log(10.0))
    pad = int(np.ceil(6 * sigma_px))
    fine_log = start + fine_step * np.arange(-pad, fine_factor * (n - 1) + 1 + pad)
    lo = np.searchsorted(vac, 10 ** fine_log[0]) - 2
    hi = np.searchsorted(vac, 10 ** fine_log[-1]) + 2
    sub_log = np.log10(vac[lo:hi])
    fine = np.empty((fine_log.size, theta.shape[1]))
    for j in range(theta.shape[1]):
        fine[:, j] = np.interp(fine_log, sub_log, theta[lo:hi, j])
    fine = gaussian_filter1d(fine, sigma_px, axis=0, mode="nearest", truncate=6.0)
    out = fine[pad: pad + fine_factor * (n - 1) + 1: fine_factor]

    vec = data["vectorizer"]
    terms = vec[1]["terms"] if isinstance(vec, tuple) else vec["terms"]
    labels = np.asarray(data["training_set_labels"], dtype=float)
    exponents = _exponents_from_terms(terms, labels.shape[1])
    # The Cannon scales labels by the training-set median and the 2.5-97.5 % span.
    fiducials = np.percentile(labels, 50, axis=0)
    scales = np.ptp(np.percentile(labels, [2.5, 97.5], axis=0), axis=0)
    ranges = np.column_stack([labels.min(axis=0), labels.max(axis=0)])
    return Emulator(
        name=name, log10_start=start, log10_step=step, theta=out, exponents=exponents,
        fiducials=fiducials, scales=scales, ranges=ranges, s2=None,
        meta={"source": "synspec", "resolution": resolution, "air_to_vacuum": not wavevac},
    )


def _emulator_cache_dir() -> Path:
    from astra_dagster.spectra.realdata import cache_dir

    path = cache_dir() / "emulators"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_synspec_emulators(
    families: Sequence[str] = SYNSPEC_FAMILIES, *, resolution: float = APOGEE_RESOLUTION,
    refresh: bool = False,
) -> list[Emulator]:
    """Doppler's Synspec Cannon templates, converted for APOGEE (vacuum, R, ±1000 km/s range).

    The first call downloads ``thedoppler`` into the cache (raises
    :class:`~astra_dagster.spectra.realdata.RealDataUnavailableError` when that is impossible)
    and writes the converted arrays as ``.npz``; later calls read the ``.npz`` only.
    """
    from astra_dagster.spectra.realdata import THEDOPPLER, extract

    out = []
    for family in families:
        if family not in SYNSPEC_FAMILIES:
            raise EmulatorError(f"unknown Synspec template family {family!r}; choose from {SYNSPEC_FAMILIES}")
        cached = _emulator_cache_dir() / (
            f"synspec_{family}_R{int(resolution)}_v{_SYNSPEC_CACHE_VERSION}.npz"
        )
        if cached.exists() and not refresh:
            try:
                out.append(Emulator.load(cached))
                continue
            except EmulatorError:
                pass  # a damaged cache file is rebuilt below
        member = _SYNSPEC_MEMBER.format(family=family)
        data = read_cannon_pickle(extract(*THEDOPPLER, member))
        emulator = convert_cannon_model(data, f"synspec-{family}", resolution=resolution)
        emulator.meta["member"] = member
        emulator.save(cached)
        out.append(emulator)
    return out


# ---------------------------------------------------------------------------------------------
# Training a Cannon emulator
# ---------------------------------------------------------------------------------------------

def cubic_exponents() -> np.ndarray:
    """Exponents (20, 3) of all monomials of total degree ≤ 3 in three labels, constant first."""
    rows = []
    for degree in range(4):
        for a in range(degree, -1, -1):
            for b in range(degree - a, -1, -1):
                rows.append((a, b, degree - a - b))
    return np.array(rows, dtype=np.int64)


def train_cannon(
    flux: np.ndarray, labels: np.ndarray, *, name: str, log10_start: float, log10_step: float,
    ivar: np.ndarray | None = None, exponents: np.ndarray | None = None,
    ranges: np.ndarray | None = None, ridge: float = 1e-6, meta: dict[str, Any] | None = None,
) -> Emulator:
    """Fit a Cannon model (per-pixel polynomial in scaled labels) to a training set.

    ``flux`` is (n_stars, n_pix) continuum-normalised flux on the log grid defined by
    ``log10_start``/``log10_step``; ``labels`` is (n_stars, 3) in :data:`LABEL_NAMES` order.
    With no ``ivar`` (noise-free training) all pixels share one design matrix and the fit is a
    single least-squares solve; otherwise each pixel is solved with its own weights. ``s2`` is
    the per-pixel variance of the training residuals beyond the noise.
    """
    flux = np.asarray(flux, dtype=float)
    labels = np.asarray(labels, dtype=float)
    if flux.ndim != 2 or labels.shape != (flux.shape[0], len(LABEL_NAMES)):
        raise EmulatorError(f"training set {name}: flux {flux.shape} and labels {labels.shape} disagree")
    if not (np.all(np.isfinite(flux)) and np.all(np.isfinite(labels))):
        raise EmulatorError(f"training set {name}: non-finite flux or labels")
    exponents = cubic_exponents() if exponents is None else np.asarray(exponents)
    n_terms = exponents.shape[0]
    if flux.shape[0] < 2 * n_terms:
        raise EmulatorError(f"training set {name}: {flux.shape[0]} spectra is too few for {n_terms} terms")
    fiducials = np.percentile(labels, 50, axis=0)
    scales = np.ptp(np.percentile(labels, [2.5, 97.5], axis=0), axis=0)
    scales = np.where(scales > 0, scales, 1.0)
    s = (labels - fiducials) / scales
    design = np.prod(s[:, None, :] ** exponents, axis=-1)  # (n_stars, n_terms)
    reg = ridge * np.eye(n_terms)
    reg[0, 0] = 0.0
    if ivar is None:
        ata = design.T @ design + reg * design.shape[0]
        theta = np.linalg.solve(ata, design.T @ flux).T
        resid = flux - design @ theta.T
        s2 = np.maximum(np.mean(resid**2, axis=0) * design.shape[0] / (design.shape[0] - n_terms), 0.0)
    else:
        w = np.asarray(ivar, dtype=float)
        theta = np.empty((flux.shape[1], n_terms))
        for i in range(flux.shape[1]):
            a = design * w[:, i : i + 1]
            theta[i] = np.linalg.solve(design.T @ a + reg * design.shape[0], a.T @ flux[:, i])
        resid = flux - design @ theta.T
        with np.errstate(divide="ignore"):
            noise = np.where(w > 0, 1.0 / w, 0.0)
        s2 = np.maximum(np.mean(resid**2 - noise, axis=0), 0.0)
    if ranges is None:
        ranges = np.column_stack([labels.min(axis=0), labels.max(axis=0)])
    return Emulator(
        name=name, log10_start=log10_start, log10_step=log10_step, theta=theta,
        exponents=exponents, fiducials=fiducials, scales=scales, ranges=np.asarray(ranges),
        s2=s2, meta=dict(meta or {}),
    )
