"""Trained models shared between tests and test sessions, cached on disk by what made them.

Training is most of the suite's time (The Payne ~2 min, APOGEENet ~1.5 min, the FERRE grid and
The Cannon ~0.5 min each on one core). A model is a deterministic function of its training
parameters and of the code that trains it, so the cache key is both: the parameters as JSON and
the content of every source file under ``astra_dagster/methods`` and ``astra_dagster/spectra``
(the methods and the generator their training sets come from). Any edit there retrains; nothing
stale is ever reused. Files live under ``$ASTRA_CACHE_DIR/test-models`` (default
``~/.cache/astra_dagster``); ``.ci/run`` points ASTRA_CACHE_DIR at a fresh folder so CI always
proves the from-scratch path.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import astra_dagster
from astra_dagster.spectra.realdata import cache_dir

M = TypeVar("M")

_PACKAGE = Path(astra_dagster.__file__).resolve().parent
_CODE = ("methods", "spectra")


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the training code's source files (path and content, in a fixed order)."""
    h = hashlib.sha256()
    for folder in _CODE:
        for path in sorted((_PACKAGE / folder).rglob("*.py")):
            h.update(str(path.relative_to(_PACKAGE)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(name: str, params: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(json.dumps(params, sort_keys=True, default=repr).encode())
    h.update(code_fingerprint().encode())
    return h.hexdigest()[:20]


def cached_model(name: str, params: Mapping[str, Any], train: Callable[..., M],
                 read: Callable[[Path], M]) -> M:
    """``train(**params)``, or the model an identical call already wrote to the cache.

    The model must have ``write(path) -> Path`` (all four label methods' models do: an atomic
    ``.npz`` write at exactly that path). Older entries under the same name are removed.
    """
    folder = cache_dir() / "test-models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{cache_key(name, params)}.npz"
    if path.is_file():
        return read(path)
    model = train(**params)
    model.write(path)  # type: ignore[attr-defined]
    for stale in folder.glob(f"{name}-*.npz"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return model


# ---- the CI models (conftest has one session fixture each)

#: The Payne's CI model is the default training; APOGEENet's and FERRE's are CI-size.
PAYNE_TRAINING: dict = {}
APOGEENET_TRAINING = {"seed": 3, "n_train": 2400, "epochs": 20}
FERRE_TRAINING = {"seed": 3, "n_validation": 16, "teff_min": 3750.0, "teff_max": 6000.0, "logg_min": 1.0,
                  "logg_max": 5.0, "metals_min": -1.25, "metals_max": 0.5}
CANNON_TRAINING = {"n": 600, "seed": 101}


def train_cannon(n: int, seed: int) -> Any:
    """The Cannon's CI model: the survey regions trained on ``n`` generator stars."""
    from astra_dagster.methods.thecannon import SURVEY_REGIONS, CannonModel
    from astra_dagster.spectra.labelled_sets import LABELS, training_set

    train = training_set(n, seed=seed)
    return CannonModel(LABELS, regions=SURVEY_REGIONS).train(train.flux, train.ivar, train.labels)
