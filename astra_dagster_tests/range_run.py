"""One range run of ``lineage_assets.squares`` in a process of its own (a real Dagster run, in
process, on an ephemeral instance): ``python -m astra_dagster_tests.range_run KEYS CONFIG [START]``
with comma-separated partition keys, the asset's config as JSON and an optional common start time
(epoch seconds). Prints the materialisation's counts as one JSON line."""

import json
import sys
import time

import dagster as dg

from astra_dagster_tests import lineage_assets


def main() -> None:
    keys, config = sys.argv[1].split(","), json.loads(sys.argv[2])
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("source_blocks", keys)
    if len(sys.argv) > 3:
        time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
    result = lineage_assets.materialize_squares(instance, keys, config)
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    print(json.dumps({"run_id": result.run_id,
                      **{k: meta[k].value for k in ("astra/computed", "astra/skipped", "astra/failed")}}))


if __name__ == "__main__":
    main()
