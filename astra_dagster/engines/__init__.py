"""Where a step's per-source work runs: in the step's process, on a pool of worker processes of
this node (the default), or on a Dask cluster (a LocalCluster, a running scheduler, or Slurm jobs
through dask-jobqueue). Engines only compute; every lineage write stays in the step's process
(``astra_dagster.lineage``), so the schema and its guarantees are the same on every engine.
"""

from astra_dagster.engines.work import ChunkResult, ItemResult, Work, run_job

__all__ = ["ChunkResult", "ItemResult", "Work", "run_job"]
