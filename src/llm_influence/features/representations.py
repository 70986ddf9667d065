"""Representations for RepSim: pooled hidden states of the fine-tuned model.

The default is the paper's RepSim input: the hidden state of the last decoder layer at the
last prompt token (the position whose output predicts the first response token).

``layer`` indexes the model's ``hidden_states`` tuple (``output_hidden_states=True``):
index 0 is the token embedding, index ``i`` the output of decoder layer ``i-1``, and
index -1 the output of the last decoder layer *after the final RMSNorm* (in transformers
5, ``hidden_states[-1]`` equals ``last_hidden_state``: what the LM head sees).

``pooling``:

* ``"last-prompt"``: the hidden state at ``last_prompt_index`` (from :func:`collate`);
* ``"mean-prompt"``: the mean over the example's prompt tokens (non-pad, up to and
  including the last prompt token);
* ``"mean"``: the mean over all the example's non-pad tokens (prompt and response).

Representations are computed in eval mode (dropout off) without gradients, for the base
model with its adapter, in the model's dtype. Units: the model's hidden activations.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..models.formatting import Encoded, collate, model_inputs
from ..progress import progress

POOLINGS = ("last-prompt", "mean-prompt", "mean")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")


def select_layer(hidden_states: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
    """``hidden_states[layer]`` ([B, T, H]) with a clear error for an out-of-range index."""
    n = len(hidden_states)
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} is out of range: the model has {n} hidden states "
                         f"(embeddings + {n - 1} decoder layers), valid indices are {-n}..{n - 1}")
    return hidden_states[layer]


def prompt_mask(attention_mask: torch.Tensor, last_prompt_index: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: non-pad positions at or before each example's last prompt token."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return attention_mask.bool() & (positions[None, :] <= last_prompt_index[:, None].to(attention_mask.device))


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, last_prompt_index: torch.Tensor,
                pooling: str = "last-prompt") -> torch.Tensor:
    """Pool ``hidden`` [B, T, H] to ``[B, H]`` (see the module docstring for ``pooling``)."""
    check_pooling(pooling)
    if pooling == "last-prompt":
        idx = last_prompt_index.to(hidden.device)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if pooling == "mean-prompt":
        mask = prompt_mask(attention_mask, last_prompt_index)
    else:
        mask = attention_mask.bool()
    mask = mask.to(hidden.device)
    weights = mask.to(hidden.dtype)
    # where() rather than a product, so a non-finite value at a pad position cannot leak in.
    summed = torch.where(mask[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(1)
    return summed / weights.sum(1, keepdim=True).clamp(min=1)


def length_order(encoded: Sequence[Encoded]) -> list[int]:
    """Indices sorted by decreasing length (stable): batches of similar lengths pad less."""
    return sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def representations(model, encoded: Sequence[Encoded], pad_id: int, *, layer: int = -1,
                    pooling: str = "last-prompt", batch_size: int = 8, side: str = "right",
                    description: Optional[str] = "representations") -> torch.Tensor:
    """``[n, hidden]`` pooled hidden states of ``encoded`` (in order), in the model's dtype, on the CPU.

    The model is put in eval mode for the call (its previous mode is restored).
    """
    check_pooling(pooling)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        order = length_order(encoded)
        out: Optional[torch.Tensor] = None
        n_batches = (len(order) + batch_size - 1) // batch_size
        with progress(n_batches if description else 0, description or "") as advance:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = collate([encoded[i] for i in idx], pad_id, side=side)
                inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
                hs = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
                pooled = pool_hidden(select_layer(hs, layer), inputs["attention_mask"],
                                     batch["last_prompt_index"].to(device), pooling).detach().cpu()
                if out is None:
                    out = torch.empty((len(encoded), pooled.shape[1]), dtype=pooled.dtype)
                out[torch.tensor(idx)] = pooled
                advance()
        if out is None:
            hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") \
                else model.config.hidden_size
            out = torch.empty((0, hidden), dtype=model_dtype(model))
        return out
    finally:
        model.train(was_training)
