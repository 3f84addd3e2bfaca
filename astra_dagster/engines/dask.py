"""Dask as the engine beyond one node: a LocalCluster (default), a running scheduler
(``ASTRA_DASK_SCHEDULER``), or Slurm jobs through dask-jobqueue's ``SLURMCluster``
(``ASTRA_DASK_CLUSTER=slurm`` and the ``ASTRA_SLURM_*`` settings below).

Workers only compute (``engines.work.run_job``); results come back to the step's process, which
writes them in chunks exactly as with the local pool. Workers need the same Python environment and
the data and model files at the same paths (a shared filesystem), but no database access.
"""

from __future__ import annotations

import atexit
import os
import shlex
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from astra_dagster.engines.work import ItemResult, Work, run_job
from astra_dagster.settings import Execution

#: Environment forwarded to Slurm-launched workers (the batch job starts a fresh shell).
_FORWARD = ("PYTHONPATH", "ASTRA_HOME", "ASTRA_CACHE_DIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
            "MKL_NUM_THREADS")


def slurm_options(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """SLURMCluster keyword arguments from ``ASTRA_SLURM_*`` (one Slurm job per node's worth of
    workers, like Astra's ``astra srun``)."""
    env = os.environ if environ is None else environ
    cores = int(env.get("ASTRA_SLURM_CORES", "1"))
    options: dict[str, Any] = {
        "queue": env.get("ASTRA_SLURM_PARTITION") or None,
        "account": env.get("ASTRA_SLURM_ACCOUNT") or None,
        "cores": cores,
        # one single-threaded worker process per core unless told otherwise
        "processes": int(env.get("ASTRA_SLURM_PROCESSES", str(cores))),
        "memory": env.get("ASTRA_SLURM_MEMORY", "2GB"),
        "walltime": env.get("ASTRA_SLURM_TIME", "01:00:00"),
        "python": env.get("ASTRA_SLURM_PYTHON", sys.executable),
        "job_script_prologue": [f"export {k}={shlex.quote(env[k])}" for k in _FORWARD if env.get(k)],
        "job_extra_directives": shlex.split(env.get("ASTRA_SLURM_EXTRA", "")),
        "log_directory": env.get("ASTRA_SLURM_LOG_DIR") or None,
    }
    if env.get("ASTRA_SLURM_INTERFACE"):
        options["interface"] = env["ASTRA_SLURM_INTERFACE"]
    return options


class DaskEngine:
    """One Dask client per process and setting, kept for every step of the process (a cluster
    costs seconds to start, Slurm jobs minutes to queue)."""

    _shared: ClassVar[dict[tuple, DaskEngine]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, execution: Execution):
        from distributed import Client, LocalCluster

        self.cluster: Any = None
        if execution.dask_scheduler:
            self.client = Client(execution.dask_scheduler)
            self.where = f"the Dask scheduler at {execution.dask_scheduler}"
        elif execution.dask_cluster == "slurm":
            from dask_jobqueue import SLURMCluster

            jobs = int(os.environ.get("ASTRA_SLURM_JOBS", "1"))
            self.cluster = SLURMCluster(**slurm_options())
            self.cluster.scale(jobs=jobs)
            self.client = Client(self.cluster)
            wanted = jobs * self.cluster._dummy_job.worker_processes
            self.client.wait_for_workers(wanted, timeout=float(os.environ.get("ASTRA_SLURM_WAIT", "600")))
            self.where = f"{wanted} Dask workers in {jobs} Slurm job(s)"
        else:
            self.cluster = LocalCluster(n_workers=execution.workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)
            self.where = f"a Dask LocalCluster of {execution.workers} workers"
        self.workers = max(1, len(self.client.scheduler_info().get("workers", {})) or execution.workers)

    @classmethod
    def shared(cls, execution: Execution) -> DaskEngine:
        key = (execution.dask_scheduler, execution.dask_cluster, execution.workers)
        with cls._lock:
            if key not in cls._shared:
                cls._shared[key] = cls(execution)
            return cls._shared[key]

    @classmethod
    def close_all(cls) -> None:
        with cls._lock:
            engines, cls._shared = list(cls._shared.values()), {}
        for engine in engines:
            engine.close()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def describe(self) -> str:
        return self.where

    def run(self, work: Work, jobs: Sequence[tuple[list[int], list[Any]]]
            ) -> Iterator[tuple[list[int], list[ItemResult]]]:
        from distributed import as_completed

        futures = {}
        for n, (indices, items) in enumerate(jobs):
            future = self.client.submit(run_job, work, items, key=f"astra-{work.key}-{n}", pure=False)
            futures[future] = (indices, items)
        for future in as_completed(futures):
            indices, items = futures.pop(future)
            try:
                results = future.result()
            except Exception as exc:  # e.g. KilledWorker: the job's workers died repeatedly
                results = [ItemResult(None, f"Dask worker failed ({type(exc).__name__}: {exc}) while computing "
                                            f"{getattr(item, 'source_id', None) or 'its task'}", 0.0)
                           for item in items]
            yield indices, results


atexit.register(DaskEngine.close_all)
