"""RepT's features: one hidden state and the loss gradient with respect to it, batched.

RepT (Li, Zhao, Li, Sun 2025, arXiv 2510.02334, "Where Did It Go Wrong?") describes each
example by a *signature* taken at one layer: the hidden state of the final prompt token and
the gradient of the example's loss with respect to the hidden state at the first response
token. This module computes, per example and at one hidden-state index ``layer``
(:func:`hidden_index`: 0 = token embeddings, ``i`` = output of decoder layer ``i-1``, ``L``
= the last decoder layer's output after the final norm, i.e. ``output_hidden_states``'s
numbering), the ``[3, hidden]`` array (:data:`ROWS`)

    row 0: h_p          the hidden state at the last prompt token p
    row 1: dL/dh_p      the gradient of the example's loss w.r.t. that hidden state
    row 2: dL/dh_{p+1}  the gradient w.r.t. the hidden state of the first response token
                        (zeros when the example has no token after p)

where ``L`` is the example's own training loss (mean cross-entropy over its supervised
tokens, nats; :func:`llm_influence.models.loss.per_example_loss`). The output of position
``p`` is the prediction of the first response token, so "the gradient at the first response
token" can mean either row 1 (the position that *predicts* it: what the authors' released
code uses, ``get_representation_gradient(...)[0]`` of plumprc/RepT) or row 2 (the token's
own position). Both are stored, so the choice is a method argument (``rept.grad_position``),
not part of the cache key.

**How (one batched forward + backward, no per-example loop).** A forward hook on the module
that produces hidden state ``layer`` (the input embedding for 0, decoder layer ``layer-1``,
or a forward *pre*-hook on the LM head for ``L``) replaces its output by a detached copy
that requires grad, so the backward pass of ``S = sum_b L_b`` stops there: no parameter
requires grad and the layers below ``layer`` build no graph. Because examples do not
interact in a causal LM, ``dS/dh[b] = dL_b/dh[b]``; ``torch.autograd.grad(S, h)`` gives all
examples' gradients at once. The cost is one forward pass and the backward through the
layers above ``layer`` and the LM head, without any parameter gradient, and ``3 x hidden``
numbers stored per example. The backward through the upper layers dominates, so for an early
layer the time is close to that of the per-example LoRA gradients (on SmolLM2-135M, index 2:
0.7-0.9x) and only a late layer saves much (last index: 0.4x, about 1.2-1.5 forward passes);
the storage is ~100x smaller than LoRA gradients' (README, Methods).

**Token-level** (:func:`token_signatures`): the same pass, keeping for every position
``q`` whose logit is supervised (it predicts the supervised token ``q+1``) the pair
``(h_q, dL/dh_q)``; RepT's token-level attribution compares these with a test signature
(:meth:`llm_influence.methods.rept.RepT.token_scores`).

**Layer choice** (:func:`probe_layer`): the paper locates a "phase transition" layer on a
small probing set. The authors' ``repdiff.py`` computes, for a prompt, the cosine between
the last-prompt-token hidden states of consecutive indices ``(l, l+1)`` for
``l = 1 .. L-1``, drops the last pair (the one through the final norm) and takes the later
index of the least similar pair: ``argmin_l cos(h_l, h_{l+1}) + 1`` over ``l = 1 .. L-2``.
Here the cosine is averaged over a probing set of training prompts (no test example, no
label), ties go to the earliest layer, and a model with fewer than 3 decoder layers (no
candidate pair) gets index ``L-1`` (``L`` for a single layer).

Computed in eval mode (dropout off), in the model's dtype (or under autocast with float32
results); the model's training flag and ``requires_grad`` flags are restored. Batches are
formed from examples sorted by length and results are written back in input order; they do
not depend on the batch size beyond float rounding.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from ..models.formatting import IGNORE_INDEX, Encoded, collate, model_inputs
from ..models.loss import per_example_loss
from ..progress import progress
from .representations import length_order, model_device

ROWS = ("hidden_last_prompt", "grad_last_prompt", "grad_first_response")
#: what the stored rows are (part of the cache key)
POSITIONS = ("h at the last prompt token p; dL/dh at p; dL/dh at p+1 (zeros if none); L = mean token "
             "cross-entropy of the example's supervised tokens")
PROBE_RULE = ("argmin over l = 1..L-2 of the mean over the probing prompts of cos(h_l, h_{l+1}) at the last "
              "prompt token, plus 1 (the authors' repdiff.py, averaged over a probing set)")
DEFAULT_PROBE_SIZE = 32


@dataclass(frozen=True)
class RepGradSpec:
    """What to extract for RepT: ``layer`` (a hidden-state index, or ``"auto"`` for the
    probing rule on the first ``probe_size`` training examples)."""

    layer: int | str = "auto"
    probe_size: int = DEFAULT_PROBE_SIZE

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "probe_size": self.probe_size}


@dataclass
class RepGradArrays:
    """One pass's output (CPU tensors, input order): ``signatures`` ``[n, 3, hidden]``
    (:data:`ROWS`), ``losses`` ``[n]`` (nats) and wall-clock ``seconds``."""

    signatures: torch.Tensor
    losses: torch.Tensor
    seconds: float = 0.0


@dataclass
class TokenSignatures:
    """One example's per-token pairs: ``positions`` (the positions ``q`` whose logit is
    supervised), ``token_ids`` (the predicted tokens ``q+1``), ``hidden`` ``[k, hidden]``
    (h_q) and ``grads`` ``[k, hidden]`` (dL/dh_q)."""

    positions: list[int]
    token_ids: list[int]
    hidden: torch.Tensor
    grads: torch.Tensor


# ---------------------------------------------------------------------------------------
# the model's layers


def num_hidden_layers(model) -> int:
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.num_hidden_layers)


def hidden_index(model, layer: int) -> int:
    """``layer`` as a non-negative index into the ``L + 1`` hidden states (negative indices
    count from the end, as in ``hidden_states[layer]``); ValueError when out of range."""
    n = num_hidden_layers(model) + 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"layer {layer!r} is out of range: the model has {n} hidden states "
                         f"(embeddings + {n - 1} decoder layers), valid indices are {-n}..{n - 1}")
    return layer % n


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder-layer list: the first ``nn.ModuleList`` whose length is the number of
    hidden layers (``model.layers`` of Llama-style models)."""
    want = num_hidden_layers(model)
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == want]
    if not candidates:
        raise ValueError(f"cannot find the {want} decoder layers of {type(model).__name__}")
    named = [c for c in candidates if c[0].split(".")[-1] in ("layers", "h", "layer", "blocks")]
    return (named or candidates)[0][1]


class _Leaf:
    """Holds the hidden state that one forward hook replaced by a leaf requiring grad."""

    def __init__(self) -> None:
        self.value: Optional[torch.Tensor] = None

    def make(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.value is not None:
            raise RuntimeError("the hooked module ran twice in one forward pass "
                               "(activation checkpointing or module reuse is not supported)")
        leaf = tensor.detach().requires_grad_(True)
        self.value = leaf
        return leaf


@contextmanager
def hidden_state_leaf(model, layer: int) -> Iterator[_Leaf]:
    """Within the context every forward of ``model`` records hidden state ``layer`` (see
    :func:`hidden_index`) as ``holder.value``, a leaf tensor requiring grad that the rest of
    the forward pass uses; reset ``holder.value = None`` before each forward."""
    index = hidden_index(model, layer)
    L = num_hidden_layers(model)
    holder = _Leaf()

    def replace_output(module, inputs, output):
        if isinstance(output, tuple):
            return (holder.make(output[0]), *output[1:])
        return holder.make(output)

    def replace_input(module, args):
        return (holder.make(args[0]), *args[1:])

    if index == 0:
        handle = model.get_input_embeddings().register_forward_hook(replace_output)
    elif index < L:
        handle = decoder_layers(model)[index - 1].register_forward_hook(replace_output)
    else:  # after the final norm: the LM head's input
        handle = model.get_output_embeddings().register_forward_pre_hook(replace_input)
    try:
        yield holder
    finally:
        handle.remove()


@contextmanager
def _frozen_eval(model) -> Iterator[None]:
    """Eval mode, no parameter requires grad, grad mode on; everything restored on exit."""
    was_training = model.training
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in saved:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _batched_pass(model, holder: _Leaf, batch: dict[str, torch.Tensor], device: torch.device,
                  autocast_dtype: Optional[torch.dtype], loss_scale: float, measure=None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h [B, T, H], dL_b/dh_b [B, T, H], losses [B])`` of one collated batch (``measure``,
    ``m(outputs, batch) -> [B]``, replaces the loss ``L_b``)."""
    inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
    labels = batch["labels"].to(device)
    holder.value = None
    with _autocast(device, autocast_dtype):
        out = model(**inputs, use_cache=False)
    if holder.value is None:
        raise RuntimeError("the hidden-state hook did not run")
    if measure is None:
        losses = per_example_loss(out.logits, labels)
    else:
        losses = measure(out, {**inputs, "labels": labels, "last_prompt_index": batch["last_prompt_index"].to(device)})
    total = losses.sum() if loss_scale == 1.0 else losses.sum() * loss_scale
    (grad,) = torch.autograd.grad(total, holder.value, allow_unused=True)
    h = holder.value.detach()
    acc = _out_dtype(h.dtype)
    grad = torch.zeros_like(h, dtype=acc) if grad is None else grad.detach().to(acc)
    if loss_scale != 1.0:
        grad = grad / loss_scale
    holder.value = None
    return h.to(acc), grad, losses.detach()


def _check_finite(losses: torch.Tensor, values: torch.Tensor, idx: list[int]) -> None:
    from .gradients import NonFiniteError

    ok = torch.isfinite(losses) & torch.isfinite(values).flatten(1).all(dim=1)
    if not bool(ok.all()):
        raise NonFiniteError([i for i, good in zip(idx, ok.tolist()) if not good])


# ---------------------------------------------------------------------------------------
# the signatures


def representation_gradients(model, encoded: Sequence[Encoded], pad_id: int, *, layer: int, batch_size: int = 8,
                             side: str = "right", description: Optional[str] = "representation gradients",
                             autocast_dtype: Optional[torch.dtype] = None, loss_scale: float = 1.0,
                             measure=None) -> RepGradArrays:
    """``[n, 3, hidden]`` signatures (:data:`ROWS`) of ``encoded`` at hidden state ``layer``
    (see the module docstring), one forward + backward per batch; float32 at least (float64
    for a float64 model). ``measure`` (``m(outputs, batch) -> [B]``,
    :mod:`llm_influence.features.measure`) replaces the loss whose gradient is taken."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    t0 = time.perf_counter()
    n = len(encoded)
    device = model_device(model)
    order = length_order(encoded)
    out: Optional[torch.Tensor] = None
    losses = torch.zeros(n, dtype=torch.float64)
    n_batches = (n + batch_size - 1) // batch_size
    with _frozen_eval(model), hidden_state_leaf(model, layer) as holder, \
            progress(n_batches if description else 0, description or "") as advance:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            batch = collate([encoded[i] for i in idx], pad_id, side=side)
            h, g, batch_losses = _batched_pass(model, holder, batch, device, autocast_dtype, loss_scale, measure)
            rows = torch.arange(len(idx), device=h.device)
            p = batch["last_prompt_index"].to(h.device)
            mask = batch["attention_mask"]
            ends = (mask.shape[1] - mask.flip(1).argmax(1)).to(h.device)  # one past the last attended token
            nxt = torch.clamp(p + 1, max=h.shape[1] - 1)
            has_next = (p + 1 < ends)[:, None]
            sig = torch.stack([h[rows, p], g[rows, p],
                               torch.where(has_next, g[rows, nxt], torch.zeros((), dtype=g.dtype, device=g.device))],
                              dim=1)
            _check_finite(batch_losses, sig, idx)
            if out is None:
                out = torch.empty((n, 3, sig.shape[-1]), dtype=sig.dtype)
            out[torch.tensor(idx)] = sig.cpu()
            losses[torch.tensor(idx)] = batch_losses.cpu().to(torch.float64)
            advance(info=f"loss {float(batch_losses.mean()):.3f}")
    if out is None:
        cfg = model.config
        hidden = (cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg).hidden_size
        out = torch.empty((0, 3, hidden), dtype=_out_dtype(next(model.parameters()).dtype))
    return RepGradArrays(signatures=out, losses=losses, seconds=time.perf_counter() - t0)


def token_signatures(model, encoded: Sequence[Encoded], pad_id: int, *, layer: int, batch_size: int = 8,
                     autocast_dtype: Optional[torch.dtype] = None) -> list[TokenSignatures]:
    """Per example (input order), the ``(h_q, dL/dh_q)`` pairs of every position ``q`` whose
    logit is supervised (``labels[q + 1] != -100``), at hidden state ``layer``; the same
    batched pass as :func:`representation_gradients` (right padding)."""
    device = model_device(model)
    order = length_order(encoded)
    out: list[Optional[TokenSignatures]] = [None] * len(encoded)
    with _frozen_eval(model), hidden_state_leaf(model, layer) as holder:
        for start in range(0, len(encoded), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([encoded[i] for i in idx], pad_id, side="right")
            h, g, losses = _batched_pass(model, holder, batch, device, autocast_dtype, 1.0)
            _check_finite(losses, g, idx)
            for row, i in enumerate(idx):
                labels = encoded[i].labels
                positions = [q for q in range(len(labels) - 1) if labels[q + 1] != IGNORE_INDEX]
                pos = torch.tensor(positions, dtype=torch.long, device=h.device)
                out[i] = TokenSignatures(positions=positions,
                                         token_ids=[encoded[i].input_ids[q + 1] for q in positions],
                                         hidden=h[row, pos].cpu(), grads=g[row, pos].cpu())
    return [x for x in out if x is not None]


# ---------------------------------------------------------------------------------------
# the probing rule


@torch.no_grad()
def layer_cosines(model, encoded: Sequence[Encoded], pad_id: int, *, batch_size: int = 8) -> list[float]:
    """Mean over ``encoded`` of ``cos(h_l, h_{l+1})`` at the last prompt token, for
    ``l = 0 .. L-1`` (float64; entry ``l`` compares hidden states ``l`` and ``l+1``)."""
    if not encoded:
        raise ValueError("the probing set is empty")
    was_training = model.training
    model.eval()
    device = model_device(model)
    sums: Optional[torch.Tensor] = None
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate(list(encoded[start:start + batch_size]), pad_id)
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            hs = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
            p = batch["last_prompt_index"].to(device)
            rows = torch.arange(p.shape[0], device=device)
            h = torch.stack([x[rows, p].to(torch.float64) for x in hs], dim=1)  # [B, L+1, H]
            a, b = h[:, :-1], h[:, 1:]
            den = a.norm(dim=-1) * b.norm(dim=-1)
            cos = torch.where(den > 0, (a * b).sum(-1) / torch.where(den > 0, den, torch.ones_like(den)),
                              torch.zeros_like(den))
            part = cos.sum(0).cpu()
            sums = part if sums is None else sums + part
    finally:
        model.train(was_training)
    return (sums / len(encoded)).tolist()


def choose_layer(cosines: Sequence[float]) -> int:
    """The probing rule on the ``L`` consecutive-layer cosines of :func:`layer_cosines`:
    ``argmin_{l=1..L-2} cos_l + 1`` (earliest on ties); ``L-1`` when ``L < 3`` (``L`` when
    ``L == 1``)."""
    L = len(cosines)
    candidates = list(range(1, L - 1))
    if not candidates:
        return max(L - 1, 1) if L > 1 else L
    best = min(candidates, key=lambda l: (cosines[l], l))
    return best + 1


def probe_layer(model, encoded: Sequence[Encoded], pad_id: int, *, batch_size: int = 8) -> tuple[int, list[float]]:
    """``(hidden-state index, consecutive-layer cosines)`` of the probing rule on ``encoded``."""
    cosines = layer_cosines(model, encoded, pad_id, batch_size=batch_size)
    return choose_layer(cosines), cosines
