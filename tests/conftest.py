"""Shared fixtures: the data directory and tiny-llama (loaded once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_DIR = os.environ.get("LLM_INFLUENCE_DATA")


def data_dir_or_skip() -> Path:
    if not DATA_DIR or not Path(DATA_DIR).is_dir():
        pytest.skip("set LLM_INFLUENCE_DATA to the shared data directory (../shared/data) to run this test")
    return Path(DATA_DIR)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run the tests on one intra-op thread (restored afterwards).

    The tests use tiny models and tensors: many small ops, for which one thread is fastest,
    and two OpenMP threads on a shared machine can stall on a descheduled thread.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return data_dir_or_skip()


@pytest.fixture(scope="session")
def tiny():
    """``(model, tokenizer)`` of tiny-llama; tests must not modify the model in place."""
    from llm_influence.models import load_model

    model, tokenizer, _ = load_model("tiny-llama")
    return model, tokenizer
