"""Dagster's instance for Astra.

``dagster.yaml`` lives under ``DAGSTER_HOME`` (default ASTRA_HOME/dagster); storage is on the Astra
PostgreSQL server, in its own database, through pooled connections.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import yaml

from astra_dagster.settings import Settings, get_settings

#: Runs the daemon's queue starts at once.
MAX_CONCURRENT_RUNS = 4
#: Tag of the release sensor's model-training runs (one run per model).
TRAINING_TAG = "astra/training"
#: At most this many training runs at once: one queue slot always stays free for range runs.
MAX_TRAINING_RUNS = MAX_CONCURRENT_RUNS - 1
#: Seconds between the monitoring daemon's checks of running runs (Dagster's default is 120).
MONITORING_POLL_SECONDS = 10


def dagster_yaml(settings: Settings) -> dict:
    """The instance configuration ``astra init`` writes."""
    storage_config: dict = {}
    if os.environ.get("ASTRA_DAGSTER_DATABASE_URL"):
        storage_config["postgres_url"] = {"env": "ASTRA_DAGSTER_DATABASE_URL"}
    elif not settings.database_url:
        # The embedded server: pin its location so daemons started without ASTRA_HOME find it.
        storage_config["astra_home"] = str(settings.astra_home.expanduser().resolve())
    # else: derived at load time from ASTRA_DATABASE_URL (never write a password to disk)
    return {
        "storage": {
            "custom": {
                "module": "astra_dagster.db.dagster_storage",
                "class": "PooledPostgresStorage",
                "config": storage_config,
            }
        },
        "run_queue": {"max_concurrent_runs": MAX_CONCURRENT_RUNS,
                      "tag_concurrency_limits": [{"key": TRAINING_TAG, "limit": MAX_TRAINING_RUNS}]},
        # The default launcher plus a health check: the monitoring daemon (which `astra ui`
        # starts with `dagster dev`) marks a run FAILURE once the process that ran it is gone.
        "run_launcher": {"module": "astra_dagster.orchestration.monitoring", "class": "AstraRunLauncher"},
        "run_monitoring": {"enabled": True, "poll_interval_seconds": MONITORING_POLL_SECONDS,
                           "start_timeout_seconds": 180, "cancel_timeout_seconds": 180,
                           "max_resume_run_attempts": 0},
        "telemetry": {"enabled": False},
        "nux": {"enabled": False},
    }


def write_dagster_yaml(settings: Settings | None = None) -> Path:
    """Write (or refresh) ``dagster.yaml`` in the Dagster home; returns its path."""
    settings = settings or get_settings()
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    text = "# Written by `astra init`.\n" + yaml.safe_dump(dagster_yaml(settings), sort_keys=False)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".yaml.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def get_instance(settings: Settings | None = None) -> dg.DagsterInstance:
    """The persistent Dagster instance (writes dagster.yaml first if it is missing)."""
    settings = settings or get_settings()
    path = settings.dagster_home / "dagster.yaml"
    if not path.exists():
        write_dagster_yaml(settings)
    return dg.DagsterInstance.from_config(str(settings.dagster_home))
