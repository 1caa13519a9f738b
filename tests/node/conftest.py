"""Fixtures of the node tests: a migrated SQLite database in a temporary folder (unit tests of state and queue),
and one real PostgreSQL server for the session (tests/node/postgres.py) with a fresh database per test."""
from __future__ import annotations

import pytest

from riha_node.db import Database
from tests.node.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures, one server per session)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.peer)])
def database_url(request, tmp_path) -> str:
    """An empty database on each engine the node supports: the test runs once per engine (the PostgreSQL run is a
    `peer` test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'riha-node.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def engine_database(database_url):
    """The database of `database_url`, migrated."""
    db = Database(database_url)
    db.upgrade()
    yield db
    db.dispose()


@pytest.fixture
def database(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'riha-node.db'}")
    db.upgrade()
    yield db
    db.dispose()


@pytest.fixture
def node_database(node):
    """The migrated database of the test module's `node` fixture (a NodeProcess, configured, not started)."""
    database = node.database()
    yield database
    database.dispose()
