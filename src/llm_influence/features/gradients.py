"""Per-example LoRA gradients for a whole padded batch in one forward + backward pass.

**What is computed.** For every example ``b`` and every LoRA matrix ``W`` (a *block*, named
like ``model.layers.3.self_attn.q_proj.lora_A``), ``grads[block][b] = dL_b/dW`` where
``L_b`` is example ``b``'s own loss: the mean cross-entropy (nats per token) over its
supervised tokens, exactly the summand of the training objective. Shapes follow the
weights: ``lora_A`` ``[r, in_features]``, ``lora_B`` ``[out_features, r]``; the result is
``[n, rows, cols]``. Sign: the gradient of the loss (descent direction is its negative).

**How.** peft computes ``result = base(x) + lora_B(lora_A(dropout(x))) * scaling``. A
forward hook on each ``lora_A`` / ``lora_B`` ``nn.Linear`` stores its per-token input
``x`` ``[B, T, in]`` and registers a tensor hook on its output, which receives
``delta = dS/d(output)`` ``[B, T, out]`` during the backward pass of ``S = sum_b L_b``.
Because examples do not interact in a causal LM (attention is masked per sequence, there is
no batch normalisation), ``dS/d(tokens of b) = dL_b/d(tokens of b)`` and

    grads[block][b] = sum_t delta[b, t]^T x[b, t]          ([out, in], one matmul per batch)

Details that matter:

* ``lora_B``'s output is multiplied by ``scaling = alpha / r`` *after* the module, so the
  captured ``delta`` already carries that factor (the per-example loop test verifies it).
  ``lora_A``'s input is ``dropout(x)``: extraction runs the model in **eval mode**, where
  dropout is the identity, so the gradients are those of the deterministic model (in
  training mode every forward would draw a different dropout mask).
* Pad positions get no gradient (their outputs feed no loss and are masked as attention
  keys); ``x`` and ``delta`` are zeroed there with ``where`` so a non-finite activation at a
  pad position cannot leak in. Left and right padding give the same gradients. The
  supervised leading pads of ``loss_on="all-padded"`` are not zeroed.
* Only the LoRA matrices require gradients during extraction (the base model is frozen).
* Batches are formed from examples sorted by length (less padding); results are written
  back in the input order and do not depend on the batch size or composition.

**K-FAC factors** (optional, ``kfac=True``), per block, accumulated in the same pass:

    input_cov = (1/N) sum_{(b,t) in S} x[b,t] x[b,t]^T           [in, in]   (= [cols, cols])
    grad_cov  = (1/N) sum_{(b,t) in S} delta[b,t] delta[b,t]^T   [out, out] (= [rows, rows])

with ``delta`` the gradient of example ``b``'s own mean-token loss (so each example's
tokens carry its ``1/n_supervised(b)`` weight) and ``S`` the *tokens that can receive
gradient*: the non-pad positions ``t`` with ``t <= p_b``, where ``p_b`` is the last
position whose logit is supervised (``labels[b, p_b + 1] != -100``). By causality, tokens
after ``p_b`` (e.g. the final token, whose logit predicts nothing) influence no loss at any
layer, so they are excluded from both factors; every other non-pad token is included in
both, including prompt tokens (which receive gradient through attention); the supervised
leading pads of ``loss_on="all-padded"`` are outside the attention mask and not in ``S``
(under SDPA they receive no gradient). ``N = |S|``
summed over all examples, the same ``N`` for every block. Sums run in float64 (the raw sums
and ``N`` are returned too, so chunks of a split can be combined exactly).

**Half precision** (``autocast_dtype`` bfloat16/float16): the forward runs under
``torch.autocast`` with the weights kept in float32; the captured activations and output
gradients (half or float32) are up-cast before the per-example product, so every gradient
is accumulated and returned in float32 (``float64`` models stay float64). float16 needs
loss scaling against underflow: the backward pass is run on ``loss_scale * sum_b L_b`` and
the captured output gradients are divided by ``loss_scale`` before use.

**Projection** (``transform``): an object with ``output_shape(block, (rows, cols))`` and
``__call__(block, grads [B, rows, cols]) -> [B, *output_shape]`` applied to each batch's
per-example gradients before they are stored, so a full ``[n, rows, cols]`` array is never
allocated (:class:`llm_influence.features.projection.GradientProjector`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Optional, Sequence

import torch

from ..models.formatting import IGNORE_INDEX, Encoded, collate, model_inputs
from ..models.lora import block_name
from ..models.loss import per_example_loss
from ..progress import progress
from .representations import check_pooling, length_order, model_device, pool_hidden, select_layer
from .types import KFACFactors


# ---------------------------------------------------------------------------------------
# the loss


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, T, V], ``labels`` [B, T] -> ``[B]`` mean token cross-entropy (nats):
    the training loss :func:`llm_influence.models.loss.per_example_loss` (which up-casts
    half precision but keeps float64), with the labels moved to the logits' device."""
    return per_example_loss(logits, labels.to(logits.device))


def gradient_token_mask(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the tokens that can receive gradient (the K-FAC token set ``S``).

    Non-pad positions ``t <= p_b`` with ``p_b`` the last position whose logit is
    supervised (``labels[b, p_b + 1] != -100``); all False for an example without
    supervised tokens.
    """
    B, T = labels.shape
    supervised_logit = torch.zeros((B, T), dtype=torch.bool, device=labels.device)
    supervised_logit[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    positions = torch.arange(T, device=labels.device).expand(B, T)
    last = torch.where(supervised_logit, positions, torch.full_like(positions, -1)).max(dim=1).values
    return attention_mask.bool().to(labels.device) & (positions <= last[:, None])


# ---------------------------------------------------------------------------------------
# the LoRA modules and the gradient mode


def lora_modules(model) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` of every active LoRA matrix by block name (the names of
    :func:`llm_influence.models.lora.lora_parameters`), in module order."""
    out: dict[str, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B") and isinstance(module, torch.nn.Linear):
            out[block_name(name + ".weight")] = module
    if not out:
        raise ValueError("the model has no LoRA adapter (no lora_A / lora_B modules)")
    return out


@contextmanager
def lora_grad_mode(model) -> Iterator[dict[str, torch.nn.Linear]]:
    """Eval mode (dropout off), gradients enabled for the LoRA matrices only.

    Yields :func:`lora_modules`. The previous training flag and ``requires_grad`` of every
    parameter are restored on exit.
    """
    modules = lora_modules(model)
    lora_ids = {id(m.weight) for m in modules.values()}
    was_training = model.training
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in saved:
            p.requires_grad_(id(p) in lora_ids)
        with torch.enable_grad():
            yield modules
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)


# ---------------------------------------------------------------------------------------
# the hooks


class LoraGradientCapture:
    """Forward/backward hooks that turn one backward pass into per-example gradients.

    Use as a context manager around the passes; call :meth:`begin` with each batch's
    ``attention_mask`` (and ``labels`` when accumulating K-FAC factors) before its forward,
    run ``backward`` of the *sum* of per-example losses, then read :meth:`batch_grads`.
    """

    def __init__(self, modules: dict[str, torch.nn.Linear], *, kfac: bool = False,
                 grad_scale: float = 1.0) -> None:
        self.modules = modules
        self.kfac = kfac
        self.grad_scale = float(grad_scale)
        self._handles: list = []
        self._x: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._mask: Optional[torch.Tensor] = None
        self._kmask: Optional[torch.Tensor] = None
        self.input_sums: dict[str, torch.Tensor] = {}
        self.grad_sums: dict[str, torch.Tensor] = {}
        self.n_tokens = 0

    def __enter__(self) -> "LoraGradientCapture":
        for block, module in self.modules.items():
            self._handles.append(module.register_forward_hook(partial(self._forward, block)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._x.clear()

    def begin(self, attention_mask: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Start a batch: ``attention_mask`` [B, T]; ``labels`` [B, T] needed when ``kfac``.

        Positions outside the attention mask are zeroed unless supervised: the leading pad
        tokens of ``loss_on="all-padded"`` carry losses (under SDPA their gradient is 0; an
        attention that lets them see the sequence gives them one, and it is kept)."""
        self._x.clear()
        self._grads = {}
        self._mask = attention_mask.bool()
        if labels is not None:
            self._mask = self._mask | (labels.to(self._mask.device) != IGNORE_INDEX)
        if self.kfac:
            if labels is None:
                raise ValueError("K-FAC accumulation needs the batch labels")
            self._kmask = gradient_token_mask(attention_mask, labels)
            self.n_tokens += int(self._kmask.sum())

    def _forward(self, block: str, module, inputs, output) -> None:
        if self._mask is None or not output.requires_grad:
            return
        if block in self._x or block in self._grads:
            raise RuntimeError(f"{block}: LoRA module ran twice in one forward pass "
                               "(activation checkpointing or module reuse is not supported)")
        self._x[block] = inputs[0].detach()
        output.register_hook(partial(self._backward, block))

    def _backward(self, block: str, delta: torch.Tensor) -> None:
        x = self._x.pop(block)
        # accumulate in float32 at least (half-precision activations/gradients are up-cast)
        acc = torch.promote_types(torch.promote_types(x.dtype, delta.dtype), torch.float32)
        delta = delta.detach().to(acc)
        if self.grad_scale != 1.0:
            delta = delta / self.grad_scale
        x = x.to(acc)
        mask = self._mask.to(x.device)[..., None]
        zero = torch.zeros((), dtype=acc, device=x.device)
        d = torch.where(mask, delta, zero)
        xm = torch.where(mask, x, zero)
        with torch.autocast(x.device.type, enabled=False):
            self._grads[block] = torch.bmm(d.transpose(1, 2), xm)  # [B, out, in]
        if self.kfac:
            sel = self._kmask.to(x.device)
            xs = x[sel].to(torch.float64)
            ds = delta[sel].to(torch.float64)
            if block not in self.input_sums:
                self.input_sums[block] = torch.zeros((x.shape[-1], x.shape[-1]), dtype=torch.float64, device=x.device)
                self.grad_sums[block] = torch.zeros((d.shape[-1], d.shape[-1]), dtype=torch.float64, device=x.device)
            self.input_sums[block] += xs.T @ xs
            self.grad_sums[block] += ds.T @ ds

    def batch_grads(self) -> dict[str, torch.Tensor]:
        """``{block: [B, out, in]}`` of the batch just back-propagated (zeros for a block
        whose output received no gradient)."""
        B = self._mask.shape[0]
        out = {}
        for block, module in self.modules.items():
            g = self._grads.get(block)
            if g is None:
                w = module.weight
                g = torch.zeros((B, *w.shape), dtype=w.dtype, device=w.device)
            out[block] = g
        self._x.clear()
        self._grads = {}
        return out

    def sums(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{block: (sum x x^T [cols, cols], sum delta delta^T [rows, rows])}``: the raw
        float64 CPU sums over the ``n_tokens`` tokens of all batches (zeros for a block
        that received no gradient)."""
        out = {}
        for block, module in self.modules.items():
            rows, cols = module.weight.shape
            a = self.input_sums.get(block, torch.zeros((cols, cols), dtype=torch.float64))
            s = self.grad_sums.get(block, torch.zeros((rows, rows), dtype=torch.float64))
            out[block] = (a.cpu(), s.cpu())
        return out

    def factors(self, dtype: torch.dtype) -> dict[str, KFACFactors]:
        """The accumulated factors (means over the ``n_tokens`` tokens of all batches)."""
        return factors_from_sums(self.sums(), self.n_tokens, dtype)


def factors_from_sums(sums: dict[str, tuple[torch.Tensor, torch.Tensor]], n_tokens: int,
                      dtype: torch.dtype) -> dict[str, KFACFactors]:
    """K-FAC factors (means, in ``dtype``) from float64 sums over ``n_tokens`` tokens."""
    n = max(n_tokens, 1)
    return {b: KFACFactors(input_cov=(a / n).to(dtype).cpu(), grad_cov=(s / n).to(dtype).cpu(), n_tokens=n_tokens)
            for b, (a, s) in sums.items()}


# ---------------------------------------------------------------------------------------
# the extraction loop


@dataclass
class ExtractedArrays:
    """What one extraction pass produced (CPU tensors, in the input order)."""

    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    kfac: Optional[dict[str, KFACFactors]] = None
    kfac_sums: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None
    kfac_tokens: int = 0
    reps: Optional[torch.Tensor] = None
    losses: Optional[torch.Tensor] = None
    seconds: float = 0.0


def compute_features(model, encoded: Sequence[Encoded], pad_id: int, *, grads: bool = True,
                     kfac: bool = False, reps: bool = False, rep_layer: int = -1,
                     rep_pooling: str = "last-prompt", batch_size: int = 8, side: str = "right",
                     description: Optional[str] = "features", transform=None,
                     autocast_dtype: Optional[torch.dtype] = None, loss_scale: float = 1.0,
                     measure=None) -> ExtractedArrays:
    """One pass over ``encoded``: per-example gradients, K-FAC factors and representations.

    ``grads``/``kfac`` need a forward + backward per batch (see the module docstring);
    ``reps`` alone runs forward passes without gradients. Computation happens in the
    model's dtype and on its device; the model's training flag and ``requires_grad``
    flags are restored afterwards. Returns :class:`ExtractedArrays` with ``grads``
    ``{block: [n, rows, cols]}``, ``kfac`` ``{block: KFACFactors}`` (if asked), ``reps``
    ``[n, hidden]`` (if asked), ``losses`` ``[n]`` (each example's mean token loss, nats)
    and the wall-clock ``seconds``; with ``kfac`` also the raw float64 sums ``kfac_sums`` and
    their token count ``kfac_tokens``.

    ``transform`` (e.g. a projection) maps each batch's ``[B, rows, cols]`` gradients before
    they are stored; ``autocast_dtype`` (bfloat16 / float16) runs the forward under autocast
    and ``loss_scale`` scales the backward pass (see the module docstring). ``measure``
    (``m(outputs, batch) -> [B]``, :mod:`.measure`) replaces each example's loss ``L_b`` as
    the quantity differentiated (``losses`` then holds its values); ``batch`` is the padded
    batch on the model's device. The defaults compute exactly as before these options existed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if reps:
        check_pooling(rep_pooling)
    backward = grads or kfac
    t0 = time.perf_counter()
    n = len(encoded)
    device = model_device(model)
    order = length_order(encoded)
    n_batches = (n + batch_size - 1) // batch_size
    result = ExtractedArrays()
    with _grad_context(model, backward) as modules:
        capture = LoraGradientCapture(modules, kfac=kfac, grad_scale=loss_scale) if backward else None
        if grads:
            result.grads = {b: torch.zeros((n, *_stored_shape(transform, b, tuple(m.weight.shape))),
                                           dtype=_acc_dtype(m.weight.dtype)) for b, m in modules.items()}
        losses = torch.zeros(n, dtype=torch.float64)
        rep_out: Optional[torch.Tensor] = None
        params = [m.weight for m in modules.values()] if backward else []
        with _maybe(capture), progress(n_batches if description else 0, description or "") as advance:
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                index = torch.tensor(idx)
                batch = collate([encoded[i] for i in idx], pad_id, side=side)
                inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
                labels = batch["labels"].to(device)
                if capture is not None:
                    capture.begin(inputs["attention_mask"], labels)
                with _autocast(device, autocast_dtype):
                    out = model(**inputs, output_hidden_states=reps, use_cache=False)
                if backward:
                    if measure is None:
                        batch_losses = sequence_losses(out.logits, labels)
                    else:
                        batch_losses = measure(out, {**inputs, "labels": labels,
                                                     "last_prompt_index": batch["last_prompt_index"].to(device)})
                    # S = sum_b L_b: its gradient w.r.t. example b's tokens is dL_b/d(tokens of b).
                    total = batch_losses.sum() if loss_scale == 1.0 else batch_losses.sum() * loss_scale
                    torch.autograd.grad(total, params, allow_unused=True)
                    per_ex = capture.batch_grads()
                    _check_finite(batch_losses, per_ex, idx)
                    if grads:
                        for b, g in per_ex.items():
                            g = g.detach()
                            if transform is not None:
                                g = transform(b, g)
                            result.grads[b][index] = g.to(result.grads[b].dtype).cpu()
                else:
                    batch_losses = sequence_losses(out.logits.detach(), labels)
                losses[index] = batch_losses.detach().cpu().to(torch.float64)
                if reps:
                    pooled = pool_hidden(select_layer(out.hidden_states, rep_layer), inputs["attention_mask"],
                                         batch["last_prompt_index"].to(device), rep_pooling).detach().cpu()
                    pooled = pooled.to(_acc_dtype(pooled.dtype))
                    if rep_out is None:
                        rep_out = torch.empty((n, pooled.shape[1]), dtype=pooled.dtype)
                    rep_out[index] = pooled
                del out
                advance(info=f"loss {float(batch_losses.detach().mean()):.3f}")
        if kfac:
            result.kfac_sums = capture.sums()
            result.kfac_tokens = capture.n_tokens
            result.kfac = factors_from_sums(result.kfac_sums, capture.n_tokens,
                                            _acc_dtype(next(iter(modules.values())).weight.dtype))
    if reps:
        if rep_out is None:
            cfg = model.config
            hidden = (cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg).hidden_size
            rep_out = torch.empty((0, hidden), dtype=_acc_dtype(next(model.parameters()).dtype))
        result.reps = rep_out
    result.losses = losses
    result.seconds = time.perf_counter() - t0
    return result


def per_example_gradients(model, encoded: Sequence[Encoded], pad_id: int, *, batch_size: int = 8,
                          kfac: bool = False, side: str = "right",
                          description: Optional[str] = "gradients",
                          ) -> tuple[dict[str, torch.Tensor], Optional[dict[str, KFACFactors]]]:
    """``({block: [n, rows, cols]}, kfac factors or None)`` for ``encoded`` in order.

    Each ``grads[block][i]`` is the gradient of example ``i``'s mean-token loss (nats)
    w.r.t. that LoRA matrix, computed in the model's dtype (convert the model with
    ``model.to(torch.float64)`` for float64). See :func:`compute_features`.
    """
    res = compute_features(model, encoded, pad_id, grads=True, kfac=kfac, batch_size=batch_size,
                           side=side, description=description)
    return res.grads, res.kfac


class NonFiniteError(ValueError):
    """A loss or per-example gradient was NaN/inf; ``indices`` are the examples (input order)."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(f"non-finite loss or gradient for example(s) at index {indices} (a diverged "
                         "adapter, or left padding with an attention implementation that yields NaN "
                         "on fully masked rows; use side='right')")
        self.indices = indices


def _check_finite(losses: torch.Tensor, per_ex: dict[str, torch.Tensor], idx: list[int]) -> None:
    ok = torch.isfinite(losses.detach())
    for g in per_ex.values():
        ok &= torch.isfinite(g).flatten(1).all(dim=1)
    if not bool(ok.all()):
        raise NonFiniteError([i for i, good in zip(idx, ok.tolist()) if not good])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes (what is stored), the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _stored_shape(transform, block: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape) if transform is None else tuple(transform.output_shape(block, shape))


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def _grad_context(model, backward: bool):
    if backward:
        with lora_grad_mode(model) as modules:
            yield modules
        return
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            yield lora_modules(model) if _has_lora(model) else {}
    finally:
        model.train(was_training)


def _has_lora(model) -> bool:
    return any(n.endswith(("lora_A", "lora_B")) for n, _ in model.named_modules())


@contextmanager
def _maybe(ctx):
    if ctx is None:
        yield None
    else:
        with ctx as value:
            yield value
