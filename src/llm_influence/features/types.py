"""The feature container every attribution method consumes.

Shapes and conventions (the contract between ``features/`` and ``methods/``):

* ``grads[block]``: ``[n, rows, cols]`` float tensor, the gradient of each example's own
  loss (mean cross-entropy over its supervised tokens, in nats) with respect to one LoRA
  matrix. A block is one LoRA matrix, named like
  ``model.layers.3.self_attn.q_proj.lora_A`` (``rows x cols`` = ``r x in_features``) or
  ``...lora_B`` (``out_features x r``). Dot products use the flattened ``rows*cols`` vector.
* ``reps``: ``[n, hidden]`` representations (RepSim input), or None.
* ``repgrads``: ``[n, 3, hidden]`` RepT signatures at hidden state ``repgrads_layer``
  (:mod:`.rep_grads`: the hidden state at the last prompt token and the loss gradient
  w.r.t. the hidden states at the last prompt token and the first response token), or None.
* ``kfac[block]``: Kronecker factors for EK-FAC, or None: the uncentred covariance of the
  block's input activations ``[cols, cols]`` and of the gradients w.r.t. its outputs
  ``[rows, rows]``, both averaged over supervised tokens, with gradients taken of each
  example's mean-token loss.
* ``history``: for TracIn, a list of ``(weight, Features)`` at earlier checkpoints, where
  ``weight`` is the learning rate (or any positive weight) of that checkpoint.
* ``hvp``: for methods that need the true Hessian, a callable mapping a dict of tensors
  shaped like ``grads[block][0]`` to the Hessian-vector product of the mean training loss
  (same structure), or None.
* ``optimizer``: for the optimizer-aware methods (``trackstar``, ``less``), the AdamW
  moments the checkpoint saved, by block (:class:`~llm_influence.features.optimizer.AdamMoments`),
  or None (shared by every row, like ``kfac``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

HVP = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class KFACFactors:
    """Kronecker factors of one block: ``input_cov`` [cols, cols], ``grad_cov`` [rows, rows]."""

    input_cov: torch.Tensor
    grad_cov: torch.Tensor
    n_tokens: int = 0


@dataclass
class Features:
    ids: list[str]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    reps: Optional[torch.Tensor] = None
    kfac: Optional[dict[str, KFACFactors]] = None
    history: list[tuple[float, "Features"]] = field(default_factory=list)
    hvp: Optional[HVP] = None
    repgrads: Optional[torch.Tensor] = None
    repgrads_layer: Optional[int] = None
    optimizer: Optional[Any] = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name, g in self.grads.items():
            if g.dim() != 3 or g.shape[0] != n:
                raise ValueError(f"grads[{name!r}] must be [n={n}, rows, cols], got {tuple(g.shape)}")
        if self.reps is not None and (self.reps.dim() != 2 or self.reps.shape[0] != n):
            raise ValueError(f"reps must be [n={n}, hidden], got {tuple(self.reps.shape)}")
        if self.repgrads is not None and (self.repgrads.dim() != 3 or self.repgrads.shape[0] != n):
            raise ValueError(f"repgrads must be [n={n}, 3, hidden], got {tuple(self.repgrads.shape)}")

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def blocks(self) -> list[str]:
        return list(self.grads)

    def flat(self, block: str) -> torch.Tensor:
        """``[n, rows*cols]`` view of one block's per-example gradients."""
        g = self.grads[block]
        return g.reshape(g.shape[0], -1)

    def flat_all(self) -> torch.Tensor:
        """``[n, total_params]``: all blocks concatenated in ``blocks`` order."""
        return torch.cat([self.flat(b) for b in self.blocks], dim=1)

    def select(self, index: list[int] | torch.Tensor) -> "Features":
        """Rows ``index`` of every per-example field (factors, history and hvp are shared)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return Features(
            ids=[self.ids[i] for i in idx.tolist()],
            grads={b: g[idx] for b, g in self.grads.items()},
            reps=None if self.reps is None else self.reps[idx],
            kfac=self.kfac,
            history=[(w, f.select(idx)) for w, f in self.history],
            hvp=self.hvp,
            repgrads=None if self.repgrads is None else self.repgrads[idx],
            repgrads_layer=self.repgrads_layer,
            optimizer=self.optimizer,
        )
