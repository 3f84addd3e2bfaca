"""Shared fixtures: one embedded PostgreSQL for the session, under a temporary ASTRA_HOME."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Science code must not oversubscribe the 2-core CI machine.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# The suite already runs one pytest worker per core: steps compute in their own process unless a
# test asks for a pool (test_workers.py does).
os.environ.setdefault("ASTRA_WORKERS", "1")


@pytest.fixture(scope="session")
def astra_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private ASTRA_HOME (embedded server, Dagster home) for the whole test session."""
    from astra_dagster.db.connection import close_pools
    from astra_dagster.db.embedded import stop_server

    home = tmp_path_factory.mktemp("astra_home")
    saved = {k: os.environ.get(k) for k in ("ASTRA_HOME", "DAGSTER_HOME", "ASTRA_DATABASE_URL",
                                            "ASTRA_DAGSTER_DATABASE_URL")}
    os.environ["ASTRA_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    os.environ.pop("ASTRA_DATABASE_URL", None)
    os.environ.pop("ASTRA_DAGSTER_DATABASE_URL", None)
    yield home
    close_pools()
    stop_server(home)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def database(astra_home: Path) -> str:
    """URL of the session's Astra database, schema loaded."""
    from astra_dagster.db.connection import database_url
    from astra_dagster.db.schema import ensure_schema

    url = database_url()
    ensure_schema(url)
    return url


def truncate_all(url: str) -> None:
    from astra_dagster.db.connection import connect

    with connect(url) as conn:
        tables = conn.execute(
            "select quote_ident(table_schema) || '.' || quote_ident(table_name) "
            "from information_schema.tables where table_schema in ('astra', 'astra_test') "
            "and table_type = 'BASE TABLE' and table_name <> 'schema_version'"
        ).fetchall()
        conn.execute("truncate " + ", ".join(t[0] for t in tables) + " restart identity cascade")


@pytest.fixture
def clean_db(database: str) -> str:
    """The session database, emptied (pks restart at 1)."""
    truncate_all(database)
    return database


# ---------------------------------------------------------------------------------------------------------
# Trained models: one per session, cached on disk by their training parameters and code (model_cache).


@pytest.fixture(scope="session")
def payne_model():
    from astra_dagster.methods import thepayne as tp
    from astra_dagster_tests import model_cache as mc

    return mc.cached_model("thepayne", mc.PAYNE_TRAINING, tp.train_model, tp.PayneModel.read)


@pytest.fixture(scope="session")
def apogeenet_model():
    from astra_dagster.methods import apogeenet as an
    from astra_dagster_tests import model_cache as mc

    return mc.cached_model("apogeenet", mc.APOGEENET_TRAINING, an.train_model, an.ApogeeNet.read)


@pytest.fixture(scope="session")
def ferre_grid():
    from astra_dagster.methods import ferre
    from astra_dagster_tests import model_cache as mc

    return mc.cached_model("ferre", mc.FERRE_TRAINING, ferre.train_model, ferre.FerreGrid.read)


@pytest.fixture(scope="session")
def cannon_model():
    from astra_dagster.methods.thecannon import CannonModel
    from astra_dagster_tests import model_cache as mc

    return mc.cached_model("thecannon", mc.CANNON_TRAINING, mc.train_cannon, CannonModel.read)
