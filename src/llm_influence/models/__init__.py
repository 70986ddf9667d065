"""Models: registry (embedded SmolLM2, tiny-llama, any HF model), LoRA, chat formatting."""

from .formatting import IGNORE_INDEX, ChatFormatter, Encoded, collate, model_inputs
from .lora import LoraSpec, attach_lora, load_adapter, lora_parameters
from .loss import per_example_loss
from .registry import BUILTIN, DEFAULT_MODEL, ModelSpec, load_model

__all__ = [
    "BUILTIN", "ChatFormatter", "DEFAULT_MODEL", "Encoded", "IGNORE_INDEX", "LoraSpec", "ModelSpec",
    "attach_lora", "collate", "load_adapter", "load_model", "lora_parameters", "model_inputs",
    "per_example_loss",
]
