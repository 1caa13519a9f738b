"""Fixtures shared by the whole suite: where the real data is, and a small real model trained once per session."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from riha_model.api import TrainResult, train_model
from riha_model.phantoms import write_phantoms

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"the real data set is expected at {SHARED_DATA} (see the README)"
    return SHARED_DATA


@dataclass(frozen=True)
class PhantomModel:
    annotation: Path  # the phantom studies it was trained on (annotation.json, images/ beside it)
    result: TrainResult


@pytest.fixture(scope="session")
def phantom_model(tmp_path_factory) -> PhantomModel:
    """A real `tiny` checkpoint trained in this test session on phantom studies: small and quick, a model that
    writes text, for the tests of everything around the model (API, CLI, worker, SR, export)."""
    folder = tmp_path_factory.mktemp("phantom-model")
    annotation = write_phantoms(folder / "data", 32, seed=7, image_size=64)
    result = train_model(annotation, folder / "tiny.riha", preset="tiny", epochs=2, batch_size=8, seed=7,
                         device="cpu", config_overrides={"image_size": 64})
    return PhantomModel(annotation=annotation, result=result)


@pytest.fixture(scope="session")
def phantom_checkpoint(phantom_model) -> Path:
    return phantom_model.result.checkpoint
