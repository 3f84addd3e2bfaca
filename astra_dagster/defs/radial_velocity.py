"""Radial velocities: the Doppler template set (a model asset) and the per-source ``doppler`` asset."""

# No "from __future__ import annotations" here: Dagster reads Config annotations at runtime.
from typing import TYPE_CHECKING, Any, ClassVar

import dagster as dg
from pydantic import Field

from astra_dagster.db.connection import connect
from astra_dagster.defs.partitions import RANGE_POLICY, SOURCE_BLOCKS, partition_range
from astra_dagster.lineage.batch import TaskBatch, TaskItem, Work, run_tasks
from astra_dagster.lineage.config import AstraConfig, SourceTaskConfig
from astra_dagster.lineage.io_manager import RESULT_TABLE_KEY
from astra_dagster.lineage.model_io import LoadedModel
from astra_dagster.releases.register import synthetic_releases

# The per-source work and the template set's file format live where a worker process can import
# them without Dagster; TemplateSet is also named here, as stored models record its class path.
from astra_dagster.tasks import ReadOnFirstUse
from astra_dagster.tasks.doppler import PRELOAD, RVOptions, TemplateSet, estimate_source, visits, worker_state

# Doppler (scipy) and the FITS readers (astropy) are imported inside the functions that use
# them: loading the code location, a memoised run and `astra task show` need neither.
if TYPE_CHECKING:
    from astra_dagster.methods.progress import Progress


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
    options = RVOptions(vrange=config.vrange, templates=config.templates)
    templates = ReadOnFirstUse(lambda: doppler_templates.model.emulators)
    work = Work(estimate_source, state=(options, templates, synthetic),
                setup=worker_state, setup_args=(options, str(doppler_templates.path), synthetic),
                preload=PRELOAD, cost=visits)
    return run_tasks(context, config, items, work, table="doppler", batch=True, partition_range=first_last)
