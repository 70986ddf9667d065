"""Trainer state without pickle: optimizer tensors and the RNG state go to safetensors,
everything else to JSON. Together with the adapter this is enough to resume bitwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError


def save_trainer_state(folder: Path, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """Write ``optimizer.safetensors`` and ``trainer_state.json`` into ``folder``."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"state.{idx}.{key}"] = value.detach().clone().contiguous()
    save_file(tensors, str(folder / "optimizer.safetensors"))
    meta = {"param_groups": sd["param_groups"], **info}
    (folder / "trainer_state.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def load_trainer_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer and the torch RNG; return the JSON info."""
    try:
        meta = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, json.JSONDecodeError, Exception) as exc:  # safetensors raises its own types
        raise UserError(f"{folder}: unreadable trainer state ({type(exc).__name__}); delete the checkpoint to retrain it") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return meta
