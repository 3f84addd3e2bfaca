"""Running tasks from Python, as Astra's ``astra.build(tasks)`` did: each task goes through Dagster."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from astra_dagster.lineage.config import AstraConfig

TASK_FAMILY_KEY = "astra/task_family"


@dataclass(frozen=True)
class BuildResult:
    task_id: str
    success: bool
    run_id: str
    metadata: dict[str, Any]


def load_definitions() -> dg.Definitions:
    from astra_dagster.definitions import defs

    return defs


def asset_for_family(defs: dg.Definitions, family: str) -> dg.AssetsDefinition:
    """The asset whose tasks belong to ``family`` (from its ``astra/task_family`` metadata)."""
    for assets_def in defs.assets or []:
        if not isinstance(assets_def, dg.AssetsDefinition):
            continue
        for key in assets_def.keys:
            if assets_def.metadata_by_key.get(key, {}).get(TASK_FAMILY_KEY) == family:
                return assets_def
    raise KeyError(f"no asset runs tasks of family {family!r}")


def config_run_config(assets_def: dg.AssetsDefinition, config: AstraConfig) -> dict[str, Any]:
    return {"ops": {assets_def.node_def.name: {"config": config.model_dump()}}}


def materialize_assets(
    defs: dg.Definitions,
    asset_keys: Sequence[dg.AssetKey],
    *,
    instance: dg.DagsterInstance,
    run_config: dict[str, Any] | None = None,
    partition_key: str | None = None,
    tags: dict[str, str] | None = None,
    log_level: str | None = None,
) -> dg.ExecuteInProcessResult:
    """One in-process Dagster run of ``asset_keys`` (upstream inputs load through IO managers).

    ``log_level`` (e.g. "WARNING") quiets Dagster's console log of the run.
    """
    config = dict(run_config or {})
    if log_level:
        config["loggers"] = {"console": {"config": {"log_level": log_level}}}
    # the asset checks too: a run of an asset runs its checks after it, as the daemon's runs do
    return dg.materialize(
        [a for a in [*(defs.assets or []), *(defs.asset_checks or [])] if isinstance(a, dg.AssetsDefinition)],
        selection=list(asset_keys),
        instance=instance,
        resources=defs.resources,
        run_config=config,
        partition_key=partition_key,
        tags=tags or None,
        raise_on_error=False,
    )


def materialize_task(
    config: AstraConfig,
    *,
    instance: dg.DagsterInstance | None = None,
    partition_key: str | None = None,
    tags: dict[str, str] | None = None,
    defs: dg.Definitions | None = None,
    log_level: str | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialise the asset of ``config``'s family with these parameters, in this process."""
    from astra_dagster.orchestration.instance import get_instance

    defs = defs or load_definitions()
    target = asset_for_family(defs, config.task_family)
    return materialize_assets(
        defs, list(target.keys), instance=instance or get_instance(),
        run_config=config_run_config(target, config), partition_key=partition_key, tags=tags,
        log_level=log_level,
    )


def build(
    tasks: Sequence[AstraConfig],
    *,
    instance: dg.DagsterInstance | None = None,
    log_level: str | None = None,
) -> list[BuildResult]:
    """Run each task (one Dagster run per task); identical tasks that succeeded are skipped.

    ``log_level`` (e.g. "WARNING") quiets Dagster's console log of each run.
    """
    from astra_dagster.orchestration.instance import get_instance

    instance = instance or get_instance()
    defs = load_definitions()
    results = []
    for config in tasks:
        outcome = materialize_task(config, instance=instance, defs=defs, log_level=log_level)
        events = outcome.get_asset_materialization_events()
        metadata = {k: v.value for k, v in events[0].materialization.metadata.items()} if events else {}
        results.append(BuildResult(
            task_id=config.identity().task_id, success=outcome.success,
            run_id=outcome.run_id, metadata=metadata,
        ))
    return results
