"""Fixtures shared by the whole suite: where the real data is, and how to find the real peers' binaries."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"the real data set is expected at {SHARED_DATA} (see the README)"
    return SHARED_DATA
