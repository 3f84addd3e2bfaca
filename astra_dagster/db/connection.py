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
import time
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


def unreachable(url: str, reason: BaseException | str) -> DatabaseUnavailableError:
    """The one-line error for a server that went away: where it is (as ``astra db url`` prints
    it, password masked) and libpq's reason."""
    text = reason if isinstance(reason, str) else _first_line(getattr(reason, "orig", None) or reason)
    libpq = urlunsplit(urlsplit(url)._replace(scheme="postgresql"))
    return DatabaseUnavailableError(f"database unreachable at {mask_password(libpq)}: {text}")


# Per process: when a server was last found unreachable. While that is recent, callers get one
# connection attempt instead of a retry loop, so a dead server fails a run in seconds, not
# minutes of "Retrying failed database connection" per event.
_down_since: dict[str, float] = {}
DOWN_MEMORY_SECONDS = 30.0


def server_key(url: str) -> str:
    """Host, port and user of a URL: what tells two databases of one server apart from two servers."""
    parts = urlsplit(url)
    return f"{parts.username}@{parts.hostname}:{parts.port}?{parts.query}"


def mark_down(url: str) -> None:
    _down_since.setdefault(server_key(url), time.monotonic())


def mark_up(url: str) -> None:
    _down_since.pop(server_key(url), None)


def recently_down(url: str) -> bool:
    since = _down_since.get(server_key(url))
    return since is not None and time.monotonic() - since < DOWN_MEMORY_SECONDS


def probe(url: str, timeout: float = 3.0) -> str | None:
    """None when the server accepts a connection now; else libpq's reason (one line)."""
    try:
        psycopg.connect(url, connect_timeout=max(1, int(timeout)), autocommit=True).close()
    except psycopg.Error as exc:
        return _first_line(exc)
    return None


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
            reason = probe(url, timeout=10)
            if reason is not None:
                mark_down(url)
                raise unreachable(url, reason)
            pool = ConnectionPool(
                url, min_size=0, max_size=8, open=True, kwargs={"connect_timeout": 10},
                # An idle connection from before a server restart is found dead at checkout.
                check=ConnectionPool.check_connection,
                name=f"astra-{os.getpid()}",
            )
            _pools[key] = pool
        return pool


@contextmanager
def connect(url: str | None = None, *, timeout: float = 30.0) -> Iterator[psycopg.Connection]:
    """A pooled connection to the Astra database; commits on success, rolls back on error.

    A server that went away raises :class:`DatabaseUnavailableError` within seconds (not after
    ``timeout``): the pool is asked in short waits with a direct probe in between, and a
    connection that broke while in use is reported the same way.
    """
    from psycopg_pool import PoolTimeout

    from astra_dagster.orchestration.guard import aborted

    if (abort := aborted()) is not None:  # orphaned step: no more writes under its dead run
        raise abort
    url = url or database_url()
    if recently_down(url) and (reason := probe(url, timeout=2)) is not None:
        raise unreachable(url, reason)
    pool = _pool(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            # Short waits: a busy pool keeps us waiting up to ``timeout``, a dead server does not.
            conn = pool.getconn(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            break
        except PoolTimeout as exc:
            reason = probe(url, timeout=2)
            if reason is not None:
                mark_down(url)
                raise unreachable(url, reason) from exc
            if time.monotonic() >= deadline:
                raise DatabaseUnavailableError(
                    f"no connection to the Astra database at {mask_password(url)} within {timeout:g} s "
                    "(the server answers, but the pool is exhausted)"
                ) from exc
    try:
        yield conn
        conn.commit()
    except psycopg.OperationalError as exc:
        # OperationalError also covers cancelled statements and deadlocks: only a connection
        # that broke means the server went away.
        if conn.broken:
            mark_down(url)
            raise unreachable(url, exc) from exc
        _rollback(conn)
        raise
    except BaseException:
        _rollback(conn)
        raise
    else:
        mark_up(url)
    finally:
        pool.putconn(conn)  # the pool replaces a broken connection


def _rollback(conn: psycopg.Connection) -> None:
    if not (conn.broken or conn.closed):
        conn.rollback()


def close_pools() -> None:
    """Close this process's pools (tests, or before stopping the embedded server)."""
    with _pools_lock:
        for key in [k for k in _pools if k[0] == os.getpid()]:
            _pools.pop(key).close()
