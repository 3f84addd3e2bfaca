"""One source's radial velocities (the ``doppler`` asset's per-source work) and the template set
file it reads: Doppler's science on the source's apVisit files, shaped as an ``astra.doppler`` row."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from astra_dagster.lineage.items import TaskItem
from astra_dagster.tasks import resolved

if TYPE_CHECKING:
    from astra_dagster.methods.doppler import Emulator

#: What a worker needs imported before its first source (the function imports them lazily).
PRELOAD = ("astra_dagster.methods.doppler", "astra_dagster.spectra.apogee")


class TemplateSet:
    """The template families Doppler fits with, written as one folder of emulator files."""

    def __init__(self, emulators: list[Emulator]):
        if not emulators:
            raise ValueError("a template set needs at least one emulator")
        self.emulators = emulators

    def write(self, path: str | os.PathLike[str]) -> None:
        folder = Path(path)
        folder.mkdir(parents=True)
        for i, emulator in enumerate(self.emulators):
            emulator.save(folder / f"{i:02d}_{emulator.name}.npz")

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> TemplateSet:
        from astra_dagster.methods.doppler import Emulator

        return cls([Emulator.load(p) for p in sorted(Path(path).glob("*.npz"))])


@dataclass(frozen=True)
class RVOptions:
    """The task parameters the per-source fit reads (a plain copy of the asset's Config, so that
    a worker unpickles it without Dagster)."""

    vrange: float
    templates: str


def _nan(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def estimate(options: Any, item: TaskItem, templates: list[Emulator], synthetic: dict[int, bool]) -> dict[str, Any]:
    """The ``astra.doppler`` row of one source: an element per apVisit (by MJD) and the joint fit.

    ``options``: anything with ``vrange`` and ``templates`` (:class:`RVOptions`, or the Config)."""
    from astra_dagster.methods.doppler import fit_star, select_templates
    from astra_dagster.spectra.apogee import read_apvisit

    visits = [row for row in item.payload["rows"] if row["file_format"] == "apVisit"]
    if not visits:
        raise ValueError(f"{item.source_id}: no apVisit spectra to measure")
    visits.sort(key=lambda row: (row["mjd"] or 0, row["path"]))
    # A source's spectra come from its newest release (the spectra asset), so one release.
    release_pk = visits[0].get("release_pk")
    chosen = select_templates(templates, options.templates, synthetic.get(release_pk), f"{item.source_id}: ")
    star = fit_star([read_apvisit(row["path"]) for row in visits], chosen, vrange=options.vrange)
    columns = ("vhelio", "vrel", "u_vrel", "teff", "u_teff", "logg", "u_logg", "fe_h", "u_fe_h", "chisq", "bc")
    result: dict[str, Any] = {c: [_nan(getattr(v, c)) for v in star.visits] for c in columns}
    result["bitmask_flag"] = [int(v.flags) for v in star.visits]
    result["mjd"] = [row["mjd"] for row in visits]
    result["vhelio_star"] = _nan(star.vhelio)
    result["u_vhelio_star"] = _nan(star.u_vhelio)
    result["vscatter"] = _nan(star.vscatter)
    return result


def visits(item: TaskItem) -> float:
    """A source's relative cost: its number of apVisit spectra (one fit each)."""
    return float(sum(1 for row in item.payload["rows"] if row["file_format"] == "apVisit"))


def worker_state(options: RVOptions, path: str, synthetic: dict[int, bool]) -> tuple:
    """A worker's state: the template set read once from its file."""
    return options, TemplateSet.read(path).emulators, synthetic


def estimate_source(state: tuple, item: TaskItem) -> dict[str, Any]:
    """:func:`estimate` with a worker's (or the step's own) state."""
    options, templates, synthetic = state
    return estimate(options, item, resolved(templates), synthetic)
