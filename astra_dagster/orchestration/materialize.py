"""``astra materialize``: check a selection, its Config and its partitions before any run starts,
then run it in this process on the Astra instance (ranges as one single-run-policy range run)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from pydantic import TypeAdapter, ValidationError

from astra_dagster.lineage.config import AstraConfig, config_class
from astra_dagster.orchestration.build import TASK_FAMILY_KEY, materialize_assets
from astra_dagster.orchestration.planned_runs import AssetCounts, counts_of, materialize_range


class MaterializeInputError(ValueError):
    """Bad input to ``astra materialize`` (asset, config, partitions): found before any run."""


@dataclass(frozen=True)
class Selection:
    """What to run: the assets, their validated run config, and the partition range or none."""

    assets: list[dg.AssetsDefinition]
    run_config: dict[str, Any]
    partitions: tuple[str, str] | None

    @property
    def keys(self) -> list[dg.AssetKey]:
        return [key for a in self.assets for key in a.keys]


@dataclass(frozen=True)
class MaterializeOutcome:
    run_id: str
    success: bool
    counts: list[AssetCounts]
    #: assets materialised without Astra's batch counts (none so far, but say so if it happens)
    materialized: list[str]
    checks_passed: int
    checks_failed: int
    errors: list[str] = field(default_factory=list)


def parse_json(text: str, option: str = "--config") -> Any:
    """JSON, or a one-line error saying where it breaks."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MaterializeInputError(f"{option} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                                    f"column {exc.colno}") from None


def select_assets(defs: dg.Definitions, names: Sequence[str]) -> list[dg.AssetsDefinition]:
    """The assets named (as the UI spells their keys), or an error listing the known ones."""
    known: dict[str, dg.AssetsDefinition] = {}
    for assets_def in defs.assets or []:
        if isinstance(assets_def, dg.AssetsDefinition):
            for key in assets_def.keys:
                known[key.to_user_string()] = assets_def
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MaterializeInputError(f"unknown asset {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return list({id(known[n]): known[n] for n in names}.values())


def _config_class(assets_def: dg.AssetsDefinition) -> type[AstraConfig]:
    # every Astra asset names its task family, and the family its Config class
    family = next(iter(assets_def.metadata_by_key.values()), {}).get(TASK_FAMILY_KEY)
    return config_class(str(family))


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def check_op_config(asset: str, cls: type[AstraConfig], value: Any) -> dict[str, Any]:
    """``value`` as the Config of ``asset``: unknown fields, wrong types and missing required
    fields are one-line errors. Types are checked strictly, as Dagster's config system will
    (``"300"`` is no int), so nothing that passes here fails at run start."""
    if not isinstance(value, dict):
        raise MaterializeInputError(f"{asset}: config must be a JSON object of its fields, got {json.dumps(value)}")
    fields = cls.model_fields
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise MaterializeInputError(f"{asset}: unknown config field {unknown[0]!r} ({cls.__name__}); "
                                    f"valid: {', '.join(fields)}")
    for name, info in fields.items():
        if name not in value:
            if info.is_required():
                raise MaterializeInputError(f"{asset}: missing required config field {name!r} "
                                            f"({_type_name(info.annotation)})")
            continue
        try:
            TypeAdapter(info.annotation).validate_python(value[name], strict=True)
        except ValidationError:
            raise MaterializeInputError(f"{asset}: config field {name!r} must be {_type_name(info.annotation)}, "
                                        f"got {json.dumps(value[name])}") from None
    try:
        cls(**value)  # the Config's own validators (e.g. strings PostgreSQL cannot store)
    except (ValidationError, ValueError) as exc:
        text = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise MaterializeInputError(f"{asset}: {text.splitlines()[0]}") from None
    return value


def build_run_config(assets: Sequence[dg.AssetsDefinition], config: Any) -> dict[str, Any]:
    """The run config for ``assets``: ``config`` is either the Config of the selected assets (one
    object, checked against each asset's Config class) or a whole run config ``{"ops": {...}}``."""
    if config is None:
        config = {}
    by_op = {a.node_def.name: a for a in assets}
    if isinstance(config, dict) and "ops" in config:
        extra = [k for k in config if k != "ops"]
        if extra:
            raise MaterializeInputError(f"run config key {extra[0]!r} is not accepted here (only 'ops')")
        ops = config["ops"]
        if not isinstance(ops, dict):
            raise MaterializeInputError(f"'ops' must map asset names to {{\"config\": {{...}}}}, got {json.dumps(ops)}")
        per_op: dict[str, Any] = {}
        for name, entry in ops.items():
            if name not in by_op:
                raise MaterializeInputError(f"ops names {name!r}, which is not selected; selected: {', '.join(by_op)}")
            if not isinstance(entry, dict) or set(entry) - {"config"}:
                raise MaterializeInputError(f"ops.{name} must be {{\"config\": {{...}}}}, got {json.dumps(entry)}")
            per_op[name] = entry.get("config", {})
    else:
        per_op = {name: config for name in by_op}
    run_ops = {}
    for name, assets_def in by_op.items():
        value = check_op_config(name, _config_class(assets_def), per_op.get(name, {}))
        if value:
            run_ops[name] = {"config": value}
    return {"ops": run_ops} if run_ops else {}


def check_partitions(assets: Sequence[dg.AssetsDefinition], spec: str | None,
                     instance: dg.DagsterInstance) -> tuple[str, str] | None:
    """``spec`` ("KEY" or "FIRST...LAST") as a (first, last) range of the assets' partitions."""
    partitioned = [a for a in assets if a.partitions_def is not None]
    unpartitioned = [a for a in assets if a.partitions_def is None]
    if spec is None:
        if partitioned:
            raise MaterializeInputError(f"{partitioned[0].node_def.name} is partitioned: give --partitions KEY "
                                        "or FIRST...LAST")
        return None
    if unpartitioned:
        raise MaterializeInputError(f"--partitions given, but {unpartitioned[0].node_def.name} is not partitioned")
    defs_ = {a.partitions_def for a in partitioned}
    if len(defs_) > 1:
        raise MaterializeInputError("the selected assets have different partitions; materialize them separately")
    partitions_def = partitioned[0].partitions_def
    assert partitions_def is not None
    keys = list(partitions_def.get_partition_keys(dynamic_partitions_store=instance))
    first, sep, last = spec.partition("...")
    first, last = first.strip(), (last.strip() if sep else first.strip())
    name = getattr(partitions_def, "name", None) or "the partition set"
    where = f"{len(keys)} partitions: {keys[0]}...{keys[-1]}" if keys else "it has none yet"
    for key in (first, last):
        if key not in keys:
            raise MaterializeInputError(f"partition {key!r} is not in {name} ({where})")
    if keys.index(first) > keys.index(last):
        raise MaterializeInputError(f"partition range {first}...{last} is reversed ({where})")
    return first, last


def prepare(defs: dg.Definitions, names: Sequence[str], config_text: str | None, partitions: str | None,
            instance: dg.DagsterInstance) -> Selection:
    """Everything ``astra materialize`` checks before it starts a run."""
    assets = select_assets(defs, names)
    config = parse_json(config_text) if config_text is not None else None
    run_config = build_run_config(assets, config)
    return Selection(assets, run_config, check_partitions(assets, partitions, instance))


def run(defs: dg.Definitions, selection: Selection, *, instance: dg.DagsterInstance,
        log_level: str | None = "WARNING") -> MaterializeOutcome:
    """One in-process run; a range goes through the single-run range path of the release runs."""
    if selection.partitions is not None:
        first, last = selection.partitions
        result = materialize_range(defs, selection.keys, first, last, instance=instance,
                                   run_config=selection.run_config, log_level=log_level)
    else:
        result = materialize_assets(defs, selection.keys, instance=instance,
                                    run_config=selection.run_config, log_level=log_level)
    counts = counts_of(result)
    counted = {c.asset for c in counts}
    materialized = sorted({e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
                          - counted)
    checks = result.get_asset_check_evaluations()
    errors = []
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        cause = error.cause if error is not None and error.cause is not None else error
        text = cause.message.strip().splitlines()[0] if cause is not None and cause.message.strip() else "failed"
        errors.append(f"step {event.step_key}: {text}")
    return MaterializeOutcome(result.run_id, result.success, counts, materialized,
                              sum(1 for c in checks if c.passed), sum(1 for c in checks if not c.passed), errors)
