"""Model tests run torch on one thread: on two shared cores a second thread made small operations many times slower
(measured by bench/model.py and bench/e2e.py)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    torch.set_num_threads(1)
