"""Task identity: a task is its family plus its significant parameters (contract 2).

``task_id = "<Namespace>.<Family>_<h>"`` with ``h`` the first 8 hex digits of the md5 of the
canonical JSON of the parameters serialised as strings the way luigi did, so the ids of the
original Astra documentation are reproduced exactly. Because 8 hex digits collide at survey
scale, the database key is ``task_hash``: the sha256 of the family and the same canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def serialize_parameter(value: Any) -> str:
    """A parameter value as luigi stored it: ints ``"3"``, floats ``repr``, bools
    ``"True"``/``"False"``, None ``""``, lists/tuples/dicts as compact JSON, strings verbatim."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"))
    # numpy scalars and the like: fall back to their Python value
    item = getattr(value, "item", None)
    if callable(item):
        return serialize_parameter(item())
    raise TypeError(f"cannot serialise parameter value {value!r} of type {type(value).__name__}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def canonical_json(params: Mapping[str, str]) -> str:
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"))


def short_hash(params: Mapping[str, str]) -> str:
    """First 8 hex digits of md5(canonical JSON), as luigi's ``hashify``."""
    return hashlib.md5(canonical_json(params).encode("utf-8")).hexdigest()[:8]


def full_hash(family: str, params: Mapping[str, str]) -> str:
    """sha256 over the family and the canonical parameters: the unique key of a task."""
    payload = family + "\n" + canonical_json(params)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def make_task_id(family: str, params: Mapping[str, str]) -> str:
    return f"{family}_{short_hash(params)}"


@dataclass(frozen=True)
class TaskIdentity:
    """Everything that makes a task the task it is."""

    module: str
    family: str
    params: Mapping[str, str] = field(repr=False)
    task_id: str
    task_hash: str = field(repr=False)

    @classmethod
    def build(cls, module: str, family: str, params: Mapping[str, Any]) -> TaskIdentity:
        return cls._from_strings(module, family, {str(k): serialize_parameter(v) for k, v in params.items()})

    @classmethod
    def build_many(
        cls, module: str, family: str, shared: Mapping[str, Any], per_task: Sequence[Mapping[str, Any]]
    ) -> list[TaskIdentity]:
        """Identities of many tasks sharing most parameters (serialises the shared ones once)."""
        common = {str(k): serialize_parameter(v) for k, v in shared.items()}
        identities = []
        for extra in per_task:
            strings = dict(common)
            for key, value in extra.items():
                if key in common:
                    raise ValueError(f"per-task parameter {key!r} shadows a shared parameter")
                strings[str(key)] = serialize_parameter(value)
            identities.append(cls._from_strings(module, family, strings))
        return identities

    @classmethod
    def _from_strings(cls, module: str, family: str, strings: dict[str, str]) -> TaskIdentity:
        canonical = canonical_json(strings).encode("utf-8")
        return cls(
            module=module,
            family=family,
            params=strings,
            task_id=f"{family}_{hashlib.md5(canonical).hexdigest()[:8]}",
            task_hash=hashlib.sha256(family.encode("utf-8") + b"\n" + canonical).hexdigest(),
        )


def family_of(task_id: str) -> str:
    """The family part of a task_id (the hash never contains an underscore)."""
    family, sep, digest = task_id.rpartition("_")
    if not sep or len(digest) != 8:
        raise ValueError(f"{task_id!r} is not a task_id of the form <Family>_<8 hex digits>")
    return family
