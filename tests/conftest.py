"""Shared pytest fixtures, and what makes the suite safe and fast across pytest-xdist workers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# A shell's background job (``pytest … &`` without job control) starts with SIGINT ignored, and
# every process it starts inherits that: the Ctrl-C tests would wait forever for an interrupt
# that never comes. Give this process (and so the processes it starts) the default handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per worker (scripts/test.sh starts one worker per core): intra-op threads of
    # two workers on two cores only wait on each other. Set before torch is imported, and inherited
    # by the CLI subprocesses the tests start (a test that needs more passes --threads).
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_sessionstart(session: pytest.Session) -> None:
    """With several xdist workers, convert the installed embedded models once, here in the
    controller (xdist starts the workers after this, in its ``trylast`` sessionstart), instead of
    in every worker at once: the default model (most tests) and Gemma (its tokenizer tests).
    The file lock serialises this with other pytest sessions on the machine; the conversion writes
    a temporary directory and renames it, so a reader never sees half a model. A plain run
    converts lazily, where a test first needs a model; converted already: a cheap check."""
    if os.environ.get("PYTEST_XDIST_WORKER") or session.config.getoption("dist", "no") == "no":
        return
    from fewtune.models import embedded

    installed = [key for key, model in embedded.MODELS.items() if model.installed()]
    if not installed:
        return  # the tests that need one say so
    from filelock import FileLock

    from fewtune.models.loading import cache_dir, embedded_model_dir

    (cache_dir() / "models").mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir() / "models" / ".convert.lock")):
        for key in installed:
            embedded_model_dir(key)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Integration tests are slow tests too: the fast tier is ``-m "not slow"``."""
    for item in items:
        if item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.slow)


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
