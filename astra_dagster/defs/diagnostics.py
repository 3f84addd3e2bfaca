"""Plots in the Dagster UI: each materialisation of a method asset (doppler and the label
assets) and of a summary asset carries a Kiel diagram and, for synthetic releases, the accuracy
per S/N bin (a table) and Δlabel vs truth; doppler's also the visit RV scatter and RV error vs S/N
(:mod:`astra_dagster.products.plots`).

For the method assets this is the lineage IO manager plus one step after its write: it reads
back the results the run wrote (as the checks do) and attaches the plots. A range run makes one
materialisation event per partition; the plots go on one of them only (the last the run records,
which the asset page shows as the latest), not tens of kB times every block of the range. A plot
that cannot be drawn is a warning in the log, never a failed write.
"""

from __future__ import annotations

import time
from typing import Any

import dagster as dg

from astra_dagster.db.connection import connect
from astra_dagster.lineage.batch import TaskBatch
from astra_dagster.lineage.io_manager import AstraIOManager
from astra_dagster.products import plots
from astra_dagster.products import quality as qa
from astra_dagster.products import summary as sm

_ACCURACY_COLUMNS = [dg.TableColumn("snr", "string"), dg.TableColumn("label", "string"), dg.TableColumn("n", "int"),
                     *(dg.TableColumn(k, "float") for k in ("bias", "rms", "robust_sigma", "outlier_frac",
                                                            "pull_std"))]


def as_metadata(diagnostics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Markdown plots → MetadataValue.md, accuracy records → MetadataValue.table."""
    out: dict[str, Any] = {}
    for name, value in diagnostics.items():
        if isinstance(value, str):
            out[f"{prefix}{name}"] = dg.MetadataValue.md(value)
        elif value:
            out[f"{prefix}{name}"] = dg.MetadataValue.table(
                records=[dg.TableRecord(r) for r in value], schema=dg.TableSchema(columns=_ACCURACY_COLUMNS))
    return out


def run_diagnostics(method: str, run_id: str) -> dict[str, Any]:
    """The diagnostics of the results one run wrote for ``method``."""
    spec = sm.method_spec(method)
    with connect() as conn:
        results = sm.fetch_results(conn, spec, run_id=run_id)
        schema = sm.table_schema(conn, spec.table)
        elements = sm.element_table(spec, schema, results, sm.product_name(spec))
        truth = qa.truth_for(conn, elements)
    stars = sm.doppler_star_table(spec, schema, results, sm.product_name(spec)) if spec.element == "visit" else None
    return plots.diagnostics(spec, elements, truth, stars, title=method)


def summary_diagnostics(spec: sm.MethodSpec, tables: list[sm.SummaryTable], release: str) -> dict[str, Any]:
    """The diagnostics of one release's summary tables (doppler: stars first, then visits)."""
    elements = tables[-1]
    with connect() as conn:
        truth = qa.truth_for(conn, elements)
    stars = tables[0] if len(tables) > 1 else None
    return plots.diagnostics(spec, elements, truth, stars, title=f"{spec.name} {release}")


class AstraDiagnosticsIOManager(AstraIOManager):
    """The lineage IO manager; for the method assets it then attaches the run's plots."""

    def handle_output(self, context: dg.OutputContext, obj: TaskBatch | None) -> None:
        super().handle_output(context, obj)
        method = context.asset_key.to_user_string() if context.has_asset_key else None
        if obj is None or method not in sm.METHODS:
            return
        t0 = time.perf_counter()
        try:
            metadata = as_metadata(run_diagnostics(method, context.run_id))
        except Exception as exc:  # plots are a view; the results are already written
            context.log.warning(f"{method}: no plots ({type(exc).__name__}: {exc})")
            return
        if not metadata:
            return
        metadata["astra/plot_seconds"] = round(time.perf_counter() - t0, 3)
        if context.has_asset_partitions:
            # the events are yielded in asset_partition_keys order: the last one is the latest
            last = list(context.asset_partition_keys)[-1]
            context.step_context.add_asset_metadata(metadata, asset_key=context.asset_key, partition_key=last)
        else:
            context.add_output_metadata(metadata)
