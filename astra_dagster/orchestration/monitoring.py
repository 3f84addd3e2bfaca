"""Run monitoring that notices dead runs: Dagster's default run launcher, plus a health check.

Dagster's monitoring daemon (enabled in the ``dagster.yaml`` that ``astra init`` writes, run by
``astra ui``) asks the run launcher whether each STARTED run's worker is alive, but the
``DefaultRunLauncher`` cannot say, so a run whose process was killed stayed STARTED forever.
:class:`AstraRunLauncher` answers from the process that started the run: the pid of its
``RUN_START`` event (the ``dagster asset materialize`` process, an ``astra`` command, or a run
worker of the code server). Gone, or reused by a process younger than the run, means FAILED,
and the daemon marks the run FAILURE within its poll interval.

The pid is only meaningful on the machine that ran the run: the check judges runs on the
embedded server (which is local to this machine by construction) and runs tagged with this
host; for others it answers "running" and leaves them to ``max_runtime_seconds``.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

import dagster as dg
import psutil
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._serdes import ConfigurableClassData

#: Run tag naming the host that runs it (checked against this host before judging a pid).
HOST_TAG = "astra/host"
#: A process younger than the run by more than this (seconds) is a reused pid, not the run's.
_CLOCK_SLACK = 2.0


class AstraRunLauncher(dg.DefaultRunLauncher):
    """The default launcher (runs in the code server's worker processes) that can tell the
    monitoring daemon when a run's process has died."""

    def __init__(self, inst_data: ConfigurableClassData | None = None, local_only: bool = True):
        self._local_only = local_only
        super().__init__(inst_data=inst_data)

    @classmethod
    def config_type(cls) -> dict:
        # local_only: false judges every run's pid on this host (single-machine deployments
        # with an external PostgreSQL).
        return {"local_only": dg.Field(bool, is_required=False, default_value=True)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData,
                          config_value: Mapping[str, Any]) -> AstraRunLauncher:
        return cls(inst_data=inst_data, local_only=config_value.get("local_only", True))

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        return worker_health(self._instance, run, local_only=self._local_only)


def _judged_here(instance: dg.DagsterInstance, run: dg.DagsterRun, local_only: bool) -> bool:
    host = run.tags.get(HOST_TAG)
    if host is not None:
        return host == socket.gethostname()
    if not local_only:
        return True
    storage = getattr(instance, "_storage", None)
    config = getattr(getattr(storage, "inst_data", None), "config_dict", None) or {}
    # The embedded server: no URL in the storage config (see instance.dagster_yaml).
    return not config.get("postgres_url") and not _external_database()


def _external_database() -> bool:
    from astra_dagster.settings import get_settings

    return get_settings().database_url is not None


def worker_health(instance: dg.DagsterInstance, run: dg.DagsterRun, *,
                  local_only: bool = True) -> CheckRunHealthResult:
    """Whether the process that started ``run`` is still alive (see the module's docstring)."""
    if not _judged_here(instance, run, local_only):
        return CheckRunHealthResult(WorkerStatus.RUNNING, "run on another host: not judged here")
    starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_START)
    if not starts or starts[0].dagster_event is None or starts[0].dagster_event.pid is None:
        return CheckRunHealthResult(WorkerStatus.RUNNING, "not started yet")
    pid, started = starts[0].dagster_event.pid, starts[0].timestamp
    try:
        process = psutil.Process(pid)
        created = process.create_time()
        if process.status() == psutil.STATUS_ZOMBIE:  # dead, its parent has not reaped it yet
            raise psutil.NoSuchProcess(pid)
    except psutil.NoSuchProcess:
        return CheckRunHealthResult(WorkerStatus.FAILED, f"the run's process (pid {pid}) is gone")
    if created > started + _CLOCK_SLACK:
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"the run's process (pid {pid}) is gone (the pid now names another process)")
    return CheckRunHealthResult(WorkerStatus.RUNNING, f"pid {pid} alive")
