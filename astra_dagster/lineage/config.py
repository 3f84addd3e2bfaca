"""Task parameters as Dagster ``Config`` classes.

A task family is one ``AstraConfig`` subclass: its ``task_family`` names the family, its module is
the task's ``task_module``, and its fields are the parameters (all significant unless listed in
``insignificant``). The registry maps families back to classes so a task can be re-created from
its parameter rows.
"""

from __future__ import annotations

import importlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import dagster as dg
from pydantic import Field, TypeAdapter, model_validator

from astra_dagster.lineage.identity import TaskIdentity
from astra_dagster.settings import version_parts

_MAJOR, _MINOR = version_parts()

_registry: dict[str, type[AstraConfig]] = {}


class AstraConfig(dg.Config):
    """Parameters shared by every Astra task."""

    #: "<Namespace>.<Family>", e.g. "RNG.RandomNumberGeneratorTask".
    task_family: ClassVar[str] = ""
    #: Fields that do not change the result (execution knobs): not part of the task's identity.
    insignificant: ClassVar[frozenset[str]] = frozenset({"force"})

    astra_version_major: int = Field(
        default=_MAJOR,
        description="Major version: part of every task's identity (a new major re-runs all tasks).",
    )
    astra_version_minor: int = Field(
        default=_MINOR,
        description="Minor version: part of every task's identity (serious bug fixes re-run tasks).",
    )
    force: bool = Field(
        default=False,
        description="Recompute even if an identical task already succeeded, replacing its output.",
    )

    @model_validator(mode="after")
    def _storable_strings(self) -> AstraConfig:
        """String values become parameter rows: refuse what PostgreSQL text cannot hold (NUL,
        invalid UTF-8) here, with the field's name, not as a driver error mid-run."""
        for name in type(self).model_fields:
            problem = _string_problem(getattr(self, name))
            if problem:
                raise ValueError(f"config field {name!r} {problem}")
        return self

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        family = cls.__dict__.get("task_family")
        if family:
            existing = _registry.get(family)
            if existing is not None and existing.__qualname__ != cls.__qualname__:
                raise TypeError(f"task family {family!r} is defined twice: {existing} and {cls}")
            _registry[family] = cls

    @classmethod
    def task_module(cls) -> str:
        return cls.__module__

    def significant_params(self) -> dict[str, Any]:
        """Field name → value for every field that is part of the task's identity."""
        return {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name not in self.insignificant
        }

    def identity(self, extra: Mapping[str, Any] | None = None) -> TaskIdentity:
        """The identity of the task with these parameters plus per-task extras (source, inputs)."""
        params = self.significant_params()
        if extra:
            clash = set(params) & set(extra)
            if clash:
                raise ValueError(f"extra task parameters shadow config fields: {sorted(clash)}")
            params.update(extra)
        return TaskIdentity.build(self.task_module(), self.task_family, params)

    def identities(self, extras: Sequence[Mapping[str, Any]]) -> list[TaskIdentity]:
        """Identities of many tasks with these parameters plus per-task extras (fast path)."""
        return TaskIdentity.build_many(
            self.task_module(), self.task_family, self.significant_params(), extras
        )

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> tuple[AstraConfig, dict[str, str]]:
        """Rebuild the config from stored parameter strings.

        Returns the config and the parameters that are not config fields (source, inputs...).
        """
        values: dict[str, Any] = {}
        rest: dict[str, str] = {}
        for name, text in params.items():
            field = cls.model_fields.get(name)
            if field is None:
                rest[name] = text
                continue
            values[name] = _parse(field.annotation, text, name)
        return cls(**values), rest


class SourceTaskConfig(AstraConfig):
    """Parameters of per-source tasks (partitioned assets)."""

    insignificant: ClassVar[frozenset[str]] = frozenset({"force", "only_sources"})

    only_sources: list[str] = Field(
        default=[],
        description="Run only these source_ids of the selected partitions (others are left alone).",
    )


def _string_problem(value: Any) -> str | None:
    if isinstance(value, str):
        if "\x00" in value:
            return "contains a NUL character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid UTF-8"
        return None
    if isinstance(value, list | tuple):
        return next((p for p in map(_string_problem, value) if p), None)
    if isinstance(value, dict):
        return next((p for p in map(_string_problem, [*value.keys(), *value.values()]) if p), None)
    return None


def _parse(annotation: Any, text: str, name: str) -> Any:
    """Invert :func:`serialize_parameter` for a field of the given type."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional and text == "":
        return None
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    base_origin = typing.get_origin(base) or base
    value: Any = text
    if base_origin in (list, tuple, dict):
        value = json.loads(text)
    try:
        return TypeAdapter(base).validate_python(value)
    except Exception as exc:
        raise ValueError(f"stored parameter {name}={text!r} does not fit {base}: {exc}") from exc


def config_class(family: str, module: str | None = None) -> type[AstraConfig]:
    """The Config class of a task family (importing its module first when given)."""
    if family not in _registry and module:
        importlib.import_module(module)
    try:
        return _registry[family]
    except KeyError:
        raise KeyError(f"no task family {family!r} is defined") from None


def registered_families() -> dict[str, type[AstraConfig]]:
    return dict(_registry)
