"""The unit of work an asset hands to :func:`~astra_dagster.lineage.batch.run_tasks`.

Free of Dagster: worker processes unpickle these without importing Dagster."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskItem:
    """One unit of work: usually one source with its input spectra."""

    payload: Any = None
    source_pk: int | None = None
    source_id: str | None = None
    #: Extra identity parameters besides the config (e.g. an input fingerprint, a model task_id).
    params: Mapping[str, Any] = field(default_factory=dict)
