"""The Dagster code location: ``dagster dev -m astra_dagster.definitions`` (or workspace.yaml)."""

import dagster as dg

from astra_dagster.defs.checks import METHOD_CHECKS
from astra_dagster.defs.diagnostics import AstraDiagnosticsIOManager
from astra_dagster.defs.examples import random_number_generator
from astra_dagster.defs.labels import LABEL_ASSETS
from astra_dagster.defs.radial_velocity import doppler, doppler_templates
from astra_dagster.defs.sensors import release_sensor
from astra_dagster.defs.spectra import spectra, spectra_job
from astra_dagster.defs.summaries import SUMMARY_ASSETS
from astra_dagster.lineage.model_io import AstraModelIOManager

defs = dg.Definitions(
    assets=[random_number_generator, spectra, doppler_templates, doppler,
            *[a for pair in LABEL_ASSETS.items() for a in pair], *SUMMARY_ASSETS.values()],
    asset_checks=list(METHOD_CHECKS.values()),
    jobs=[spectra_job],
    sensors=[release_sensor],
    # the lineage IO manager, plus plots on the method assets' materialisations
    resources={"astra_io_manager": AstraDiagnosticsIOManager(), "astra_model_io_manager": AstraModelIOManager()},
)
