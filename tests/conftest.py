"""Shared fixtures. Real data lives in ../shared/data (or $VITLAB_SHARED_DATA); tests that
need it skip with the reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tests run on tiny tensors in two pytest-xdist workers on a 2-core machine: one intra-op
# thread per worker avoids oversubscription, which made tiny forward passes 50x slower.
torch.set_num_threads(1)


def shared_data_dir() -> Path | None:
    env = os.environ.get("VITLAB_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data not found: set VITLAB_SHARED_DATA or put shared/data beside the repo")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
