"""Policy-aware asset backfills through the Dagster webserver's GraphQL API.

``dagster job backfill`` makes one run per partition and ignores backfill policies; asset
backfills (what the UI launches) honour them but have no CLI. ``astra backfill`` posts the same
``launchPartitionBackfill`` mutation the UI does, optionally split into chunks of partitions, and
can wait for the backfills to finish.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LAUNCH = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
  }
}
"""

PARTITION_KEYS = """
query($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    __typename
    ... on AssetNode { partitionKeys }
    ... on AssetNotFoundError { message }
  }
}
"""

STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { id status numPartitions }
    ... on PythonError { message }
    ... on BackfillNotFoundError { message }
  }
}
"""

DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


class BackfillError(RuntimeError):
    """The webserver refused or could not be reached."""


@dataclass(frozen=True)
class Backfill:
    backfill_id: str
    partitions: list[str]


def graphql(url: str, query: str, variables: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BackfillError(f"cannot reach the Dagster webserver at {url}: {reason}") from exc
    if payload.get("errors"):
        raise BackfillError(f"{url}: {payload['errors'][0].get('message', payload['errors'][0])}")
    return payload["data"]


def asset_path(key: str) -> list[str]:
    return key.split("/")


def partition_keys(url: str, asset_key: str) -> list[str]:
    """All partition keys of an asset, in the order Dagster keeps them."""
    node = graphql(url, PARTITION_KEYS, {"key": {"path": asset_path(asset_key)}})["assetNodeOrError"]
    if node["__typename"] != "AssetNode":
        raise BackfillError(f"{asset_key}: {node.get('message', node['__typename'])}")
    return node["partitionKeys"]


def select_range(keys: Sequence[str], first: str | None, last: str | None) -> list[str]:
    """The keys from ``first`` to ``last`` inclusive (either may be None for open ends)."""
    for key in (first, last):
        if key and key not in keys:
            raise BackfillError(f"partition {key} is not a partition of the asset")
    start = keys.index(first) if first else 0
    stop = keys.index(last) if last else len(keys) - 1
    if stop < start:
        raise BackfillError(f"partition range {first}...{last} is empty (the end comes before the start)")
    return list(keys[start : stop + 1])


def launch(
    url: str,
    assets: Sequence[str],
    partitions: Sequence[str],
    *,
    chunk: int | None = None,
    run_config: dict[str, Any] | None = None,
    title: str | None = None,
) -> list[Backfill]:
    """Launch one asset backfill per chunk of partitions; returns their ids."""
    if not partitions:
        raise BackfillError("no partitions selected")
    size = chunk or len(partitions)
    launched = []
    for start in range(0, len(partitions), size):
        part = list(partitions[start : start + size])
        params: dict[str, Any] = {
            "assetSelection": [{"path": asset_path(a)} for a in assets],
            "partitionNames": part,
            "title": title or f"astra backfill {part[0]}...{part[-1]}",
            "description": f"{len(part)} partitions of {', '.join(assets)} (astra backfill)",
        }
        if run_config:
            params["runConfigData"] = run_config
        result = graphql(url, LAUNCH, {"params": params})["launchPartitionBackfill"]
        if result["__typename"] != "LaunchBackfillSuccess":
            reason = result.get("message") or "; ".join(e["message"] for e in result.get("errors", []))
            raise BackfillError(f"backfill of {part[0]}...{part[-1]} refused: "
                                f"{reason or result['__typename']}")
        launched.append(Backfill(result["backfillId"], part))
    return launched


def wait(
    url: str,
    backfills: Sequence[Backfill],
    *,
    timeout: float = 3600.0,
    poll: float = 2.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, str]:
    """Poll until every backfill ends; returns backfill id → final status."""
    deadline = time.monotonic() + timeout
    status: dict[str, str] = {}
    while True:
        for backfill in backfills:
            if status.get(backfill.backfill_id) in DONE:
                continue
            node = graphql(url, STATUS, {"id": backfill.backfill_id})["partitionBackfillOrError"]
            if node["__typename"] != "PartitionBackfill":
                raise BackfillError(f"backfill {backfill.backfill_id}: {node.get('message')}")
            status[backfill.backfill_id] = node["status"]
        done = sum(1 for s in status.values() if s in DONE)
        if on_progress:
            on_progress(done, len(backfills))
        if done == len(backfills):
            return status
        if time.monotonic() > deadline:
            raise BackfillError(f"backfills still running after {timeout:g} s: "
                                + ", ".join(k for k, v in status.items() if v not in DONE))
        time.sleep(poll)
