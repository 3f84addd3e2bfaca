"""thecannon (moved from methods/thecannon.py; split into modules next)."""

from astra_dagster.methods.thecannon.model import *  # noqa: F403
