"""Radial velocities: the Doppler template set (a model asset) and the per-source ``doppler`` asset."""

# No "from __future__ import annotations" here: Dagster reads Config annotations at runtime.
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import dagster as dg
import numpy as np
from pydantic import Field

from astra_dagster.db.connection import connect
from astra_dagster.defs.partitions import RANGE_POLICY, SOURCE_BLOCKS, partition_range
from astra_dagster.lineage.batch import TaskBatch, TaskItem, Work, run_tasks
from astra_dagster.lineage.config import AstraConfig, SourceTaskConfig
from astra_dagster.lineage.io_manager import RESULT_TABLE_KEY
from astra_dagster.lineage.model_io import LoadedModel
from astra_dagster.releases.register import synthetic_releases

# Doppler (scipy) and the FITS readers (astropy) are imported inside the functions that use
# them: loading the code location, a memoised run and `astra task show` need neither.
if TYPE_CHECKING:
    from astra_dagster.methods.doppler import Emulator
    from astra_dagster.methods.progress import Progress


class TemplateSet:
    """The template families Doppler fits with, written as one folder of emulator files."""

    def __init__(self, emulators: "list[Emulator]"):
        if not emulators:
            raise ValueError("a template set needs at least one emulator")
        self.emulators = emulators

    def write(self, path: str | os.PathLike[str]) -> None:
        folder = Path(path)
        folder.mkdir(parents=True)
        for i, emulator in enumerate(self.emulators):
            emulator.save(folder / f"{i:02d}_{emulator.name}.npz")

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "TemplateSet":
        from astra_dagster.methods.doppler import Emulator

        return cls([Emulator.load(p) for p in sorted(Path(path).glob("*.npz"))])


class DopplerTemplates(AstraConfig):
    """Which template families the RV fits use, and how the generator-trained ones are trained."""

    task_family: ClassVar[str] = "Doppler.TrainTemplates"

    # "auto" by default: one template set serves synthetic and real releases alike; the doppler
    # asset picks the families for each source's release (EstimateRadialVelocity.templates).
    kind: str = Field(
        default="auto",
        description="'auto' (both families: the generator-trained ones and Doppler's Synspec grids, "
        "when the thedoppler wheel can be fetched; the doppler asset uses the generator ones for "
        "synthetic releases and Synspec for real ones), 'generator' (synthetic releases only) or "
        "'synspec' (real data only).",
    )
    n_train: int = Field(default=3000, description="Training stars for the cool-star families.")
    n_hot: int = Field(default=400, description="Training stars for the hot-star family.")
    seed: int = Field(default=271828, description="Seed of the independent training grid.")


def _templates(config: DopplerTemplates, progress: "Progress | None" = None) -> dict[str, Any]:
    from astra_dagster.methods.doppler import load_templates, train_generator_emulators

    generator = None
    if config.kind in ("generator", "auto"):
        generator = train_generator_emulators(config.n_train, config.n_hot, config.seed, progress=progress)
    emulators = load_templates(config.kind, generator=generator)
    return {"model": TemplateSet(emulators), "families": [e.name for e in emulators]}


@dg.asset(
    group_name="radial_velocity",
    io_manager_key="astra_model_io_manager",
    kinds={"python", "numpy"},
    metadata={RESULT_TABLE_KEY: "model", "astra/task_family": DopplerTemplates.task_family},
)
def doppler_templates(context: dg.AssetExecutionContext, config: DopplerTemplates) -> TaskBatch:
    """Cannon-style emulators of normalised flux vs (Teff, logg, [Fe/H]) used as RV templates."""
    from astra_dagster.spectra import synth

    return run_tasks(context, config, [TaskItem(params={"generator_version": synth.GENERATOR_VERSION})],
                     lambda _: _templates(config, context.log.info), table="model", batch=False)


class EstimateRadialVelocity(SourceTaskConfig):
    """Doppler-style RVs of every visit of a source, with a joint fit over its visits."""

    task_family: ClassVar[str] = "Doppler.EstimateRadialVelocity"

    vrange: float = Field(default=1000.0, description="Cross-correlation search range, ±km/s.")
    templates: str = Field(
        default="release",
        description="Template families per source: 'release' (generator-trained for synthetic "
        "releases, Synspec for real ones, by the release's manifest), 'all' (every family of the "
        "template set; the cross-correlation picks per spectrum), 'generator' or 'synspec'.",
    )


def _nan(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def estimate(config: EstimateRadialVelocity, item: TaskItem, templates: "list[Emulator]",
             synthetic: dict[int, bool]) -> dict[str, Any]:
    from astra_dagster.methods.doppler import fit_star, select_templates
    from astra_dagster.spectra.apogee import read_apvisit

    visits = [row for row in item.payload["rows"] if row["file_format"] == "apVisit"]
    if not visits:
        raise ValueError(f"{item.source_id}: no apVisit spectra to measure")
    visits.sort(key=lambda row: (row["mjd"] or 0, row["path"]))
    # A source's spectra come from its newest release (the spectra asset), so one release.
    release_pk = visits[0].get("release_pk")
    chosen = select_templates(templates, config.templates, synthetic.get(release_pk), f"{item.source_id}: ")
    star = fit_star([read_apvisit(row["path"]) for row in visits], chosen, vrange=config.vrange)
    columns = ("vhelio", "vrel", "u_vrel", "teff", "u_teff", "logg", "u_logg", "fe_h", "u_fe_h", "chisq", "bc")
    result: dict[str, Any] = {c: [_nan(getattr(v, c)) for v in star.visits] for c in columns}
    result["bitmask_flag"] = [int(v.flags) for v in star.visits]
    result["mjd"] = [row["mjd"] for row in visits]
    result["vhelio_star"] = _nan(star.vhelio)
    result["u_vhelio_star"] = _nan(star.u_vhelio)
    result["vscatter"] = _nan(star.vscatter)
    return result


@dg.asset(
    partitions_def=SOURCE_BLOCKS,
    backfill_policy=RANGE_POLICY,
    group_name="radial_velocity",
    io_manager_key="astra_io_manager",
    kinds={"python", "postgres"},
    metadata={RESULT_TABLE_KEY: "doppler", "astra/task_family": EstimateRadialVelocity.task_family},
)
def doppler(
    context: dg.AssetExecutionContext,
    config: EstimateRadialVelocity,
    spectra: dict,
    doppler_templates: LoadedModel,
) -> TaskBatch:
    """One ``astra.doppler`` row per source: an element per apVisit (by MJD), plus the star's
    joint-fit velocity and visit scatter."""
    _, first_last = partition_range(context)
    release_pks = {row.get("release_pk") for entry in spectra.values() for row in entry["rows"]}
    with connect() as conn:
        synthetic = synthetic_releases(conn, [pk for pk in release_pks if pk is not None])
    items = [
        TaskItem(payload=entry, source_pk=pk, source_id=entry["source_id"],
                 params={"input_task_id": entry["task_id"], "templates_task_id": doppler_templates.task_id})
        for pk, entry in sorted(spectra.items())
    ]
    # Worker processes read the template set once each from its file (not once per source).
    # The template set (read on first use, with Doppler's scipy) goes in the state: a memoised
    # run never reads it.
    work = Work(_estimate, state=(config, doppler_templates, synthetic), setup=_worker_state,
                setup_args=(config, str(doppler_templates.path), synthetic))
    return run_tasks(context, config, items, work, table="doppler", batch=True, partition_range=first_last)


def _worker_state(config: EstimateRadialVelocity, path: str, synthetic: dict[int, bool]) -> tuple:
    return config, TemplateSet.read(path).emulators, synthetic


def _estimate(state: tuple, item: TaskItem) -> dict[str, Any]:
    config, templates, synthetic = state
    if isinstance(templates, LoadedModel):  # the step's own process: read when first needed
        templates = templates.model.emulators
    return estimate(config, item, templates, synthetic)
