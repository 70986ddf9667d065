"""The AdamW state a fine-tuning checkpoint saved, by LoRA block (for ``trackstar``/``less``).

Every checkpoint ``RUN/checkpoints/epoch-N/`` written by :mod:`llm_influence.training.finetune`
holds ``optimizer.safetensors`` (tensors ``state.{i}.exp_avg``, ``state.{i}.exp_avg_sq``,
``state.{i}.step``) and ``trainer_state.json`` (``param_groups``: ``betas``, ``eps``, ``lr``,
``weight_decay`` and the parameter indices ``params`` of each group). Index ``i`` is the
``i``-th trainable parameter of the fine-tuned model, i.e. the ``i``-th LoRA matrix in
module order: the order of the blocks of the per-example gradients
(:func:`llm_influence.features.gradients.lora_modules`, kept in the features files). So
``state.{i}`` belongs to ``blocks[i]``; :func:`load_adam_moments` checks that the count
matches and that each tensor has the shape of that block's LoRA matrix in the adapter file.

``exp_avg`` (``m``) and ``exp_avg_sq`` (``v``) are torch's uncorrected moving averages after
``step`` optimizer steps; Adam divides by their bias-corrected values
``m / (1 - beta1^step)`` and ``v / (1 - beta2^step)``. The freshly initialised ``epoch-0``
checkpoint has no state (no step taken yet): :func:`load_adam_moments` returns None for it,
as for an adapter folder without ``optimizer.safetensors`` (an imported peft adapter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import UserError

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class AdamMoments:
    """AdamW moments of one checkpoint. ``exp_avg`` / ``exp_avg_sq``: ``{block: [rows, cols]}``
    (the uncorrected torch averages, float32 as saved); ``step``: optimizer steps taken;
    ``betas``, ``eps``, ``lr``: per block, from the block's parameter group."""

    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: int
    betas: dict[str, tuple[float, float]]
    eps: dict[str, float]
    lr: dict[str, float] = field(default_factory=dict)
    source: str = ""

    @property
    def blocks(self) -> list[str]:
        return list(self.exp_avg_sq)

    def second_moment(self, block: str, bias_correction: bool = True) -> torch.Tensor:
        """``v`` of ``block`` in float64, divided by ``1 - beta2^step`` when ``bias_correction``
        (the ``v_hat`` Adam divides by)."""
        v = self.exp_avg_sq[block].to(torch.float64)
        if bias_correction:
            v = v / (1.0 - self.betas[block][1] ** self.step)
        return v

    def describe(self) -> dict:
        first = self.blocks[0] if self.blocks else None
        return {"source": self.source, "step": self.step, "blocks": len(self.blocks),
                "betas": list(self.betas[first]) if first else None, "eps": self.eps.get(first) if first else None}


def adapter_block_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """``{block: shape}`` of the LoRA matrices in ``folder``'s adapter file (block names as in
    the gradient features, e.g. ``model.layers.0.self_attn.q_proj.lora_A``)."""
    from safetensors import safe_open

    from ..models.lora import block_name

    path = Path(folder) / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as fh:
        return {block_name(k): tuple(fh.get_slice(k).get_shape()) for k in fh.keys()
                if "lora_A" in k or "lora_B" in k}


def load_adam_moments(folder: str | Path, blocks: Sequence[str]) -> Optional[AdamMoments]:
    """The AdamW moments of the checkpoint in ``folder`` mapped onto ``blocks`` (the LoRA
    blocks in module order, as the gradient features list them), or None when the folder
    has no optimizer state (``epoch-0``, an adapter without ``optimizer.safetensors``).

    A state that does not fit the blocks (another count, a shape that differs from the
    adapter's matrix of that block, steps that differ between parameters) is a
    :class:`UserError`: attributing with a misassigned second moment would be silently wrong.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / OPTIMIZER_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        meta = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        groups = meta["param_groups"]
    except Exception as exc:  # safetensors' own types, JSON, a missing key
        raise UserError(f"{folder}: unreadable optimizer state ({type(exc).__name__}); "
                        "re-run `llm-influence finetune` with the same arguments to recompute it") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    if not state:
        return None
    blocks = list(blocks)
    if sorted(state) != list(range(len(blocks))):
        raise UserError(f"{path}: optimizer state for {len(state)} parameters, but the adapter has {len(blocks)} "
                        "LoRA matrices; cannot assign the AdamW moments to blocks")
    shapes = adapter_block_shapes(folder)
    group_of: dict[int, dict] = {}
    for group in groups:
        for idx in group.get("params", []):
            group_of[int(idx)] = group
    exp_avg, exp_avg_sq, betas, eps, lr = {}, {}, {}, {}, {}
    steps = set()
    for i, block in enumerate(blocks):
        entry = state[i]
        if "exp_avg_sq" not in entry or "exp_avg" not in entry:
            raise UserError(f"{path}: parameter {i} ({block}) has no exp_avg/exp_avg_sq: not an Adam-family state")
        want = shapes.get(block)
        if want is None or tuple(entry["exp_avg_sq"].shape) != want:
            raise UserError(f"{path}: optimizer state {i} is shaped {tuple(entry['exp_avg_sq'].shape)} but block "
                            f"{block} is {want}; cannot assign the AdamW moments to blocks")
        group = group_of.get(i, groups[0] if groups else {})
        exp_avg[block] = entry["exp_avg"]
        exp_avg_sq[block] = entry["exp_avg_sq"]
        b1, b2 = group.get("betas", (0.9, 0.999))
        betas[block] = (float(b1), float(b2))
        eps[block] = float(group.get("eps", 1e-8))
        lr[block] = float(group.get("lr", 0.0))
        steps.add(int(float(entry["step"])) if "step" in entry else 0)
    if len(steps) != 1 or min(steps) < 1:
        raise UserError(f"{path}: optimizer steps {sorted(steps)} differ between parameters or are zero")
    return AdamMoments(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, step=steps.pop(), betas=betas, eps=eps, lr=lr,
                       source=str(folder))
