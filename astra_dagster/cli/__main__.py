"""``python -m astra_dagster.cli`` runs the ``astra`` command."""

from astra_dagster.cli.main import main

main()
