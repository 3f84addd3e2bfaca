"""thepayne (moved from methods/thepayne.py; split into modules next)."""

from astra_dagster.methods.thepayne.training import *  # noqa: F403
