"""Summary files as assets: ``<method>_summary`` writes ``astraAllStar<Method>-<version>.fits``
(and ``.parquet``; for doppler also ``astraAllVisitDoppler``) per release under
``ASTRA_HOME/summary/<release>/``.

Each (method, release) is a task like any other: its parameters are the release, the formats and
a fingerprint of the results it summarises, so an unchanged release is skipped and a new or
recomputed result makes a new summary task. Its output rows (one per file: path, sha256, rows)
go to ``astra.summary_file`` through the lineage IO manager. The table and file code lives in
:mod:`astra_dagster.products.summary`.
"""

# No "from __future__ import annotations" here: Dagster reads Config annotations at runtime.
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
from pydantic import Field

from astra_dagster.db.connection import connect
from astra_dagster.defs.diagnostics import as_metadata, summary_diagnostics
from astra_dagster.lineage import store
from astra_dagster.lineage.batch import TaskBatch, TaskItem, run_tasks
from astra_dagster.lineage.config import AstraConfig
from astra_dagster.lineage.io_manager import RESULT_ROWS_KEY, RESULT_TABLE_KEY
from astra_dagster.products import summary as sm
from astra_dagster.settings import get_settings

GROUP = "summaries"
TABLE = "summary_file"
#: Changes when the summary code writes different files from the same results (a parameter of
#: every summary task, so a new version rewrites the summaries).
SUMMARY_VERSION = "1"


class SummaryConfig(AstraConfig):
    """Which releases to summarise and in which formats."""

    insignificant: ClassVar[frozenset[str]] = frozenset({"force", "releases"})

    releases: list[str] = Field(default=[], description="Release names (empty: every release with results).")
    formats: list[str] = Field(default=["fits", "parquet"], description="File formats: fits, parquet, csv.")


class SummarizeDoppler(SummaryConfig):
    """astraAllStarDoppler (one row per source) and astraAllVisitDoppler (one row per visit)."""

    task_family: ClassVar[str] = "Summary.AstraAllStarDoppler"


class SummarizeTheCannon(SummaryConfig):
    """astraAllStarTheCannon: one row per source and apStar stack."""

    task_family: ClassVar[str] = "Summary.AstraAllStarTheCannon"


class SummarizeThePayne(SummaryConfig):
    """astraAllStarThePayne: one row per source and apStar stack."""

    task_family: ClassVar[str] = "Summary.AstraAllStarThePayne"


class SummarizeFerre(SummaryConfig):
    """astraAllStarFERRE: one row per source and apStar stack."""

    task_family: ClassVar[str] = "Summary.AstraAllStarFERRE"


class SummarizeApogeeNet(SummaryConfig):
    """astraAllStarAPOGEENet: one row per source and apStar stack."""

    task_family: ClassVar[str] = "Summary.AstraAllStarAPOGEENet"


CONFIGS: dict[str, type[SummaryConfig]] = {
    "doppler": SummarizeDoppler, "thecannon": SummarizeTheCannon, "thepayne": SummarizeThePayne,
    "ferre": SummarizeFerre, "apogeenet": SummarizeApogeeNet}


def _write(method: str, item: TaskItem, formats: list[str], log: Any,
           tables: dict[str, list[sm.SummaryTable]]) -> list[dict[str, Any]]:
    release = item.params["release"]
    directory = sm.summary_directory(get_settings().astra_home, release)
    with connect() as conn:
        report = sm.write_summary(conn, method, release, directory, formats)
    tables[release] = report.tables  # for the plots
    if report.n_missing:
        log.warning(f"{method} summary of {release}: {report.n_missing} of "
                    f"{report.n_sources + report.n_missing} sources have no result yet")
    return [{"method": method, "release": release, "product": f.product, "file_format": f.file_format,
             "path": str(f.path), "sha256": f.sha256, "size": f.size, "n_rows": f.n_rows,
             "n_sources": report.n_sources, "n_missing": report.n_missing} for f in report.files]


def _recorded_files(hashes: list[str], module: str) -> list[dict[str, Any]]:
    with connect() as conn:
        rows = conn.execute(
            "select t.task_hash, f.release, f.product, f.file_format, f.path, f.sha256, f.size, f.n_rows, "
            "f.n_sources, f.n_missing from astra.task t join astra.summary_file f on f.output_pk = t.output_pk "
            "where t.task_module = %s and t.task_hash = any(%s) and t.status_code = %s order by f.pk",
            (module, hashes, store.STATUS_SUCCESS)).fetchall()
    names = ("task_hash", "release", "product", "file_format", "path", "sha256", "size", "n_rows",
             "n_sources", "n_missing")
    return [dict(zip(names, r, strict=True)) for r in rows]


def file_metadata(files: list[dict[str, Any]]) -> dict[str, Any]:
    """Materialisation metadata: per file its path, rows and sha256; a table of all files; the
    main product's rows as ``dagster/row_count``."""
    meta: dict[str, Any] = {}
    for f in files:
        name = Path(f["path"]).name
        meta[f"{f['release']}/{name}"] = dg.MetadataValue.path(f["path"])
        meta[f"{f['release']}/{name}/rows"] = int(f["n_rows"])
        meta[f"{f['release']}/{name}/sha256"] = f["sha256"]
    if files:
        # the UI's row count: rows of the main product (astraAllStar...) in one format
        main = (files[0]["product"], files[0]["file_format"])
        meta["dagster/row_count"] = sum(int(f["n_rows"]) for f in files if (f["product"], f["file_format"]) == main)
        meta["astra/summary_files"] = dg.MetadataValue.table(
            records=[dg.TableRecord({"release": f["release"], "file": Path(f["path"]).name, "rows": int(f["n_rows"]),
                                     "missing_sources": int(f["n_missing"]), "bytes": int(f["size"]),
                                     "sha256": f["sha256"][:16]}) for f in files],
            schema=dg.TableSchema(columns=[dg.TableColumn("release", "string"), dg.TableColumn("file", "string"),
                                           dg.TableColumn("rows", "int"), dg.TableColumn("missing_sources", "int"),
                                           dg.TableColumn("bytes", "int"), dg.TableColumn("sha256", "string")]))
    return meta


def summary_asset(method: str, upstream: str) -> dg.AssetsDefinition:
    """The unpartitioned summary asset of one method (depends on, never loads, its label asset)."""
    config_class = CONFIGS[method]
    spec = sm.method_spec(method)

    def compute(context: dg.AssetExecutionContext, config: config_class) -> TaskBatch:  # type: ignore[valid-type]
        unknown = [f for f in config.formats if f not in sm.FORMATS]
        if unknown:
            raise sm.SummaryError(f"{method}_summary: unknown format {unknown[0]!r} (known: {', '.join(sm.FORMATS)})")
        with connect() as conn:
            releases = ([sm.find_release(conn, r) for r in config.releases] if config.releases
                        else sm.releases_with_results(conn, spec))
            items = []
            for rel in releases:
                fingerprint, n = sm.result_fingerprint(conn, spec, rel.pk)
                items.append(TaskItem(payload=rel, params={"release": rel.name, "input_fingerprint": fingerprint,
                                                           "summary_version": SUMMARY_VERSION}))
                context.log.info(f"{method} summary of {rel.name}: {n} of {rel.n_sources} sources have a result")
        hashes = [i.task_hash for i in config.identities([dict(it.params) for it in items])]
        recorded = _recorded_files(hashes, config.task_module())
        if any(not os.path.exists(f["path"]) for f in recorded):
            # a memoised summary whose file was deleted: write it again
            context.log.warning(f"{method}_summary: a recorded summary file is missing; rewriting")
            config = config.model_copy(update={"force": True})
        tables: dict[str, list[sm.SummaryTable]] = {}
        batch = run_tasks(context, config, items,
                          lambda item: _write(method, item, list(config.formats), context.log, tables),
                          table=TABLE, batch=False)
        files = [row for o in batch.outcomes if o.result for row in o.result]  # type: ignore[union-attr]
        if batch.n_skipped:
            files += [f for f in _recorded_files(hashes, config.task_module())
                      if not any(f["path"] == g["path"] for g in files)]
        metadata = file_metadata(files)
        t0 = time.perf_counter()
        try:
            for rel in releases:
                if rel.name not in tables:  # a skipped (unchanged) summary: its tables, for the plots
                    with connect() as conn:
                        tables[rel.name] = sm.release_tables(conn, method, rel.name)[0]
                metadata.update(as_metadata(summary_diagnostics(spec, tables[rel.name], rel.name),
                                            prefix=f"{rel.name}/"))
            metadata["astra/plot_seconds"] = round(time.perf_counter() - t0, 3)
        except Exception as exc:  # plots are a view; the files are written
            context.log.warning(f"{method}_summary: no plots ({type(exc).__name__}: {exc})")
        context.add_output_metadata(metadata)
        return batch

    compute.__doc__ = config_class.__doc__
    return dg.asset(
        name=f"{method}_summary",
        group_name=GROUP,
        io_manager_key="astra_io_manager",
        kinds={"python", "fits", "parquet"},
        deps=[upstream],
        description=f"{config_class.__doc__} Files under ASTRA_HOME/summary/RELEASE/.",
        metadata={RESULT_TABLE_KEY: TABLE, RESULT_ROWS_KEY: "many", "astra/task_family": config_class.task_family},
    )(compute)


SUMMARY_ASSETS: dict[str, dg.AssetsDefinition] = {m: summary_asset(m, m) for m in sm.METHODS}
