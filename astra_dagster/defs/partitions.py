"""The partitions shared by every per-source asset: blocks of consecutive sources."""

import dagster as dg

from astra_dagster.lineage.sources import block_bounds

#: Keys name blocks of consecutive astra.source pks ("00000001-00000100"); see lineage.sources.
SOURCE_BLOCKS = dg.DynamicPartitionsDefinition(name="source_blocks")

#: One run per selected range: `dagster asset materialize --partition-range` needs it, and a
#: range run writes its lineage in one batch instead of one run per block.
RANGE_POLICY = dg.BackfillPolicy.single_run()


def partition_range(context: dg.AssetExecutionContext) -> tuple[list[str], tuple[str, str]]:
    """The run's partition keys in source order and its (first, last) key."""
    keys = sorted(context.partition_keys, key=lambda k: block_bounds(k)[0])
    return keys, (keys[0], keys[-1])
