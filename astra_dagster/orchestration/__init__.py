"""Running work through Dagster from Python and the shell: the instance (``instance``), tasks and
assets materialised in process (``build``), planned range runs (``planned_runs``) and policy-aware
backfills through the webserver (``backfill``)."""
