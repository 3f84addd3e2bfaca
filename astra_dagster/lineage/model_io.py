"""Trained models as task outputs: the file goes under ASTRA_HOME/models, its row into astra.model.

An asset returns a :class:`TaskBatch` whose successful result is ``{"model": obj, ...summary}``;
``obj`` has ``write(path)`` and its class a ``read(path)`` classmethod. This IO manager writes the
file atomically, replaces the object by its ``astra.model`` row (class, path, sha256, size) and
hands over to the lineage IO manager. Loading reads the model back with its task identity, so
downstream tasks can name the model's task_id among their parameters.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import dagster as dg

from astra_dagster.lineage import store
from astra_dagster.lineage.batch import TaskBatch
from astra_dagster.lineage.io_manager import AstraIOManager
from astra_dagster.lineage.model_class import class_path, import_class
from astra_dagster.settings import get_settings

MODEL_TABLE = "model"


@dataclass(frozen=True)
class LoadedModel:
    """A model task's output as a downstream asset gets it. ``model`` is read from its (checked)
    file on first use: a run whose sources are all memoised never reads it, nor imports its
    method's package (scipy, astropy...)."""

    task_pk: int
    task_id: str
    path: Path
    model_class: str
    summary: dict[str, Any]

    @functools.cached_property
    def model(self) -> Any:
        return import_class(self.model_class).read(self.path)


def checksum(path: Path) -> tuple[str, int]:
    """sha256 and size of a file, or of every file of a folder (sorted by name)."""
    digest = hashlib.sha256()
    size = 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(file.relative_to(path.parent).as_posix().encode() + b"\0")
        data = file.read_bytes()
        digest.update(data)
        size += len(data)
    return digest.hexdigest(), size


class AstraModelIOManager(AstraIOManager):
    """The lineage IO manager for model assets (writes the model file first)."""

    models_dir: str | None = None

    def _root(self) -> Path:
        return Path(self.models_dir) if self.models_dir else get_settings().astra_home / "models"

    def handle_output(self, context: dg.OutputContext, obj: TaskBatch | None) -> None:
        if isinstance(obj, TaskBatch):
            folder = self._root() / "_".join(context.asset_key.path)
            for outcome in obj.outcomes:
                result = outcome.result
                if outcome.status_code != store.STATUS_SUCCESS or not isinstance(result, dict):
                    continue
                if "model" not in result:
                    continue
                model = result.pop("model")
                name = obj.single_task[1] if obj.single_task else f"task-{outcome.task_pk}"
                path = folder / name
                _write_atomically(model, path)
                sha256, size = checksum(path)
                outcome.result = {"model_class": class_path(model), "path": str(path), "sha256": sha256,
                                  "size": size, "summary": json.dumps(result, default=str)}
        super().handle_output(context, obj)
        if isinstance(obj, TaskBatch):
            # A model that failed to train has its task row (status 30, error) now; the step fails
            # too, so the asset is not shown as materialised and nothing downstream loads it.
            failed = [o for o in obj.outcomes if o.status_code != store.STATUS_SUCCESS]
            if failed:
                raise dg.Failure(description=f"{obj.family}: training failed: {failed[0].error}")

    def load_input(self, context: dg.InputContext) -> LoadedModel:
        row = super().load_input(context)
        path = Path(row["path"])
        if not path.exists():
            raise FileNotFoundError(f"model file {path} of task {row['task_id']} is missing")
        if checksum(path)[0] != row["sha256"]:
            raise ValueError(f"model file {path} of task {row['task_id']} changed since it was written")
        summary = row.get("summary") or {}
        return LoadedModel(row["task_pk"], row["task_id"], path, row["model_class"],
                           summary if isinstance(summary, dict) else json.loads(summary))


def _write_atomically(model: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    model.write(tmp)
    if not tmp.exists():  # e.g. numpy.savez appends ".npz" to names without it
        written = [p for p in tmp.parent.glob(glob_escape(tmp.name) + ".*") if p != tmp]
        if len(written) != 1:
            raise RuntimeError(f"{type(model).__name__}.write({tmp}) wrote no file there")
        written[0].replace(tmp)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    tmp.replace(path)
