"""How a model file names the class that reads it (``module:QualName``): free of Dagster, so a
worker process can read a model without importing it."""

from __future__ import annotations

import importlib
from typing import Any


def class_path(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def import_class(name: str) -> Any:
    module, _, qualname = name.partition(":")
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target
