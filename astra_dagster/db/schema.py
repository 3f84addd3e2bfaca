"""Loading ``sql/astradb.sql``: creates or upgrades the ``astra`` schema, idempotently."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import psycopg

from astra_dagster.db.connection import connect, database_url

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "sql" / "astradb.sql"
# An arbitrary constant: serialises concurrent schema loads across processes.
_ADVISORY_LOCK_KEY = 7_345_112_001

_checked: set[str] = set()
_checked_lock = threading.Lock()


def schema_sql() -> str:
    if not SCHEMA_FILE.exists():
        raise FileNotFoundError(
            f"{SCHEMA_FILE} is missing: install astra_dagster from its source tree (pip install -e .)"
        )
    return SCHEMA_FILE.read_text()


def schema_version() -> str:
    """The newest version the schema file records (its last schema_version insert)."""
    versions = re.findall(r"insert into astra\.schema_version \(version\) values \('([^']+)'\)",
                          schema_sql())
    if not versions:
        raise ValueError(f"{SCHEMA_FILE} records no schema_version")
    return versions[-1]


def init_schema(conn: psycopg.Connection) -> None:
    """Run the schema script in one transaction, serialised against other processes."""
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK_KEY,))
        conn.execute(schema_sql())


def is_current(conn: psycopg.Connection) -> bool:
    exists = conn.execute("select to_regclass('astra.schema_version')").fetchone()[0]
    if exists is None:
        return False
    row = conn.execute(
        "select 1 from astra.schema_version where version = %s", (schema_version(),)
    ).fetchone()
    return row is not None


def ensure_schema(url: str | None = None) -> None:
    """Create/upgrade the schema once per process and database, when it is not current."""
    url = url or database_url()
    with _checked_lock:
        if url in _checked:
            return
        with connect(url) as conn:
            if not is_current(conn):
                init_schema(conn)
        _checked.add(url)
