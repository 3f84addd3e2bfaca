"""ferre (moved from methods/ferre.py; split into modules next)."""

from astra_dagster.methods.ferre.fit import *  # noqa: F403
