"""Shared fixtures. The 135M default model is loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the Hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_configure(config):
    """Under pytest-xdist (README's ``-n 2``) the workers share the cores: one worker's torch threads
    must not oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def lm():
    import locate

    return locate.default_model()


@pytest.fixture(scope="session")
def tokenizer(lm):
    return lm.tokenizer


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(params=["gpt2", "gpt_neox", "llama", "gptj", "qwen2"])
def tiny(request, tokenizer):
    from locate.testing import tiny_model

    return tiny_model(request.param, tokenizer)


@pytest.fixture(scope="module")
def cache(tokenizer, tmp_path_factory):
    """A private LOCATE_EDIT_CACHE for one test module (its trained editors and derived caches), set
    after the default model's tokenizer is loaded; a module that asks for it never reads the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LOCATE_EDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
