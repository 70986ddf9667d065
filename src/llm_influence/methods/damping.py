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

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError
from ..features.types import Features
from .arguments import MethodArguments, argument, optional_positive_float, positive_float

DEFAULT_DAMPING_RATIO = 0.1


@dataclass(frozen=True)
class DampingArguments(MethodArguments):
    """The damping arguments every inverse-Hessian method declares (shared on the command
    line as ``--damping`` / ``--damping-ratio``)."""

    damping: Optional[float] = argument(
        None, "explicit damping lambda for every block/parameter; None or 'auto': damping_ratio x the mean "
              "squared training-gradient entry", check=optional_positive_float, shared=True)
    damping_ratio: float = argument(
        DEFAULT_DAMPING_RATIO, "the paper's 1/lambda_c: damping = ratio x mean squared training-gradient entry",
        check=positive_float, shared=True)


def damping_source(damping: float | None, damping_ratio: float) -> str:
    """``"explicit"`` or ``"ratio R"`` (recorded in the diagnostics)."""
    return "explicit" if damping is not None else f"ratio {damping_ratio}"


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
    return damping_from_sums(damping, damping_ratio, total, count)


def damping_from_sums(damping: float | None, damping_ratio: float, sum_squares: float, count: int) -> float:
    """:func:`global_damping` from an already accumulated ``sum of squared entries`` over
    ``count`` entries (for methods that stream or shard the training gradients)."""
    if damping is not None:
        return float(damping)
    if count == 0:
        raise UserError("cannot derive a damping from empty training gradients; pass an explicit damping")
    return damping_ratio * sum_squares / count
