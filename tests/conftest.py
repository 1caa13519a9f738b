"""Fixtures shared by the whole suite: where the real data is, and a small real model trained once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"the real data set is expected at {SHARED_DATA} (see the README)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_checkpoint(tmp_path_factory) -> Path:
    """A real `tiny` checkpoint trained in this test session on phantom studies: small and quick, but a model that
    writes text, for the tests of everything around the model (worker, SR, export, retrain)."""
    from riha_model.api import train_model
    from riha_model.phantoms import write_phantoms

    folder = tmp_path_factory.mktemp("phantom-model")
    annotation = write_phantoms(folder / "data", 32, seed=7, image_size=64)
    checkpoint = folder / "tiny.ckpt"
    train_model(annotation, checkpoint, preset="tiny", epochs=2, batch_size=8, seed=7, device="cpu",
                config_overrides={"image_size": 64})
    return checkpoint
