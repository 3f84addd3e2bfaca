"""APOGEENet's model-mismatch screen (issue #11; :mod:`astra_dagster.methods.mismatch`).

The network has no χ² of its own, and refitting the generator per star costs 1-2 s, far beyond
the 5 ms inference budget. This screen costs microseconds: at training the network's own
pre-processed input (log flux, 4x binned), high-passed by subtracting a running mean per chip,
is reduced to its mean and first :data:`N_COMPONENTS` principal components, the line-depth
profiles the training set can hold (the generator puts its lines at fixed wavelengths). At
inference the star's high-passed input minus its projection on them, over the per-bin noise
(σ² + :data:`MODEL_FLOOR`²), gives a reduced χ², ``line_chi2``: ~1 for any generator star,
hundreds for a real star, whose lines sit elsewhere. Above :data:`LINE_MISMATCH_CHI2` the star
gets ``POOR_MODEL_MATCH`` and NaN labels.

Separation measured in :data:`LINE_MISMATCH_CHI2`; cost ~0.4 ms per spectrum on a loaded core
(bench/apogeenet_screen.py), plus the input σ (0.25 ms) that the MC draws compute anyway.
A real star at low S/N can pass: its noise then hides the mismatch (σ grows, χ² falls).
"""

from __future__ import annotations

import numpy as np

from astra_dagster.methods.apogeenet.preprocess import CHIP_PIXELS, CROP

#: Principal line profiles kept (60 x 2048 float32 = 0.5 MB in the model file). 30 left
#: generator dwarfs at S/N 300 with χ² up to 24 without the floor, 60 halved that (measured).
N_COMPONENTS = 60
#: Running-mean width in apStar pixels of the high-pass (51 bins at 4x binning): wide enough to
#: keep lines, narrow enough to take out the continuum and throughput shape.
HIGHPASS_PIXELS = 204
#: Model error (log flux per bin) added to the noise in quadrature: the principal profiles leave
#: ~0.006 rms of a generator star at S/N 300 unexplained; without a floor its χ² would grow as S/N².
MODEL_FLOOR = 0.005
#: Most training spectra used for the components (an SVD of 12000 x 2048 is needlessly slow).
MAX_REFERENCE_SPECTRA = 3000
#: ``line_chi2`` above which the star is not one the training set could hold. Measured
#: (bench/apogeenet_screen.py, reference from 600 training spectra; 2400 give the same to 2 %):
#: the two real DR17 apStar stars 366 (giant 2M17335483, S/N 154) / 66.6 (dwarf 2M19485057,
#: S/N 137); generator release stars, 40 per population and S/N 10-1000, at most 2.3 (giants),
#: 1.8 (dwarfs), 1.0 (hot), 4.1 (YSOs), none flagged: 5x margin above, 3.3x below.
LINE_MISMATCH_CHI2 = 20.0


def chip_bins(n_bins: int, bin_factor: int) -> np.ndarray:
    """Mask (n_bins,) of the input bins fully on a chip (edge bins and gap fill left out)."""
    a = CROP[0]
    mask = np.zeros(n_bins, dtype=bool)
    for lo, hi in CHIP_PIXELS:
        mask[(lo - a + bin_factor - 1) // bin_factor + 1: min((hi - a) // bin_factor, n_bins)] = True
    return mask


def highpass(x: np.ndarray, bin_factor: int) -> np.ndarray:
    """Rows of the network input minus their running mean (:data:`HIGHPASS_PIXELS`) within each
    chip, 0 off the chips; float32, vectorised over rows (one cumulative sum per chip)."""
    x = np.asarray(x, dtype=np.float32)
    w = max(3, HIGHPASS_PIXELS // bin_factor) | 1
    out = np.zeros_like(x)
    mask = chip_bins(x.shape[1], bin_factor)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    for lo, hi in zip(edges[::2], edges[1::2], strict=True):
        seg = np.pad(x[:, lo:hi], ((0, 0), (w // 2 + 1, w // 2)), mode="edge")
        c = np.cumsum(seg, axis=1, dtype=np.float64)
        out[:, lo:hi] = x[:, lo:hi] - ((c[:, w:] - c[:, :-w]) / w).astype(np.float32)
    return out


def fit_reference(x: np.ndarray, bin_factor: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mean (n_bins,), basis (n_bins, k)) of the high-passed training inputs ``x``, k ≤
    :data:`N_COMPONENTS`, float32, from at most :data:`MAX_REFERENCE_SPECTRA` rows."""
    if x.shape[0] > MAX_REFERENCE_SPECTRA:
        x = x[np.sort(rng.choice(x.shape[0], MAX_REFERENCE_SPECTRA, replace=False))]
    r = highpass(x, bin_factor).astype(np.float64)
    mean = r.mean(axis=0)
    _, _, vt = np.linalg.svd(r - mean, full_matrices=False)
    return mean.astype(np.float32), np.ascontiguousarray(vt[:N_COMPONENTS].T, dtype=np.float32)


def line_chi2(x: np.ndarray, sigma: np.ndarray, mean: np.ndarray, basis: np.ndarray, bin_factor: int) -> np.ndarray:
    """Reduced χ² (n,) of the network inputs ``x`` (pre-processed, not centred) outside the
    reference line profiles, with per-bin σ ``sigma`` (:func:`input_sigma`; bins with σ = 0, the
    interpolated ones, are left out) plus :data:`MODEL_FLOOR`. NaN for a row without bins."""
    r = highpass(x, bin_factor) - mean
    res = r - (r @ basis) @ basis.T
    use = chip_bins(x.shape[1], bin_factor)[None, :] & (sigma > 0)
    var = sigma.astype(np.float32) ** 2 + np.float32(MODEL_FLOOR) ** 2
    n = use.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(use, res * res / var, 0.0).sum(axis=1) / np.where(n > 0, n, np.nan)
