"""LoRA attachment through peft, with the paper's defaults."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..errors import UserError


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

    def validate(self) -> None:
        """:class:`UserError` naming the first invalid field (before any model is loaded)."""
        checks = [
            ("r", isinstance(self.r, int) and self.r >= 1), ("alpha", self.alpha > 0),
            ("dropout", 0.0 <= self.dropout < 1.0),
            ("targets", bool(self.targets) and all(isinstance(t, str) and t for t in self.targets)),
            ("layers", self.layers is None or (bool(self.layers) and all(i >= 0 for i in self.layers))),
        ]
        for name, ok in checks:
            if not ok:
                raise UserError(f"invalid LoRA argument {name}={getattr(self, name)!r} (--lora-{name.replace('_', '-')})")

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

    spec.validate()
    if spec.layers is not None:
        n_layers = getattr(model.config, "num_hidden_layers", None)
        bad = [i for i in spec.layers if n_layers is not None and i >= n_layers]
        if bad:
            raise UserError(f"--lora-layers {','.join(map(str, spec.layers))}: layer {bad[0]} does not exist "
                            f"(the model has {n_layers} decoder layers, 0-{n_layers - 1})")
    full = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    linear = sorted({name.rsplit(".", 1)[-1] for name in full})
    missing = [t for t in spec.targets if not any(n == t or n.endswith("." + t) for n in full)]
    if missing:
        raise UserError(f"--lora-targets: module {missing[0]!r} is not a linear layer of this model; "
                        f"choose from {', '.join(linear)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, peft_config(spec))
        except ValueError as exc:  # peft's NoMatchingPeftModuleError and argument checks
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot attach LoRA ({spec.to_dict()}): {first}") from None


def load_adapter(model, adapter_dir, trainable: bool = False):
    """Attach a saved peft adapter (a folder with adapter_config.json + safetensors)."""
    from pathlib import Path

    from peft import PeftModel

    folder = Path(adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            # peft would fall back to a pickled adapter_model.bin; never unpickle anything.
            raise UserError(f"{folder}: no {name} (only safetensors adapters are loaded)")
    try:
        from safetensors.torch import load_file

        load_file(str(folder / "adapter_model.safetensors"))
        json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except Exception as exc:  # safetensors raises its own types for truncated/corrupted files
        raise UserError(f"{folder}: unreadable adapter ({_first_line(exc)}): the files are truncated or corrupted; "
                        "re-run `llm-influence finetune` with the same arguments to recompute them") from None
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # e.g. an adapter made for another model
        raise UserError(f"{folder}: cannot load this adapter onto the model ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


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
