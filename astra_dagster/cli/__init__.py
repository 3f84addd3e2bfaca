"""The ``astra`` command line (``main``) and its demo (``demo``)."""

from astra_dagster.cli.main import main

__all__ = ["main"]
