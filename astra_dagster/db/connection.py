"""Where the Astra database is, and pooled psycopg 3 connections to it.

``ASTRA_DATABASE_URL`` wins when set; otherwise the embedded server under ``ASTRA_HOME`` is
started on demand with two databases: ``astra`` (our tables) and ``astra_dagster`` (Dagster's
instance storage). With an external URL, Dagster's database is the same server with the
database name suffixed ``_dagster`` (or ``ASTRA_DAGSTER_DATABASE_URL``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from astra_dagster.settings import Settings, get_settings

EMBEDDED_DATABASE = "astra"


class DatabaseUnavailableError(RuntimeError):
    """The Astra database cannot be reached; the message names the (masked) URL."""


def mask_password(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe to print or log)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def _database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "postgres"


def _ensure_database(server_url: str, database: str) -> None:
    """CREATE DATABASE if missing; safe when several processes race to do it."""
    try:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("select 1 from pg_database where datname = %s", (database,))
            if exists.fetchone():
                return
            # Another process may create it between our check and our create.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(database)))
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailableError(
            f"cannot reach PostgreSQL at {mask_password(server_url)}: {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_embedded_ready: dict[Path, str] = {}
_embedded_lock = threading.Lock()


def _embedded_server_url(settings: Settings) -> str:
    home = settings.astra_home.expanduser().resolve()
    with _embedded_lock:
        if home not in _embedded_ready:
            from astra_dagster.db.embedded import ensure_server

            try:
                url = ensure_server(home)
            except RuntimeError as exc:
                raise DatabaseUnavailableError(str(exc)) from exc
            for name in (EMBEDDED_DATABASE, EMBEDDED_DATABASE + "_dagster"):
                _ensure_database(url, name)
            _embedded_ready[home] = url
        return _embedded_ready[home]


def database_url(settings: Settings | None = None) -> str:
    """libpq URL of the Astra database (starts the embedded server when needed)."""
    settings = settings or get_settings()
    if settings.database_url:
        return settings.database_url
    return _with_database(_embedded_server_url(settings), EMBEDDED_DATABASE)


def dagster_database_url(settings: Settings | None = None) -> str:
    """libpq URL of the database holding Dagster's instance storage (created when missing)."""
    settings = settings or get_settings()
    explicit = os.environ.get("ASTRA_DAGSTER_DATABASE_URL")
    if explicit:
        return explicit
    if settings.database_url:
        name = _database_name(settings.database_url) + "_dagster"
        _ensure_database(settings.database_url, name)
        return _with_database(settings.database_url, name)
    return _with_database(_embedded_server_url(settings), EMBEDDED_DATABASE + "_dagster")


def sqlalchemy_url(url: str) -> str:
    """The same URL for SQLAlchemy with psycopg2 (dagster-postgres' NOTIFY fails on psycopg 3)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg2"))


# One pool per (process, URL): pools must not be shared across fork().
_pools: dict[tuple[int, str], ConnectionPool] = {}
_pools_lock = threading.Lock()


def _pool(url: str) -> ConnectionPool:
    key = (os.getpid(), url)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            # A direct connection first: fails fast with libpq's reason (the pool would only
            # report a timeout after retrying in the background).
            try:
                psycopg.connect(url, connect_timeout=10).close()
            except psycopg.Error as exc:
                raise DatabaseUnavailableError(
                    f"cannot reach the Astra database at {mask_password(url)}: {_first_line(exc)}"
                ) from exc
            pool = ConnectionPool(
                url, min_size=0, max_size=8, open=True, kwargs={"connect_timeout": 10},
                name=f"astra-{os.getpid()}",
            )
            _pools[key] = pool
        return pool


@contextmanager
def connect(url: str | None = None, *, timeout: float = 30.0) -> Iterator[psycopg.Connection]:
    """A pooled connection to the Astra database; commits on success, rolls back on error."""
    from psycopg_pool import PoolTimeout

    url = url or database_url()
    try:
        with _pool(url).connection(timeout=timeout) as conn:
            yield conn
    except PoolTimeout as exc:
        raise DatabaseUnavailableError(
            f"no connection to the Astra database at {mask_password(url)} within {timeout:g} s"
        ) from exc


def close_pools() -> None:
    """Close this process's pools (tests, or before stopping the embedded server)."""
    with _pools_lock:
        for key in [k for k in _pools if k[0] == os.getpid()]:
            _pools.pop(key).close()
