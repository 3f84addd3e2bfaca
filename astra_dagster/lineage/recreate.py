"""Re-creating tasks from the database: their rows, parameters, outputs and Config."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from astra_dagster.lineage.identity import family_of
from astra_dagster.lineage.store import live_runs

# lineage.config (Dagster, and a method's Config module) is imported by rebuild_config only:
# `astra task show` reads rows and needs neither.
if TYPE_CHECKING:
    from astra_dagster.lineage.config import AstraConfig

STATUS_NAMES = {0: "created", 1: "success", 30: "failure", 40: "process failure",
                50: "broken", 60: "dependency missing"}


class UnknownTaskError(LookupError):
    """No task has this task_id or pk."""


@dataclass
class TaskRecord:
    pk: int
    task_module: str
    task_id: str
    task_hash: str
    status_code: int
    duration: float | None
    created: dt.datetime
    modified: dt.datetime
    output_pk: int | None
    error: str | None
    source_pk: int | None
    asset_key: str | None
    run_id: str | None
    parameters: dict[str, str] = field(default_factory=dict)
    output_table: str | None = None
    output: dict[str, Any] | None = None
    parent_task_ids: list[str] = field(default_factory=list)
    batch: dict[str, Any] | None = None
    #: For a task at status 0: True when no live process of its run holds the run's lease (the
    #: run died; the next run retries the task), False while its run is working on it.
    abandoned: bool | None = None

    @property
    def family(self) -> str:
        return family_of(self.task_id)

    @property
    def status_name(self) -> str:
        name = STATUS_NAMES.get(self.status_code, "unknown")
        if self.abandoned:
            return f"{name}; abandoned: run {self.run_id or 'unknown'} is no longer running, the next run retries it"
        if self.abandoned is False:
            return f"{name}; in progress in run {self.run_id}"
        return name


def find_task(conn: psycopg.Connection, ref: str) -> TaskRecord:
    """A task by task_id or pk, with parameters, output row and batch relations.

    Raises UnknownTaskError, and ValueError when a short task_id is ambiguous.
    """
    ref = ref.strip()
    with conn.cursor(row_factory=dict_row) as cur:
        if ref.isdigit():
            rows = cur.execute("select * from astra.task where pk = %s", (int(ref),)).fetchall()
        else:
            rows = cur.execute("select * from astra.task where task_id = %s order by pk",
                               (ref,)).fetchall()
    if not rows:
        raise UnknownTaskError(f"no task with {'pk' if ref.isdigit() else 'task_id'} {ref!r}")
    if len(rows) > 1:
        pks = ", ".join(str(r["pk"]) for r in rows)
        raise ValueError(f"task_id {ref!r} is shared by tasks {pks} (8-hex collision): use a pk")
    row = rows[0]
    record = TaskRecord(**{k: row[k] for k in TaskRecord.__dataclass_fields__ if k in row})
    record.parameters = dict(conn.execute(
        "select p.parameter_name, p.parameter_value from astra.task_parameter tp "
        "join astra.parameter p on p.pk = tp.parameter_pk where tp.task_pk = %s "
        "order by p.parameter_name",
        (record.pk,),
    ).fetchall())
    if record.output_pk is not None:
        record.output_table, record.output = find_output(conn, record.output_pk)
    record.parent_task_ids = [r[0] for r in conn.execute(
        "select t.task_id from astra.batch_interface b join astra.task t on t.pk = b.parent_task_pk "
        "where b.child_task_pk = %s order by t.pk", (record.pk,)).fetchall()]
    with conn.cursor(row_factory=dict_row) as cur:
        record.batch = cur.execute(
            "select * from astra.batch where task_pk = %s", (record.pk,)).fetchone()
    if record.status_code == 0:
        record.abandoned = not live_runs(conn, [record.run_id])
    return record


def output_tables(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """(schema, table) of every table whose output_pk references astra.output_interface."""
    rows = conn.execute(
        """
        select n.nspname, c.relname
        from pg_constraint k
        join pg_class c on c.oid = k.conrelid
        join pg_namespace n on n.oid = c.relnamespace
        where k.contype = 'f' and k.confrelid = 'astra.output_interface'::regclass
          and c.relname <> 'task'
        order by 1, 2
        """
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def find_output(conn: psycopg.Connection, output_pk: int) -> tuple[str | None, dict[str, Any] | None]:
    """The table and row holding an output, found through the foreign keys (as Astra did)."""
    for schema, table in output_tables(conn):
        query = sql.SQL("select * from {}.{} where output_pk = %s").format(
            sql.Identifier(schema), sql.Identifier(table))
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(query, (output_pk,)).fetchone()
        if row is not None:
            return f"{schema}.{table}", row
    return None, None


def rebuild_config(record: TaskRecord) -> tuple[AstraConfig, dict[str, str]]:
    """The task's Config rebuilt from its parameter rows, plus the non-config parameters.

    Raises ValueError when the rebuilt parameters no longer give the same task_id.
    """
    from astra_dagster.lineage.config import config_class

    cls = config_class(record.family, module=record.task_module)
    config, extra = cls.from_params(record.parameters)
    rebuilt = config.identity(extra)
    if rebuilt.task_id != record.task_id or rebuilt.task_hash != record.task_hash:
        raise ValueError(
            f"parameters of {record.task_id} rebuild {rebuilt.task_id}: "
            "the task family's parameters changed since it ran"
        )
    return config, extra
