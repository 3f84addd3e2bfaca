"""The ``spectra`` asset: registers (and validates) the spectra of each source of its blocks."""

# No "from __future__ import annotations" here: Dagster reads Config annotations at runtime.
from typing import ClassVar

import dagster as dg
from pydantic import Field

from astra_dagster.db.connection import connect
from astra_dagster.defs.partitions import RANGE_POLICY, SOURCE_BLOCKS, partition_range
from astra_dagster.lineage.batch import TaskBatch, TaskItem, Work, run_tasks
from astra_dagster.lineage.config import SourceTaskConfig
from astra_dagster.lineage.io_manager import RESULT_ROWS_KEY, RESULT_TABLE_KEY
from astra_dagster.lineage.sources import sources_in_blocks
from astra_dagster.releases.register import SourceFiles, latest_files


class RegisterSpectra(SourceTaskConfig):
    """Read and check a source's files from its newest release; one spectrum row per spectrum."""

    task_family: ClassVar[str] = "Spectra.RegisterSpectra"
    insignificant: ClassVar[frozenset[str]] = frozenset({"force", "only_sources", "verify_sha256"})

    verify_sha256: bool = Field(
        default=True, description="Check every file's sha256 against the release manifest."
    )


def _register(config: RegisterSpectra, item: TaskItem) -> list[dict]:
    # imported here: the FITS readers (astropy) are needed to register, not to load the code location
    from astra_dagster.spectra.registration import spectrum_rows

    files: SourceFiles = item.payload
    rows = spectrum_rows(files.source_id, files.release_path, files.files,
                         verify_sha256=config.verify_sha256)
    for row in rows:
        row["source_pk"] = files.source_pk
        row["release_pk"] = files.release_pk
    return rows


@dg.asset(
    partitions_def=SOURCE_BLOCKS,
    backfill_policy=RANGE_POLICY,
    group_name="spectra",
    io_manager_key="astra_io_manager",
    kinds={"python", "postgres"},
    metadata={
        RESULT_TABLE_KEY: "spectrum",
        RESULT_ROWS_KEY: "many",
        "astra/task_family": RegisterSpectra.task_family,
    },
)
def spectra(context: dg.AssetExecutionContext, config: RegisterSpectra) -> TaskBatch:
    """One ``astra.spectrum`` row per spectrum (visit or stack) of every source in the blocks,
    from the newest release that has the source; a source whose files are unchanged is skipped."""
    keys, first_last = partition_range(context)
    with connect() as conn:
        sources = sources_in_blocks(conn, keys)
        files = latest_files(conn, [s.pk for s in sources])
    orphans = [s.source_id for s in sources if s.pk not in files]
    if orphans:
        context.log.warning(f"{len(orphans)} source(s) are in no registered release: {orphans[:5]}")
    items = [
        TaskItem(payload=files[s.pk], source_pk=s.pk, source_id=s.source_id,
                 params={"input_fingerprint": files[s.pk].fingerprint})
        for s in sources if s.pk in files
    ]
    # _register and the config travel to the worker processes (ASTRA_WORKERS)
    return run_tasks(context, config, items, Work(_register, state=config),
                     table="spectrum", batch=True, partition_range=first_last)


spectra_job = dg.define_asset_job("spectra_job", selection=[spectra], partitions_def=SOURCE_BLOCKS)
