"""The partitions shared by every per-source asset: blocks of consecutive sources."""

import warnings

import dagster as dg

from astra_dagster.lineage.sources import block_bounds

#: Keys name blocks of consecutive astra.source pks ("00000001-00000100"); see lineage.sources.
SOURCE_BLOCKS = dg.DynamicPartitionsDefinition(name="source_blocks")

#: One run per selected range: `dagster asset materialize --partition-range` needs it, and a
#: range run writes its lineage in one batch instead of one run per block.
RANGE_POLICY = dg.BackfillPolicy.single_run()

# Every asset decorated with RANGE_POLICY (six of them) would repeat Dagster's "backfill_policy is
# in beta" warning at import; we chose the parameter knowingly, so say nothing about it, and only it.
warnings.filterwarnings(
    "ignore", message=r"Parameter `backfill_policy` of function `asset` is currently in beta",
    category=dg.BetaWarning,
)


def partition_range(context: dg.AssetExecutionContext) -> tuple[list[str], tuple[str, str]]:
    """The run's partition keys in source order and its (first, last) key."""
    keys = sorted(context.partition_keys, key=lambda k: block_bounds(k)[0])
    return keys, (keys[0], keys[-1])
