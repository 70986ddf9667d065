"""LoRA attachment through peft, with the paper's defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch


@dataclass
class LoraSpec:
    """LoRA hyper-parameters. Defaults are the paper's: r=4, alpha=32, dropout 0.1 on q/v.

    ``layers`` restricts LoRA to the listed decoder-layer indices (None = every layer).
    """

    r: int = 4
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    layers: Optional[tuple[int, ...]] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSpec":
        return cls(r=int(d["r"]), alpha=int(d["alpha"]), dropout=float(d["dropout"]),
                   targets=tuple(d["targets"]), layers=None if d.get("layers") is None else tuple(d["layers"]))


def peft_config(spec: LoraSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        layers_to_transform=None if spec.layers is None else list(spec.layers),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model, spec: LoraSpec, seed: int):
    """Wrap ``model`` with fresh LoRA adapters (A: Kaiming-uniform from ``seed``, B: zeros)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config(spec))


def load_adapter(model, adapter_dir, trainable: bool = False):
    """Attach a saved peft adapter (a folder with adapter_config.json + safetensors)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The LoRA matrices by block name, in module order (``...q_proj.lora_A`` etc.)."""
    out: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            out[block_name(name)] = param
    return out


def block_name(param_name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` ->
    ``model.layers.0.self_attn.q_proj.lora_A``."""
    name = param_name
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    for suffix in (".default.weight", ".weight"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name
