"""True Hessian-vector products of the mean training loss w.r.t. the LoRA parameters.

``H = d^2/dtheta^2 [ (1/n) sum_i L_i(theta) ]`` where ``L_i`` is training example ``i``'s
mean token cross-entropy (nats) and ``theta`` all LoRA matrices together (every block, so
``H`` includes the cross-block terms). ``H v`` is computed by double backward
(Pearlmutter): ``H v = d/dtheta < dL/dtheta, v >`` with ``torch.autograd.grad(...,
create_graph=True)``, batched over the training set with a fixed batch size: the batch
``k`` contributes ``(|batch_k| / n) * H_k v`` with ``H_k`` the Hessian of that batch's mean
loss, so the sum is exactly ``H v`` whatever the batch size.

The model runs in eval mode (dropout off, the same deterministic model as the gradients),
with attention through PyTorch's math SDPA backend during each product (see
:func:`differentiable_attention`: the fused attention kernels have no second derivative).
Each product costs about two forward and two backward passes over the training set.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ..models.formatting import Encoded, collate, model_inputs
from .gradients import lora_grad_mode, sequence_losses
from .representations import length_order, model_device
from .types import HVP


def _transformer(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def differentiable_attention(model) -> Iterator[None]:
    """Run attention through twice-differentiable operations, in the model's dtype.

    ``sdpa`` models use PyTorch's *math* SDPA backend inside the context (the fused CPU and
    CUDA kernels have no second derivative; the math backend is plain matmul + softmax and
    keeps float64 in float64, unlike transformers' eager attention, which runs its softmax
    in float32). Other implementations (flash attention, ...) are switched to ``sdpa`` for
    the duration; ``eager`` is used as it is.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    inner = _transformer(model)
    previous = getattr(inner.config, "_attn_implementation", None)
    if previous == "eager" or previous is None:
        yield
        return
    switched = previous != "sdpa"
    if switched:
        inner.set_attn_implementation("sdpa")
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if switched:
            inner.set_attn_implementation(previous)


def make_hvp(model, encoded: Sequence[Encoded], pad_id: int, *, batch_size: int = 8) -> HVP:
    """The ``hvp`` callable of :class:`Features` for the training examples ``encoded``.

    The callable maps ``{block: tensor shaped like that LoRA matrix}`` (every block of the
    model, names as in :func:`llm_influence.models.lora.lora_parameters`) to ``{block: (H v)
    block}`` in the same shapes, dtypes and devices as the input. Products are computed in
    the model's dtype; the model (captured by reference) must not be modified while the
    callable is in use. The callable has attribute ``calls`` (number of products so far).

    Batches are right-padded: a left-padded batch has fully masked query rows, whose NaNs
    (math attention) would reach the second derivative.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not encoded:
        raise ValueError("a Hessian-vector product needs at least one training example")
    n = len(encoded)
    order = length_order(encoded)
    batches = [collate([encoded[i] for i in order[s:s + batch_size]], pad_id, side="right")
               for s in range(0, n, batch_size)]

    def hvp(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = model_device(model)
        with lora_grad_mode(model) as modules, differentiable_attention(model):
            blocks = list(modules)
            missing = [b for b in blocks if b not in vectors]
            extra = [b for b in vectors if b not in modules]
            if missing or extra:
                raise ValueError(f"hvp: expected blocks {blocks}; missing {missing}, unknown {extra}")
            params = [modules[b].weight for b in blocks]
            v = []
            for b, p in zip(blocks, params):
                t = vectors[b]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"hvp: block {b!r} must be shaped {tuple(p.shape)}, got {tuple(t.shape)}")
                v.append(t.detach().to(device=p.device, dtype=p.dtype))
            total = [torch.zeros_like(p) for p in params]
            for batch in batches:
                inputs = {k: t.to(device) for k, t in model_inputs(batch).items()}
                logits = model(**inputs, use_cache=False).logits
                # (|batch| / n) * mean over the batch = (1/n) * sum over the batch
                loss = sequence_losses(logits, batch["labels"].to(device)).sum() / n
                g = torch.autograd.grad(loss, params, create_graph=True)
                dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
                hv = torch.autograd.grad(dot, params)
                for acc, h in zip(total, hv):
                    acc += h.detach()
        hvp.calls += 1
        return {b: t.to(device=vectors[b].device, dtype=vectors[b].dtype) for b, t in zip(blocks, total)}

    hvp.calls = 0
    return hvp
