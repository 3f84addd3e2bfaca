"""Every write to the task tables happens here, in bulk.

Statements are set-based (``unnest`` arrays, ``= ANY(%s)``, ``COPY``): the number of round trips
per batch is constant, never one per task or per row.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from astra_dagster.lineage.identity import TaskIdentity

STATUS_CREATED = 0
STATUS_SUCCESS = 1
STATUS_FAILURE = 30


@dataclass(frozen=True)
class TaskRow:
    pk: int
    task_hash: str
    status_code: int
    output_pk: int | None
    #: True when the row was inserted by the statement that returned it (a brand-new task).
    created: bool = False
    #: The run that wrote the task's status (for status 0: the run working on it).
    run_id: str | None = None


@dataclass
class Outcome:
    """What happened to one task in this run (written by :func:`finish_tasks`)."""

    task_pk: int
    status_code: int  # STATUS_SUCCESS or STATUS_FAILURE
    duration: float
    error: str | None = None
    #: One result row (column → value), or a list of rows for tables with many rows per task.
    result: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class FinishReport:
    written: int  # results written by this call
    failed: int  # failures recorded by this call
    already_done: int  # finished concurrently by another process: nothing written


def qualified_table(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return (schema or "astra"), name


# ---------------------------------------------------------------------------- reads


def find_succeeded(conn: psycopg.Connection, module: str, hashes: Sequence[str]) -> dict[str, TaskRow]:
    """Tasks among ``hashes`` that already succeeded (one query)."""
    if not hashes:
        return {}
    rows = conn.execute(
        "select pk, task_hash, status_code, output_pk from astra.task "
        "where task_module = %s and task_hash = any(%s) and status_code = %s",
        (module, list(hashes), STATUS_SUCCESS),
    ).fetchall()
    return {r[1]: TaskRow(*r) for r in rows}


def find_tasks(conn: psycopg.Connection, module: str, hashes: Sequence[str]) -> dict[str, TaskRow]:
    """Existing tasks among ``hashes``, whatever their status, with their run (one query)."""
    if not hashes:
        return {}
    rows = conn.execute(
        "select pk, task_hash, status_code, output_pk, false, run_id from astra.task "
        "where task_module = %s and task_hash = any(%s)",
        (module, list(hashes)),
    ).fetchall()
    return {r[1]: TaskRow(*r) for r in rows}


def find_task(conn: psycopg.Connection, module: str, task_hash: str) -> TaskRow | None:
    row = conn.execute(
        "select pk, task_hash, status_code, output_pk from astra.task "
        "where task_module = %s and task_hash = %s",
        (module, task_hash),
    ).fetchone()
    return TaskRow(*row) if row else None


# ---------------------------------------------------------------------------- task creation


def _staging(conn: psycopg.Connection) -> None:
    """Per-session temp tables that bulk statements COPY into (emptied at every commit)."""
    conn.execute(
        "create temp table if not exists _astra_stage_parameter (name text, value text) "
        "on commit delete rows;"
        "create temp table if not exists _astra_stage_task (task_module text, task_id text, "
        "task_hash text, source_pk bigint) on commit delete rows"
    )
    conn.execute("truncate _astra_stage_parameter, _astra_stage_task")


def _copy_rows(
    conn: psycopg.Connection, statement: str, types: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    with conn.cursor().copy(statement) as copy:
        copy.set_types(list(types))
        for row in rows:
            copy.write_row(row)


def create_tasks(
    conn: psycopg.Connection,
    identities: Sequence[TaskIdentity],
    *,
    source_pks: Sequence[int | None] | None = None,
    asset_key: str | None = None,
    run_id: str | None = None,
) -> dict[str, TaskRow]:
    """Get-or-create task rows (status 0) with their parameter rows and links.

    Returns task_hash → row for every identity (existing tasks keep their status and output).
    ``run_id`` is recorded on new tasks only: an existing task keeps the run that produced its
    status and output until :func:`finish_tasks` writes this run's (a run that dies before then
    must not be named as their author).
    """
    if not identities:
        return {}
    if source_pks is None:
        source_pks = [None] * len(identities)
    # One row per task even if the caller repeats one: ON CONFLICT may touch a row only once.
    unique: dict[str, tuple[TaskIdentity, int | None]] = {}
    for ident, spk in zip(identities, source_pks, strict=True):
        unique.setdefault(ident.task_hash, (ident, spk))
    ordered = sorted(unique.values(), key=lambda pair: pair[0].task_hash)  # stable lock order

    _staging(conn)
    param_pks = _get_or_create_parameters(conn, (i.params.items() for i, _ in ordered))
    _copy_rows(conn, "copy _astra_stage_task from stdin (format binary)", ["text", "text", "text", "int8"],
               ((i.module, i.task_id, i.task_hash, spk) for i, spk in ordered))
    # xmax = 0 marks rows this statement inserted (as opposed to existing rows it updated).
    rows = conn.execute(
        """
        insert into astra.task as t (task_module, task_id, task_hash, source_pk, asset_key, run_id)
        select s.task_module, s.task_id, s.task_hash, s.source_pk, %s, %s
        from _astra_stage_task s order by s.task_hash
        on conflict (task_module, task_hash) do update
            -- a task at status 0 is now this run's to finish; a finished one keeps the run that
            -- wrote its status until this run writes a new one (finish_tasks)
            set modified = now(),
                run_id = case when t.status_code = 0 then coalesce(excluded.run_id, t.run_id) else t.run_id end
        returning pk, task_hash, status_code, output_pk, (xmax = 0) as created, run_id
        """,
        (asset_key, run_id),
    ).fetchall()
    tasks = {r[1]: TaskRow(*r) for r in rows}

    new_links: list[tuple[int, int]] = []
    old_links: list[tuple[int, int]] = []
    for ident, _ in ordered:
        row = tasks[ident.task_hash]
        links = new_links if row.created else old_links
        links.extend((row.pk, param_pks[pair]) for pair in ident.params.items())
    if new_links:  # nobody else can have linked a task this statement created
        _copy_rows(conn, "copy astra.task_parameter (task_pk, parameter_pk) from stdin (format binary)",
                   ["int8", "int8"], new_links)
    if old_links:
        conn.execute(
            "insert into astra.task_parameter (task_pk, parameter_pk) "
            "select * from unnest(%s::bigint[], %s::bigint[]) on conflict do nothing",
            ([t for t, _ in old_links], [p for _, p in old_links]),
        )
    return tasks


def _get_or_create_parameters(
    conn: psycopg.Connection, pairs_per_task: Iterable[Iterable[tuple[str, str]]]
) -> dict[tuple[str, str], int]:
    pairs = sorted({pair for pairs in pairs_per_task for pair in pairs})
    _copy_rows(conn, "copy _astra_stage_parameter from stdin (format binary)", ["text", "text"], pairs)
    rows = conn.execute(
        "insert into astra.parameter (parameter_name, parameter_value) "
        "select name, value from _astra_stage_parameter order by name, value "
        "on conflict do nothing returning pk, parameter_name, parameter_value"
    ).fetchall()
    found = {(r[1], r[2]): r[0] for r in rows}
    if len(found) < len(pairs):
        rows = conn.execute(
            """
            select p.pk, p.parameter_name, p.parameter_value
            from _astra_stage_parameter s
            join astra.parameter p
              on p.parameter_name = s.name and md5(p.parameter_value) = md5(s.value)
             and p.parameter_value = s.value
            """
        ).fetchall()
        found.update({(r[1], r[2]): r[0] for r in rows})
    missing = [p for p in pairs if p not in found]
    if missing:  # cannot happen unless rows are deleted concurrently; fail loudly
        raise RuntimeError(f"parameter rows vanished while linking: {missing[:3]}")
    return found


def link_batch(conn: psycopg.Connection, parent: TaskRow, child_pks: Sequence[int]) -> None:
    """Link children to their batch parent (COPY when the parent is brand new)."""
    child_pks = sorted(set(child_pks))
    if not child_pks:
        return
    if parent.created:
        _copy_rows(
            conn, "copy astra.batch_interface (parent_task_pk, child_task_pk) from stdin (format binary)",
            ["int8", "int8"], ((parent.pk, c) for c in child_pks),
        )
    else:
        conn.execute(
            "insert into astra.batch_interface (parent_task_pk, child_task_pk) "
            "select %s, c from unnest(%s::bigint[]) as c on conflict do nothing",
            (parent.pk, list(child_pks)),
        )


# ---------------------------------------------------------------------------- finishing


_columns_cache: dict[tuple[str, str, str], list[str]] = {}
_columns_lock = threading.Lock()


def table_columns(conn: psycopg.Connection, table: str) -> list[str]:
    schema, name = qualified_table(table)
    key = (conn.info.dsn, schema, name)
    with _columns_lock:
        if key not in _columns_cache:
            rows = conn.execute(
                "select column_name from information_schema.columns "
                "where table_schema = %s and table_name = %s order by ordinal_position",
                (schema, name),
            ).fetchall()
            if not rows:
                raise ValueError(f"result table {schema}.{name} does not exist")
            _columns_cache[key] = [r[0] for r in rows]
        return _columns_cache[key]


def _to_db(value: Any) -> Any:
    """numpy → plain Python for COPY (NaN stays NaN: real[] holds it)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_to_db(v) for v in value]
    return value


def finish_tasks(
    conn: psycopg.Connection,
    table: str,
    outcomes: Sequence[Outcome],
    *,
    force: bool = False,
    run_id: str | None = None,
) -> FinishReport:
    """Write results and final status of ``outcomes`` in the caller's transaction (``run_id``:
    the run that computed them, recorded on every task whose status this call writes).

    Each task written (result or failure) gets ``run_id``, the run that wrote it; tasks left
    alone (finished concurrently elsewhere) keep theirs.

    Task rows are locked first (in pk order), so when two processes finish the same task only
    the first writes a result; the second finds it succeeded and writes nothing. With
    ``force`` a succeeded task gets a new output and its old result row is deleted.
    """
    if not outcomes:
        return FinishReport(0, 0, 0)
    by_pk = {o.task_pk: o for o in outcomes}
    locked = conn.execute(
        "select pk, status_code, output_pk from astra.task where pk = any(%s) order by pk for update",
        (sorted(by_pk),),
    ).fetchall()
    if len(locked) != len(by_pk):
        raise RuntimeError(f"{len(by_pk) - len(locked)} task rows disappeared before finishing")

    to_write: list[Outcome] = []
    to_fail: list[Outcome] = []
    old_outputs: list[int] = []
    already_done = 0
    for pk, status, output_pk in locked:
        outcome = by_pk[pk]
        done = status == STATUS_SUCCESS
        if outcome.status_code == STATUS_SUCCESS:
            if done and not force:
                already_done += 1
                continue
            to_write.append(outcome)
            if output_pk is not None:
                old_outputs.append(output_pk)
        elif done:
            already_done += 1  # a failure here never overwrites a success elsewhere
        else:
            to_fail.append(outcome)

    new_outputs: list[int] = []
    if to_write:
        new_outputs = [
            r[0]
            for r in conn.execute(
                "insert into astra.output_interface (pk) "
                "select nextval(pg_get_serial_sequence('astra.output_interface', 'pk')) "
                "from generate_series(1, %s) returning pk",
                (len(to_write),),
            ).fetchall()
        ]
        _copy_results(conn, table, to_write, new_outputs)

    updates = [(o, out) for o, out in zip(to_write, new_outputs, strict=True)]
    updates += [(o, None) for o in to_fail]
    if updates:
        conn.execute(
            """
            update astra.task t
               set status_code = u.status, duration = u.duration, error = u.error,
                   output_pk = coalesce(u.output_pk, t.output_pk), modified = now(),
                   run_id = coalesce(%s, t.run_id)
              from unnest(%s::bigint[], %s::int[], %s::real[], %s::text[], %s::bigint[])
                   as u(pk, status, duration, error, output_pk)
             where t.pk = u.pk
            """,
            (
                run_id,
                [o.task_pk for o, _ in updates],
                [o.status_code for o, _ in updates],
                [float(o.duration) for o, _ in updates],
                [_storable(o.error) for o, _ in updates],
                [out for _, out in updates],
            ),
        )
    if old_outputs:
        schema, name = qualified_table(table)
        conn.execute(
            sql.SQL("delete from {}.{} where output_pk = any(%s)").format(
                sql.Identifier(schema), sql.Identifier(name)
            ),
            (old_outputs,),
        )
        conn.execute("delete from astra.output_interface where pk = any(%s)", (old_outputs,))
    return FinishReport(written=len(to_write), failed=len(to_fail), already_done=already_done)


def _storable(text: str | None) -> str | None:
    """An error message as PostgreSQL text can hold it: an exception's message may quote raw
    input (a NUL or a lone surrogate from a hostile file would fail the whole batch's write)."""
    if text is None:
        return None
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _result_rows(outcome: Outcome) -> list[Mapping[str, Any]]:
    """A result is one row (a mapping) or several (a list of mappings, e.g. one per spectrum)."""
    result = outcome.result
    if result is None:
        return [{}]
    if isinstance(result, Mapping):
        return [result]
    return list(result)


def _copy_results(
    conn: psycopg.Connection, table: str, outcomes: Sequence[Outcome], output_pks: Sequence[int]
) -> None:
    columns = [c for c in table_columns(conn, table) if c != "output_pk"]
    known = set(columns)
    rows_per_outcome = [_result_rows(o) for o in outcomes]
    used: list[str] = []
    for rows in rows_per_outcome:
        for row in rows:
            for name in row:
                if name not in known:
                    raise ValueError(f"result column {name!r} is not a column of {table}")
                if name not in used:
                    used.append(name)
    schema, name = qualified_table(table)
    statement = sql.SQL("copy {}.{} ({}) from stdin").format(
        sql.Identifier(schema),
        sql.Identifier(name),
        sql.SQL(", ").join(sql.Identifier(c) for c in ["output_pk", *used]),
    )
    with conn.cursor().copy(statement) as copy:
        for rows, out in zip(rows_per_outcome, output_pks, strict=True):
            for row in rows:
                copy.write_row([out, *(_to_db(row.get(c)) for c in used)])


def fail_task(conn: psycopg.Connection, task_pk: int, error: str, duration: float | None,
              *, run_id: str | None = None) -> None:
    """Mark one task failed (a batch parent whose step crashed), by run ``run_id``."""
    conn.execute(
        "update astra.task set status_code = %s, error = %s, duration = %s, modified = now(), "
        "run_id = coalesce(%s, run_id) where pk = %s",
        (STATUS_FAILURE, _storable(error), duration, run_id, task_pk),
    )


def finish_parent(
    conn: psycopg.Connection,
    parent_pk: int,
    duration: float,
    *,
    partition_first: str | None,
    partition_last: str | None,
    n_sources: int,
    n_computed: int,
    n_skipped: int,
    n_failed: int,
    run_id: str | None = None,
) -> None:
    """Close a batch parent: status, the whole step's duration and the per-batch counts."""
    error = f"{n_failed} of {n_computed + n_failed} sources failed" if n_failed else None
    conn.execute(
        "update astra.task set status_code = %s, duration = %s, error = %s, modified = now(), "
        "run_id = coalesce(%s, run_id) where pk = %s",
        (STATUS_SUCCESS, duration, error, run_id, parent_pk),
    )
    conn.execute(
        """
        insert into astra.batch as b (task_pk, partition_first, partition_last, n_sources,
                                      n_computed, n_skipped, n_failed)
        values (%s, %s, %s, %s, %s, %s, %s)
        on conflict (task_pk) do update set
            partition_first = excluded.partition_first, partition_last = excluded.partition_last,
            n_sources = excluded.n_sources, n_computed = excluded.n_computed,
            n_skipped = excluded.n_skipped, n_failed = excluded.n_failed
        """,
        (parent_pk, partition_first, partition_last, n_sources, n_computed, n_skipped, n_failed),
    )


def start_batch(
    conn: psycopg.Connection,
    parent_pk: int,
    *,
    partition_first: str | None,
    partition_last: str | None,
    n_sources: int,
    n_skipped: int,
) -> None:
    """The batch row of a parent that starts: counts grow with every chunk written."""
    conn.execute(
        """
        insert into astra.batch (task_pk, partition_first, partition_last, n_sources,
                                 n_computed, n_skipped, n_failed)
        values (%s, %s, %s, %s, 0, %s, 0)
        on conflict (task_pk) do update set
            partition_first = excluded.partition_first, partition_last = excluded.partition_last,
            n_sources = excluded.n_sources, n_computed = 0, n_skipped = excluded.n_skipped, n_failed = 0
        """,
        (parent_pk, partition_first, partition_last, n_sources, n_skipped),
    )


def write_chunk(
    conn: psycopg.Connection,
    table: str,
    outcomes: Sequence[Outcome],
    *,
    parent_pk: int | None,
    run_id: str | None,
    force: bool = False,
) -> FinishReport:
    """One chunk of finished tasks, in one transaction: results, statuses, durations, and the
    batch's running counts (so a batch's counts always match what it wrote, even if it dies)."""
    with conn.transaction():
        report = finish_tasks(conn, table, outcomes, force=force, run_id=run_id)
        if parent_pk is not None:
            conn.execute(
                "update astra.batch set n_computed = n_computed + %s, n_failed = n_failed + %s, "
                "n_skipped = n_skipped + %s where task_pk = %s",
                (report.written, report.failed, report.already_done, parent_pk),
            )
            conn.execute("update astra.task set modified = now() where pk = %s", (parent_pk,))
    return report


# ---------------------------------------------------------------------------- run leases
#
# A run step holds a shared advisory lock named after its run while it works on tasks. The lock
# lives on a connection of its own, so it goes away the moment the process dies (kill -9, OOM):
# a task left at status 0 whose run holds no lock is abandoned, and the next run retries it.


def run_lock_key(run_id: str) -> int:
    """The bigint advisory-lock key of a run."""
    return int.from_bytes(hashlib.sha256(b"astra-run\0" + run_id.encode()).digest()[:8], "big", signed=True)


_leases: dict[str, tuple[psycopg.Connection, int]] = {}
_leases_lock = threading.Lock()


def acquire_run_lease(url: str, run_id: str) -> None:
    """Mark ``run_id`` alive for as long as this process holds the lease (re-entrant)."""
    with _leases_lock:
        conn, count = _leases.get(run_id, (None, 0))
        if conn is None or conn.closed:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10,
                                   application_name=f"astra run lease {run_id[:8]}")
            conn.execute("select pg_advisory_lock_shared(%s)", (run_lock_key(run_id),))
            count = 0
        _leases[run_id] = (conn, count + 1)


def release_run_lease(run_id: str) -> None:
    with _leases_lock:
        conn, count = _leases.get(run_id, (None, 0))
        if conn is None:
            return
        if count > 1:
            _leases[run_id] = (conn, count - 1)
            return
        del _leases[run_id]
    # closing the session drops its advisory locks (if the server is gone, they went with it)
    with contextlib.suppress(Exception):
        conn.close()


def live_runs(conn: psycopg.Connection, run_ids: Iterable[str | None]) -> set[str]:
    """The runs among ``run_ids`` that some live process holds a lease for (one query)."""
    wanted = {r for r in run_ids if r}
    if not wanted:
        return set()
    held = {
        (int(hi) << 32) | int(lo)
        for hi, lo in conn.execute(
            "select classid::bigint, objid::bigint from pg_locks "
            "where locktype = 'advisory' and objsubid = 1 and granted"
        ).fetchall()
    }
    return {r for r in wanted if run_lock_key(r) % (1 << 64) in held}
