"""Stellar labels: trained models as assets (The Cannon, The Payne, the FERRE grid, APOGEENet)
and the per-source label assets that read them.

Every label method has the same shape, so one pair of factories builds the assets:

* a **model asset** (unpartitioned, ``astra_model_io_manager``): its Config selects the training
  set and settings; the IO manager writes the model file under ``ASTRA_HOME`` and the task row;
* a **label asset** partitioned like ``spectra``: one task per source, whose parameters include
  the model's ``task_id`` (retraining makes new tasks) and the ``spectra`` task's (new files make
  new tasks). It fits the first combined row of every apStar file of the source and writes one
  row of arrays to the method's table, one element per apStar stack (ordered by telescope).

The science lives in ``astra_dagster.methods.<module>``: ``train_model(**options, progress=...)``
(``progress`` gets the training's progress lines; the model assets pass ``context.log.info``) and
``fit_spectra(model, spectra)`` returning one dict of table columns per spectrum.
"""

# No "from __future__ import annotations" here: Dagster reads Config annotations at runtime.
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import dagster as dg
from pydantic import Field

from astra_dagster.defs.partitions import RANGE_POLICY, SOURCE_BLOCKS, partition_range
from astra_dagster.lineage.batch import TaskBatch, TaskItem, Work, run_tasks
from astra_dagster.lineage.config import AstraConfig, SourceTaskConfig
from astra_dagster.lineage.io_manager import RESULT_TABLE_KEY
from astra_dagster.lineage.model_io import LoadedModel
from astra_dagster.tasks import ReadOnFirstUse

# The per-source work lives where a worker process imports it without Dagster.
from astra_dagster.tasks.labels import fit_many, fit_one, preload, worker_state

# The FITS readers (astropy) and the methods are imported where used: loading the code
# location and a memoised run need neither.
if TYPE_CHECKING:
    pass

GROUP = "stellar_labels"
#: Sources fitted together in one call of the method (progress is logged per chunk).
CHUNK_SIZE = 32


def _method(module: str) -> Any:
    return importlib.import_module(f"astra_dagster.methods.{module}")


def training_options(config: AstraConfig) -> dict[str, Any]:
    """The Config's own fields (not those every Astra task has): the method's training options."""
    return {k: v for k, v in config.model_dump().items() if k not in AstraConfig.model_fields}


def _train(module: str, config: AstraConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    # progress is not a Config field: it reaches the run's log and never the task's identity
    model = _method(module).train_model(**training_options(config), progress=progress)
    return {"model": model, **model.summary()}


def model_asset(name: str, module: str, config_class: type[AstraConfig], description: str) -> dg.AssetsDefinition:
    """An unpartitioned asset training ``astra_dagster.methods.<module>.train_model`` with the
    Config's fields as keyword arguments; its progress lines (per epoch, grid chunk, region) go
    to the run's log."""

    def compute(context: dg.AssetExecutionContext, config: config_class) -> TaskBatch:  # type: ignore[valid-type]
        from astra_dagster.spectra import synth

        # The generator version is a parameter: a changed generator makes a new model task.
        item = TaskItem(params={"generator_version": synth.GENERATOR_VERSION})
        return run_tasks(context, config, [item], lambda _: _train(module, config, context.log.info),
                         table="model", batch=False)

    return dg.asset(
        name=name,
        group_name=GROUP,
        io_manager_key="astra_model_io_manager",
        kinds={"python", "numpy"},
        description=description,
        metadata={RESULT_TABLE_KEY: "model", "astra/task_family": config_class.task_family},
    )(compute)


def label_asset(
    name: str,
    module: str,
    config_class: type[SourceTaskConfig],
    model_key: str,
    description: str,
    *,
    scalars: frozenset[str] = frozenset(),
    fit_options: Callable[[Any], dict[str, Any]] | None = None,
) -> dg.AssetsDefinition:
    """A per-source asset fitting ``astra_dagster.methods.<module>.fit_spectra`` with the model
    of ``model_key`` to each source's apStar stacks, writing ``astra.<name>``."""

    def compute(context: dg.AssetExecutionContext, config: config_class, spectra: dict,  # type: ignore[valid-type]
                model: LoadedModel) -> TaskBatch:
        _, first_last = partition_range(context)
        options = fit_options(config) if fit_options else {}
        items = [
            TaskItem(payload=entry, source_pk=pk, source_id=entry["source_id"],
                     params={"input_task_id": entry["task_id"], "model_task_id": model.task_id})
            for pk, entry in sorted(spectra.items())
        ]
        context.log.info(f"{name}: {len(items)} sources with model {model.task_id}")
        # Worker processes read the model once each from its file (not once per source).
        # The model itself (read on first use) goes in the state: a memoised run never reads it.
        work = Work(fit_one, state=(module, ReadOnFirstUse(lambda: model.model), scalars, options),
                    setup=worker_state,
                    setup_args=(module, model.model_class, str(model.path), scalars, options),
                    chunk_function=fit_many, chunk_size=CHUNK_SIZE, preload=preload(module))
        return run_tasks(context, config, items, work, table=name, batch=True, partition_range=first_last)

    return dg.asset(
        name=name,
        partitions_def=SOURCE_BLOCKS,
        backfill_policy=RANGE_POLICY,
        group_name=GROUP,
        io_manager_key="astra_io_manager",
        kinds={"python", "postgres"},
        description=description,
        ins={"spectra": dg.AssetIn("spectra"), "model": dg.AssetIn(model_key)},
        metadata={RESULT_TABLE_KEY: name, "astra/task_family": config_class.task_family},
    )(compute)


# ----------------------------------------------------------------------------- The Cannon


class TrainTheCannon(AstraConfig):
    """A Cannon model trained on noiseless generator spectra (an independent draw and instrument
    settings from any release), giants, dwarfs and pre-main-sequence stars."""

    task_family: ClassVar[str] = "TheCannon.TrainTheCannon"

    n_train: int = Field(default=600, description="Training spectra (3000 for the full-size model).")
    seed: int = Field(default=101, description="Seed of the training set's draw.")
    order: int = Field(default=2, description="Polynomial order of the vectorizer.")
    regularization: float = Field(default=0.0, description="L1 strength Λ (0: none).")
    regions: str = Field(default="survey", description="'survey' (piecewise: cool/warm giants and dwarfs) or 'none'.")
    hidden_scatter: bool = Field(default=True, description="Training stars' microturbulence, rotation, [C/Fe] and "
                                 "[N/Fe] scatter about their relations (learned as pixel scatter s²).")


class EstimateTheCannonLabels(SourceTaskConfig):
    """Teff, logg, [Fe/H], [α/M] of every apStar stack of a source with a trained Cannon model."""

    task_family: ClassVar[str] = "TheCannon.EstimateStellarLabelsGivenApStarFile"


thecannon_model = model_asset("thecannon_model", "thecannon", TrainTheCannon,
                              "A trained Cannon model (one .npz under ASTRA_HOME).")
thecannon = label_asset("thecannon", "thecannon", EstimateTheCannonLabels, "thecannon_model",
                        "One astra.thecannon row per source: labels, u_ labels, snr, r_chi_sq, bitmask_flag "
                        "per apStar stack.")


# ----------------------------------------------------------------------------- The Payne


class TrainThePayne(AstraConfig):
    """A Payne emulator (MLP of normalised flux vs Teff, logg, [Fe/H], [α/M], vmicro, [C/Fe],
    [N/Fe]) trained on noiseless generator spectra with the TRAINING settings (an independent draw
    from any release)."""

    task_family: ClassVar[str] = "ThePayne.TrainThePayne"

    n_train: int = Field(default=4000, description="Training spectra (20000 for the full-size model).")
    seed: int = Field(default=0, description="Seed of the training set's draw and of the weights.")
    hidden: int = Field(default=256, description="Neurons per hidden layer.")
    epochs: int = Field(default=800, description="Adam epochs (1500 for the full-size model).")
    batch_size: int = Field(default=128, description="Mini-batch size.")
    learning_rate: float = Field(default=3e-3, description="Adam learning rate.")
    n_components: int = Field(default=96, description="PCA components of the factorised output layer.")
    kinds: str = Field(default="giant,dwarf,yso", description="Generator populations in the training set.")
    labels: str = Field(default="teff,logg,fe_h",
                        description="Emulator labels (teff, logg, fe_h required; vmicro, c_fe, n_fe are written "
                                    "as v_turb, c_h, n_h).")


class EstimateThePayneLabels(SourceTaskConfig):
    """Teff, logg, [Fe/H], [α/M], v_turb, [C/H], [N/H] and an RV offset of every apStar stack of a
    source with a trained Payne emulator (other thepayne columns stay NULL: the emulator does not
    fit them)."""

    task_family: ClassVar[str] = "ThePayne.EstimateStellarLabelsGivenApStarFile"


thepayne_model = model_asset("thepayne_model", "thepayne", TrainThePayne,
                             "A trained Payne emulator (one .npz under ASTRA_HOME).")
thepayne = label_asset("thepayne", "thepayne", EstimateThePayneLabels, "thepayne_model",
                       "One astra.thepayne row per source: teff, logg, fe_h, alpha_m, v_turb, c_h, n_h, rv with u_, "
                       "snr, r_chi_sq, "
                       "bitmask_flag per apStar stack.")


# ----------------------------------------------------------------------------- FERRE


class BuildFerreGrid(AstraConfig):
    """A regular grid of normalised generator spectra (FERRE's "model"), ASPCAP-like spacing.
    A step of 0 leaves a dimension off the grid."""

    task_family: ClassVar[str] = "FERRE.BuildGrid"

    seed: int = Field(default=0, description="Seed of the held-out stars that calibrate the error floors.")
    n_validation: int = Field(default=40, description="Held-out stars for the error floors (0: none).")
    teff_min: float = 3500.0
    teff_max: float = 7000.0
    teff_step: float = 250.0
    logg_min: float = 0.0
    logg_max: float = 5.0
    logg_step: float = 0.5
    metals_min: float = -2.5
    metals_max: float = 0.5
    metals_step: float = 0.25
    alpha_min: float = 0.0
    alpha_max: float = 0.0
    alpha_step: float = Field(default=0.0, description="0: [α/M] is not a dimension (the generator's physical "
                              "model does not carry it).")
    log10vdop_min: float = 0.0
    log10vdop_max: float = 0.0
    log10vdop_step: float = Field(default=0.0, description="0: microturbulence on the generator's relation.")
    lgvsini_min: float = 0.0
    lgvsini_max: float = 0.0
    lgvsini_step: float = Field(default=0.0, description="0: v sin i on the generator's relation (ferre.ROTATION_GRID "
                                "fits log10 v sin i 0..1.5 in steps of 0.5).")
    c_min: float = 0.0
    c_max: float = 0.0
    c_step: float = Field(default=0.0, description="0: [C/M] on the generator's relation (the full-size grid, "
                          "ferre.FULL_GRID: -0.45..0.15 in steps of 0.3).")
    n_min: float = 0.0
    n_max: float = 0.0
    n_step: float = Field(default=0.0, description="0: [N/M] on the generator's relation (ferre.FULL_GRID: "
                          "-0.2..0.8 in steps of 0.5).")


#: FERRE's dimensions under the seed's names.
FERRE_DIMENSIONS = ("teff", "logg", "metals", "o_mg_si_s_ca_ti", "log10vdop", "lgvsini", "c", "n")


class FerreGivenApStarFile(SourceTaskConfig):
    """Grid fit of every apStar stack of a source; ``frozen_<dim>`` holds a dimension at a value."""

    task_family: ClassVar[str] = "FERRE.FerreGivenApStarFile"

    frozen_teff: float | None = None
    frozen_logg: float | None = None
    frozen_metals: float | None = None
    frozen_o_mg_si_s_ca_ti: float | None = None
    frozen_log10vdop: float | None = None
    frozen_lgvsini: float | None = None
    frozen_c: float | None = None
    frozen_n: float | None = None


def _ferre_options(config: FerreGivenApStarFile) -> dict[str, Any]:
    frozen = {d: getattr(config, f"frozen_{d}") for d in FERRE_DIMENSIONS
              if getattr(config, f"frozen_{d}", None) is not None}
    return {"frozen": frozen or None}


ferre_grid = model_asset("ferre_grid", "ferre", BuildFerreGrid, "FERRE's synthetic grid (one .npz under ASTRA_HOME).")
ferre = label_asset("ferre", "ferre", FerreGivenApStarFile, "ferre_grid",
                    "One astra.ferre row per source: grid-fit labels, u_, initial_, log_chisq_fit, log_snr_sq, "
                    "bitmask_flag per apStar stack (NULL for dimensions the grid lacks).",
                    scalars=frozenset(f"frozen_{d}" for d in FERRE_DIMENSIONS), fit_options=_ferre_options)


# ----------------------------------------------------------------------------- APOGEENet


class TrainApogeeNet(AstraConfig):
    """APOGEENet (1-D CNN on log flux) trained on generator spectra of dwarfs, giants, hot stars
    and pre-main-sequence stars, with fresh noise and throughput every epoch."""

    task_family: ClassVar[str] = "APOGEENet.TrainNetwork"

    n_train: int = Field(default=4500, description="Training spectra (12000 for the full-size network).")
    seed: int = Field(default=0, description="Seed of the training set and the weights.")
    epochs: int = Field(default=30, description="Epochs (60 for the full-size network).")
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = Field(default=6, description="Early stopping: epochs without validation improvement.")
    max_seconds: float = Field(default=0.0, description="Stop training after this long (0: no limit).")
    hidden: int = Field(default=128, description="Width of the dense layer.")
    blocks: str = Field(default="", description="Conv blocks as 'kernel x channels' pairs, e.g. '7x8,5x16'; "
                        "empty: the default stack.")
    bin_factor: int = Field(default=4, description="Input pixels averaged per network input.")


class EstimateApogeeNetParameters(SourceTaskConfig):
    """Teff, logg, [Fe/H] of every apStar stack of a source, uncertainties from noisy passes."""

    task_family: ClassVar[str] = "APOGEENet.EstimateStellarParametersGivenApStarFile"

    n_draws: int = Field(default=20, description="Noisy forward passes per spectrum for the uncertainties.")
    seed: int = Field(default=0, description="Seed of the noisy passes.")


apogeenet_model = model_asset("apogeenet_model", "apogeenet", TrainApogeeNet,
                              "APOGEENet weights (one .npz under ASTRA_HOME).")
apogeenet = label_asset("apogeenet", "apogeenet", EstimateApogeeNetParameters, "apogeenet_model",
                        "One astra.apogeenet row per source: snr, teff, logg, fe_h with u_, bitmask_flag per "
                        "apStar stack.", fit_options=lambda c: {"n_draws": c.n_draws, "seed": c.seed})

#: Model asset → label asset, for the definitions and the release sensor.
LABEL_ASSETS: dict[dg.AssetsDefinition, dg.AssetsDefinition] = {
    thecannon_model: thecannon,
    thepayne_model: thepayne,
    ferre_grid: ferre,
    apogeenet_model: apogeenet,
}
