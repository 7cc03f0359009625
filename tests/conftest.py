"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# --- data (tasks / sampling tests) ------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory: $FEWTUNE_DATA_DIR, else <repo>/../shared/data; skip if absent."""
    path = Path(os.environ.get("FEWTUNE_DATA_DIR") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        if os.environ.get("CI"):  # in CI the data must be there: a silent skip would hide it
            pytest.fail(f"real data not found at {path} (set FEWTUNE_DATA_DIR)")
        pytest.skip(f"real data not found at {path} (set FEWTUNE_DATA_DIR)")
    return path


# --- models (shared by unit tests) ------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (local, no hub)."""
    from fewtune.models.loading import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture()
def tiny_lm():
    """A fresh tiny randomly initialised Llama with the real tokenizer (seeded)."""
    from fewtune.models.loading import load_model

    return load_model("tiny-random", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spin-waiting makes them several times slower; restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
