"""Block-exact influence (the paper's "Original"): ``x_l = (G_l + lambda_l I)^{-1} v_l``.

``G_l = (1/n) sum_j g_jl g_jl^T`` is the block's Gauss-Newton (empirical Fisher) matrix from
the stored training gradients and ``lambda_l`` the block damping (:mod:`.damping`);
``score[t, i] = sum_l <x_tl, g_il>``. With ``X_l = [g_1l; ...; g_nl]`` (``[n, d_l]``):

* ``n < d_l``: the Woodbury identity through the ``n x n`` Gram matrix,
  ``(X^T X / n + lambda I)^{-1} v = (1/lambda) (v - X^T (n lambda I + X X^T)^{-1} X v)``;
* otherwise the ``d_l x d_l`` matrix ``X^T X / n + lambda I`` directly.

Either system (:mod:`.linalg`) is factored once per block in :meth:`fit` by Cholesky in float64 (falling
back to an eigendecomposition if Cholesky reports the matrix as not numerically positive
definite), so fit memory is ``sum_l min(n, d_l)^2`` float64 numbers. The residual in the
diagnostics checks the solve against ``G_l + lambda_l I`` (it is at rounding level).
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import BlockwiseInverseMethod
from .base import register
from .linalg import SPDFactor, damped_gn_factor, damped_gn_solve


@register
class Exact(BlockwiseInverseMethod):
    """Arguments (:class:`~.damping.DampingArguments`): ``damping`` or ``damping_ratio``."""

    name = "exact"
    needs = frozenset({"grads"})

    def _prepare_block(self, block: str, X: torch.Tensor, lam: float) -> tuple[str, SPDFactor]:
        return damped_gn_factor(X, lam)

    def _solve_block(self, block: str, V: torch.Tensor, X: torch.Tensor, lam: float,
                     state: tuple[str, SPDFactor]) -> torch.Tensor:
        kind, factor = state
        return damped_gn_solve(kind, factor, X, lam, V)

    def _extra_diagnostics(self) -> dict[str, Any]:
        return {"solver": {b: f"{kind}/{factor.kind}" for b, (kind, factor) in self._state.items()}}
