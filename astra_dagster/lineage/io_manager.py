"""The lineage IO manager: closes a batch (its results were streamed by ``run_tasks``) or writes a
single task's result, and records the materialisation metadata."""

from __future__ import annotations

import time
from typing import Any

import dagster as dg
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from astra_dagster.db.connection import connect
from astra_dagster.lineage import store
from astra_dagster.lineage.batch import TaskBatch
from astra_dagster.lineage.sources import ranges_of

RESULT_TABLE_KEY = "astra/result_table"
#: Definition metadata: "many" when the result table holds several rows per task.
RESULT_ROWS_KEY = "astra/result_rows"
TASK_PK_KEY = "astra/task_pk"


class AstraIOManager(dg.ConfigurableIOManager):
    """Writes a :class:`TaskBatch` (results, statuses, durations, batch counts) atomically and
    loads results back for downstream assets.

    Partitioned inputs load, per source of the requested blocks, the newest succeeded task of
    the upstream asset with its result row; unpartitioned inputs load the result of the task the
    upstream's latest materialisation recorded.
    """

    database_url: str | None = None

    def handle_output(self, context: dg.OutputContext, obj: TaskBatch | None) -> None:
        if obj is None:
            return
        if not isinstance(obj, TaskBatch):
            raise TypeError(
                f"{context.asset_key.to_user_string()}: the Astra IO manager stores TaskBatch "
                f"objects from run_tasks(), got {type(obj).__name__}"
            )
        try:
            with connect(self.database_url) as conn, conn.transaction():
                # streamed batches wrote their results chunk by chunk; single tasks write here
                report = store.finish_tasks(conn, obj.table, obj.outcomes, force=obj.force,
                                            run_id=obj.run_id or context.run_id)
                n_computed = obj.streamed.written + report.written
                n_failed = obj.streamed.failed + report.failed
                n_skipped = obj.n_skipped + obj.streamed.already_done + report.already_done
                if obj.parent_pk is not None:
                    store.finish_parent(
                        conn, obj.parent_pk, time.perf_counter() - obj.started,
                        partition_first=obj.partition_first, partition_last=obj.partition_last,
                        n_sources=obj.n_items, n_computed=n_computed, n_skipped=n_skipped,
                        n_failed=n_failed, run_id=obj.run_id or context.run_id,
                    )
        except Exception as exc:
            if obj.parent_pk is not None:
                with connect(self.database_url) as conn:
                    store.fail_task(conn, obj.parent_pk, f"{type(exc).__name__}: {exc}",
                                    time.perf_counter() - obj.started, run_id=context.run_id)
            raise
        finally:
            if obj.lease and obj.run_id:
                store.release_run_lease(obj.run_id)
                obj.lease = False
        metadata: dict[str, Any] = {
            "astra/family": obj.family,
            "astra/computed": n_computed,
            "astra/skipped": n_skipped,
            "astra/failed": n_failed,
            "astra/sources" if obj.parent_pk is not None else "astra/tasks": obj.n_items,
        }
        if obj.parent_pk is not None:
            # rows this run wrote; a single task (a model, a summary) states its own row count
            metadata["dagster/row_count"] = n_computed
        if obj.parent_task_id:
            metadata["astra/batch_task_id"] = obj.parent_task_id
        if obj.single_task:
            metadata[TASK_PK_KEY] = obj.single_task[0]
            metadata["astra/task_id"] = obj.single_task[1]
        context.add_output_metadata(metadata)
        context.log.info(
            f"{obj.family}: {n_computed} computed, {n_skipped} skipped, {n_failed} failed"
            f" of {obj.n_items}"
        )

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        table = (upstream.definition_metadata or {}).get(RESULT_TABLE_KEY) if upstream else None
        if table is None:
            raise ValueError(
                f"{context.asset_key.to_user_string()} has no '{RESULT_TABLE_KEY}' metadata: "
                "the Astra IO manager cannot tell which table holds its results"
            )
        table = getattr(table, "value", table)
        rows_kind = (upstream.definition_metadata or {}).get(RESULT_ROWS_KEY)
        many = getattr(rows_kind, "value", rows_kind) == "many"
        asset_key = context.asset_key.to_user_string()
        with connect(self.database_url) as conn:
            if context.has_asset_partitions:
                return load_partition_results(conn, asset_key, table, context.asset_partition_keys,
                                              many=many)
            event = context.instance.get_latest_materialization_event(context.asset_key)
            meta = event.asset_materialization.metadata if event and event.asset_materialization else {}
            task_pk = meta.get(TASK_PK_KEY)
            if task_pk is None:
                raise ValueError(f"{asset_key} has no materialisation with an Astra task yet")
            return load_task_result(conn, table, int(getattr(task_pk, "value", task_pk)))


def _table_sql(table: str) -> sql.Composed:
    schema, name = store.qualified_table(table)
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def load_task_result(conn: psycopg.Connection, table: str, task_pk: int) -> dict[str, Any]:
    """The result row of one task, with its task_pk and task_id."""
    query = sql.SQL(
        "select t.pk as task_pk, t.task_id, r.* from astra.task t "
        "join {} r on r.output_pk = t.output_pk where t.pk = %s"
    ).format(_table_sql(table))
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query, (task_pk,)).fetchone()
    if row is None:
        raise LookupError(f"task {task_pk} has no row in {table}")
    return row


def load_partition_results(
    conn: psycopg.Connection, asset_key: str, table: str, partition_keys: Any, *, many: bool = False
) -> dict[int, dict[str, Any]]:
    """source_pk → the newest succeeded result of ``asset_key`` for the sources of the blocks.

    With ``many`` (tables holding several rows per task, e.g. one per spectrum) each value is
    ``{"source_id", "task_pk", "task_id", "rows": [...]}`` with the rows in insertion order.
    """
    bounds = ranges_of(sorted(partition_keys))
    query = sql.SQL(
        """
        with latest as (
            select distinct on (t.source_pk) t.source_pk, t.pk as task_pk, t.task_id, t.output_pk
            from unnest(%s::bigint[], %s::bigint[]) as b(lo, hi)
            join astra.task t on t.source_pk between b.lo and b.hi
            where t.asset_key = %s and t.status_code = %s
            order by t.source_pk, t.modified desc, t.pk desc
        )
        select l.source_pk, s.source_id, l.task_pk, l.task_id, r.*
        from latest l
        join astra.source s on s.pk = l.source_pk
        join {} r on r.output_pk = l.output_pk
        order by l.source_pk, {}
        """
    ).format(_table_sql(table),
             # rows keep the order they were written in: by their own serial pk where they have one
             sql.SQL("r.pk" if "pk" in store.table_columns(conn, table) else "r.ctid"))
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            query,
            ([lo for lo, _ in bounds], [hi for _, hi in bounds], asset_key, store.STATUS_SUCCESS),
        ).fetchall()
    if not many:
        return {row["source_pk"]: row for row in rows}
    grouped: dict[int, dict[str, Any]] = {}
    for row in rows:
        entry = grouped.setdefault(row["source_pk"], {
            "source_pk": row["source_pk"], "source_id": row["source_id"],
            "task_pk": row["task_pk"], "task_id": row["task_id"], "rows": [],
        })
        entry["rows"].append(row)
    return grouped
