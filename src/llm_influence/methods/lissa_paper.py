"""``lissa-paper``: the LiSSA recursion exactly as the paper's authors ran it.

Their ``utils.py`` (``shared/data/PAPER_CODE_NOTES.md``, "Methods") iterates, per LoRA block
``l`` with the paper's damping ``lambda_l`` (:mod:`.damping`) and test gradient ``v_l``,

    r_0 = v_l,    r_{t+1} = v_l + r_t - (1/n) sum_j (<g_jl, r_t> g_jl - lambda_l r_t) / s

with the fixed divisor ``s = 1000`` and ``iterations`` steps (10 in their ICLR-era code, 3 in
v2), and scores ``score[t, i] = sum_l <r_T, g_il>`` (their ``IF = -sum_l <hvp, g>``, sign
flipped to this library's convention). Written with ``G_l = (1/n) sum_j g_jl g_jl^T``:

    r_T = sum_{k=0..T} (I - (G_l - lambda_l I) / s)^k v_l

which differs from :mod:`.lissa` (the correct solver) in three ways: the damping enters with
a minus sign, so the limit (where it exists) is ``s (G_l - lambda_l I)^{-1} v_l``, not an
inverse of the damped ``G_l + lambda_l I``; there is no final division by ``s``; and ``s`` is
fixed instead of scaled to the largest eigenvalue, so with the paper's tiny ``lambda_l`` and
``||G_l|| << s`` the result stays close to ``(T + 1) v_l`` - GradSim with a small
curvature correction. When ``n < d_l``, ``G_l - lambda_l I`` has the eigenvalue
``-lambda_l`` and the recursion grows along those directions by ``1 + lambda_l / s`` per
step (it never converges).

Diagnostics: the relative residual ``||(G_l + lambda_l I) r - v|| / ||v||`` against the
damped Gauss-Newton block like every other inverse method (large: ``r`` is not an inverse,
nor scaled like one), and ``residual_best_scale_*``: the same residual after the best
positive rescaling ``c r`` (``c = <H r, v> / ||H r||^2``), which is what matters for a
ranking, since scores are compared within a test row only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._common import BlockwiseInverseMethod, ResidualStats, gn_apply, relative_residual
from .arguments import argument, positive_float, positive_int
from .base import register
from .damping import DampingArguments

PAPER_SCALE = 1000.0


@dataclass(frozen=True)
class LiSSAPaperArguments(DampingArguments):
    iterations: int = argument(10, "recursion steps T (the authors' ICLR-era code: 10; their v2 code: 3)",
                               check=positive_int)
    scale: float = argument(PAPER_SCALE, "the fixed divisor s of the authors' recursion", check=positive_float)


@register
class LiSSAPaper(BlockwiseInverseMethod):
    """Arguments: :class:`LiSSAPaperArguments` (``iterations``, ``scale``, ``damping`` /
    ``damping_ratio``)."""

    name = "lissa-paper"
    needs = frozenset({"grads"})
    Arguments = LiSSAPaperArguments

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._scaled = ResidualStats()

    def fit(self, train):
        self._scaled = ResidualStats()
        return super().fit(train)

    def _solve_block(self, block: str, V: torch.Tensor, X: torch.Tensor, lam: float, state: Any) -> torch.Tensor:
        n = X.shape[0]
        s = self.args.scale
        r = V.clone()
        for _ in range(self.args.iterations):
            r = V + r - ((r @ X.T) @ X / n - lam * r) / s
        Hr = gn_apply(X, lam, r)
        den = Hr.square().sum(dim=1, keepdim=True)
        c = torch.where(den > 0, (Hr * V).sum(dim=1, keepdim=True) / torch.where(den > 0, den, 1.0), 0.0)
        self._scaled.add(block, relative_residual(c.clamp_min(0) * Hr, V))
        return r

    def _extra_diagnostics(self) -> dict[str, Any]:
        scaled = self._scaled.summary(per_block=False)
        return {"iterations": self.args.iterations, "scale": self.args.scale,
                "residual_best_scale_max": scaled["residual_max"], "residual_best_scale_mean": scaled["residual_mean"]}
