"""The Dagster code location: ``dagster dev -m astra_dagster.definitions`` (or workspace.yaml)."""

from __future__ import annotations

import dagster as dg

from astra_dagster.defs.examples import random_number_generator
from astra_dagster.lineage.io_manager import AstraIOManager

defs = dg.Definitions(
    assets=[random_number_generator],
    resources={"astra_io_manager": AstraIOManager()},
)
