"""Per-example causal-LM loss: the mean cross-entropy over each example's own supervised
tokens (nats per token). Training minimises the mean of these over the batch, so the
per-example gradients of the attribution engine are gradients of exactly the summands of
the training objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .formatting import IGNORE_INDEX


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, T, V], ``labels`` [B, T] (-100 = ignored) -> loss [B].

    Token t predicts label t+1. An example with no supervised token gets loss 0.
    """
    # Up-cast half precision to float32 but keep float64 as float64.
    shift_logits = logits[:, :-1, :].to(torch.promote_types(logits.dtype, torch.float32))
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1)
