"""A migrated SQLite database in a temporary folder, for unit tests of the node's state and queue."""
from __future__ import annotations

import pytest

from riha_node.db import Database


@pytest.fixture
def database(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'riha-node.db'}")
    db.upgrade()
    yield db
    db.dispose()
