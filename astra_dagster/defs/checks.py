"""Asset checks of the per-source method assets (doppler and the four label methods).

One ``@multi_asset_check`` per asset with four checks (:mod:`astra_dagster.products.quality`):
``finite_labels``, ``uncertainties`` (ERROR when they fail), ``flagged_fraction`` and, for
synthetic releases, ``accuracy_vs_truth`` (WARN). They run in the run that materialises the asset,
after it, over the results that run wrote (a run that only skipped has nothing new to check), by
SQL on the method table: they never load the asset's partitions. A check that cannot run reports
itself failed with the reason instead of failing the run.
"""

# No "from __future__ import annotations": Dagster reads the context annotation at runtime.

from collections.abc import Iterator
from typing import Any

import dagster as dg

from astra_dagster.db.connection import connect
from astra_dagster.products import quality as qa
from astra_dagster.products import summary as sm

CHECKS = {
    "finite_labels": "No label is NaN, infinite or NULL without a flag saying why.",
    "uncertainties": "Every unflagged finite label has a finite, positive uncertainty.",
    "flagged_fraction": f"At most {qa.FLAGGED_FRACTION_WARN:.0%} of the results carry a flag (WARN above).",
    "accuracy_vs_truth": "Synthetic releases: rms of the unflagged results against the truth within the "
                         "method's stated targets (WARN otherwise).",
}


def _value(value: Any) -> Any:
    if isinstance(value, dict | list):
        return dg.MetadataValue.json(value)
    return value


def run_table(spec: sm.MethodSpec, run_id: str) -> tuple[sm.SummaryTable, qa.Truth | None]:
    """The results this run wrote, one row per stack (visit), and the truth of their synthetic releases."""
    with connect() as conn:
        results = sm.fetch_results(conn, spec, run_id=run_id)
        table = sm.element_table(spec, sm.table_schema(conn, spec.table), results, sm.product_name(spec))
        truth = qa.truth_for(conn, table)
    return table, truth


def method_checks(method: str) -> dg.AssetChecksDefinition:
    spec = sm.method_spec(method)
    key = dg.AssetKey(spec.asset)

    @dg.multi_asset_check(
        name=f"{method}_quality",
        specs=[dg.AssetCheckSpec(name, asset=key, description=text) for name, text in CHECKS.items()],
        description=f"Quality of the {method} results written by the run.",
    )
    def checks(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        try:
            table, truth = run_table(spec, context.run.run_id)
            outcomes = qa.run_checks(spec, table, truth)
        except Exception as exc:  # a broken check must say so, not fail the run
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            context.log.error(f"{method} checks could not run: {message}")
            for name in CHECKS:
                yield dg.AssetCheckResult(asset_key=key, check_name=name, passed=False,
                                          metadata={"error": message})
            return
        for outcome in outcomes:
            severity = dg.AssetCheckSeverity.WARN if outcome.severity == "WARN" else dg.AssetCheckSeverity.ERROR
            yield dg.AssetCheckResult(asset_key=key, check_name=outcome.name, passed=outcome.passed,
                                      severity=severity, description=outcome.description,
                                      metadata={k: _value(v) for k, v in outcome.metadata.items()})

    return checks


METHOD_CHECKS: dict[str, dg.AssetChecksDefinition] = {m: method_checks(m) for m in sm.METHODS}
