"""Damping shared by every inverse-Hessian method.

The paper (and its code) damps each LoRA block ``l`` with

    lambda_l = damping_ratio * mean_i( mean_k g_ilk^2 )

i.e. ``damping_ratio`` times the mean over training examples of the mean squared entry of
the example's block gradient (units: squared loss-gradient, nats^2 per parameter^2). The
paper writes this as ``1 / lambda_c`` with ``lambda_c = 10``, so ``damping_ratio = 0.1``.

Because ``mean_k g_ilk^2 = ||g_il||^2 / d_l``, ``lambda_l`` is also ``damping_ratio`` times the
mean eigenvalue ``trace(G_l) / d_l`` of the block's Gauss-Newton matrix
``G_l = (1/n) sum_i g_il g_il^T``: the convention of Grosse et al. (2023) for EK-FAC.

An explicit ``damping`` float overrides the ratio and is used for every block.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..features.types import Features

DEFAULT_DAMPING_RATIO = 0.1


def check_damping_arguments(method: str, damping: float | None, damping_ratio: float) -> tuple[float | None, float]:
    """Validate ``damping`` (None or a positive float) and ``damping_ratio`` (positive float)."""
    if damping is not None:
        try:
            damping = float(damping)
        except (TypeError, ValueError):
            raise UserError(f"{method}: damping must be a positive number or None, got {damping!r}") from None
        if not (damping > 0 and math.isfinite(damping)):
            raise UserError(f"{method}: damping must be a positive finite number, got {damping!r}")
    try:
        damping_ratio = float(damping_ratio)
    except (TypeError, ValueError):
        raise UserError(f"{method}: damping_ratio must be a positive number, got {damping_ratio!r}") from None
    if not (damping_ratio > 0 and math.isfinite(damping_ratio)):
        raise UserError(f"{method}: damping_ratio must be a positive finite number, got {damping_ratio!r}")
    return damping, damping_ratio


def mean_squared_entry(g: torch.Tensor) -> float:
    """``mean_i mean_k g[i, ...]^2`` of a ``[n, ...]`` tensor, accumulated in float64."""
    if g.numel() == 0:
        return 0.0
    return float(g.to(torch.float64).square().mean())


def block_damping(train: Features, damping: float | None = None,
                  damping_ratio: float = DEFAULT_DAMPING_RATIO) -> dict[str, float]:
    """Per-block damping ``{block: lambda_l}`` (see the module docstring).

    A block whose training gradients are all zero gets ``lambda_l = 0``; its contribution to
    every influence score is exactly zero for any positive damping (all ``g_il = 0``), so the
    methods skip it.
    """
    if damping is not None:
        return {b: float(damping) for b in train.blocks}
    return {b: damping_ratio * mean_squared_entry(train.grads[b]) for b in train.blocks}


def global_damping(train: Features, damping: float | None = None,
                   damping_ratio: float = DEFAULT_DAMPING_RATIO) -> float:
    """One damping for all parameters jointly: ``damping_ratio`` times the mean squared entry
    of the concatenated gradient (the parameter-count-weighted mean of the per-block values).
    """
    if damping is not None:
        return float(damping)
    total = 0.0
    count = 0
    for b in train.blocks:
        g = train.grads[b]
        total += float(g.to(torch.float64).square().sum())
        count += g.numel()
    if count == 0:
        raise UserError("cannot derive a damping from empty training gradients; pass an explicit damping")
    return damping_ratio * total / count
