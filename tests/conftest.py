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


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return data_dir_or_skip()


@pytest.fixture(scope="session")
def tiny():
    """``(model, tokenizer)`` of tiny-llama; tests must not modify the model in place."""
    from llm_influence.models import load_model

    model, tokenizer, _ = load_model("tiny-llama")
    return model, tokenizer
