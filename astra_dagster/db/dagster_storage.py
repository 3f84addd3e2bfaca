"""Dagster instance storage on PostgreSQL with pooled connections.

dagster-postgres opens a new connection for every event (SQLAlchemy ``NullPool``); with one
materialisation event per partition that bookkeeping dominates range runs. These classes are the
dagster-postgres storages with a ``QueuePool`` swapped in, plugged in through Dagster's
``storage: custom:`` extension point in ``dagster.yaml`` (no fork of dagster-postgres).

Config (all optional): ``postgres_url`` (StringSource; default: the Astra server's Dagster
database, see :func:`astra_dagster.db.connection.dagster_database_url`), ``astra_home``,
``pool_size``, ``max_overflow``, ``should_autocreate_tables``.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sqlalchemy.exc as sa_exc
import sqlalchemy.pool as sa_pool
from dagster import Field, IntSource, StringSource
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.event_log import EventLogStorage
from dagster._core.storage.runs import RunStorage
from dagster._core.storage.schedules import ScheduleStorage
from dagster._serdes import ConfigurableClass, ConfigurableClassData
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.run_storage import PostgresRunStorage
from dagster_postgres.schedule_storage import PostgresScheduleStorage
from dagster_postgres.utils import create_pg_engine

DEFAULT_POOL_SIZE = 2
DEFAULT_MAX_OVERFLOW = 8
#: How long one connection attempt keeps retrying a server that refuses (dagster-postgres' own
#: loop retries 5 times with backoff on every event, ~80 s for a run whose server died).
RETRY_SECONDS = 2.0


def _pooled_engine(url: str, pool_size: int, max_overflow: int):
    engine = create_pg_engine(
        url,
        None,
        isolation_level="AUTOCOMMIT",
        poolclass=sa_pool.QueuePool,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        pool_recycle=3600,
    )
    # Connections must never cross a fork: a child process starts with an empty pool.
    ref = weakref.ref(engine)

    def _forget_parent_connections() -> None:
        alive = ref()
        if alive is not None:
            alive.dispose(close=False)

    os.register_at_fork(after_in_child=_forget_parent_connections)
    return engine


_CONNECTION_ERRORS = (sa_exc.OperationalError, sa_exc.TimeoutError, sa_exc.InterfaceError)


def _connect_failing_fast(engine: Any, url: str) -> Any:
    """A connection within :data:`RETRY_SECONDS`, else :class:`DatabaseUnavailableError` naming
    the server; a server already found down in this process gets one attempt, not a retry loop."""
    from astra_dagster.db.connection import mark_down, mark_up, recently_down, unreachable

    deadline = time.monotonic() + (0.0 if recently_down(url) else RETRY_SECONDS)
    wait = 0.1
    while True:
        try:
            conn = engine.connect()
        except _CONNECTION_ERRORS as exc:
            if time.monotonic() + wait > deadline:
                mark_down(url)
                # from None: Dagster's CLI prints the whole chain; the reason is in the one line
                raise unreachable(url, exc) from None
            time.sleep(wait)
            wait *= 2
        else:
            mark_up(url)
            return conn


@contextmanager
def _fail_fast_connection(engine: Any, url: str) -> Iterator[Any]:
    from astra_dagster.db.connection import mark_down, unreachable

    conn = _connect_failing_fast(engine, url)
    try:
        yield conn
    except sa_exc.DBAPIError as exc:
        if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError):
            # Broken mid-statement: the server went away (or a statement was cancelled; the
            # probe tells which).
            from astra_dagster.db.connection import probe

            libpq = url.replace("postgresql+psycopg2://", "postgresql://", 1)
            reason = probe(libpq, timeout=2)
            if reason is not None:
                mark_down(url)
                raise unreachable(url, reason) from None
        raise
    finally:
        # Returning a dead connection to the pool fails too; the pool drops it.
        with contextlib.suppress(*_CONNECTION_ERRORS):
            conn.close()


class _Pooled:
    """Mixin: replace the NullPool engine that the dagster-postgres storage created, and fail
    fast with one clear line when the server is gone."""

    _engine: Any
    _astra_url: str

    def _use_pool(self, url: str, pool_size: int, max_overflow: int) -> None:
        self._engine.dispose()
        self._engine = _pooled_engine(url, pool_size, max_overflow)
        self._astra_url = url

    # dagster-postgres names it ``connect`` in run/schedule storage, ``_connect`` in the event log.
    def connect(self, *args: Any, **kwargs: Any) -> Any:
        return _fail_fast_connection(self._engine, self._url())

    def _connect(self) -> Any:
        return _fail_fast_connection(self._engine, self._url())

    def _url(self) -> str:
        # The parent's __init__ connects before _use_pool has run.
        return getattr(self, "_astra_url", None) or self.postgres_url  # type: ignore[attr-defined]


class PooledPostgresRunStorage(_Pooled, PostgresRunStorage):
    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True,
                 pool_size: int = DEFAULT_POOL_SIZE, max_overflow: int = DEFAULT_MAX_OVERFLOW):
        super().__init__(postgres_url, should_autocreate_tables)
        self._use_pool(postgres_url, pool_size, max_overflow)


class PooledPostgresEventLogStorage(_Pooled, PostgresEventLogStorage):
    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True,
                 pool_size: int = DEFAULT_POOL_SIZE, max_overflow: int = DEFAULT_MAX_OVERFLOW):
        super().__init__(postgres_url, should_autocreate_tables)
        self._use_pool(postgres_url, pool_size, max_overflow)


class PooledPostgresScheduleStorage(_Pooled, PostgresScheduleStorage):
    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True,
                 pool_size: int = DEFAULT_POOL_SIZE, max_overflow: int = DEFAULT_MAX_OVERFLOW):
        super().__init__(postgres_url, should_autocreate_tables)
        self._use_pool(postgres_url, pool_size, max_overflow)


def resolve_postgres_url(config: Mapping[str, Any]) -> str:
    """SQLAlchemy URL of Dagster's database from the storage config or the Astra settings."""
    from astra_dagster.db.connection import dagster_database_url, sqlalchemy_url
    from astra_dagster.settings import get_settings

    if config.get("postgres_url"):
        return sqlalchemy_url(config["postgres_url"])
    settings = get_settings()
    if config.get("astra_home"):
        from dataclasses import replace
        from pathlib import Path

        settings = replace(settings, astra_home=Path(config["astra_home"]))
    return sqlalchemy_url(dagster_database_url(settings))


class PooledPostgresStorage(DagsterStorage, ConfigurableClass):
    """Run, event-log and schedule storage on PostgreSQL, each with a small connection pool."""

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True,
                 pool_size: int = DEFAULT_POOL_SIZE, max_overflow: int = DEFAULT_MAX_OVERFLOW,
                 inst_data: ConfigurableClassData | None = None):
        self.postgres_url = postgres_url
        self._inst_data = inst_data
        args = (postgres_url, should_autocreate_tables, pool_size, max_overflow)
        self._run_storage = PooledPostgresRunStorage(*args)
        self._event_log_storage = PooledPostgresEventLogStorage(*args)
        self._schedule_storage = PooledPostgresScheduleStorage(*args)
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict[str, Field]:
        return {
            "postgres_url": Field(StringSource, is_required=False),
            "astra_home": Field(StringSource, is_required=False),
            "pool_size": Field(IntSource, is_required=False, default_value=DEFAULT_POOL_SIZE),
            "max_overflow": Field(IntSource, is_required=False, default_value=DEFAULT_MAX_OVERFLOW),
            "should_autocreate_tables": Field(bool, is_required=False, default_value=True),
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,
                          config_value: Mapping[str, Any]) -> PooledPostgresStorage:
        return cls(
            postgres_url=resolve_postgres_url(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            pool_size=config_value.get("pool_size", DEFAULT_POOL_SIZE),
            max_overflow=config_value.get("max_overflow", DEFAULT_MAX_OVERFLOW),
            inst_data=inst_data,
        )

    @property
    def event_log_storage(self) -> EventLogStorage:
        return self._event_log_storage

    @property
    def run_storage(self) -> RunStorage:
        return self._run_storage

    @property
    def schedule_storage(self) -> ScheduleStorage:
        return self._schedule_storage
