"""DataInf (Kwon et al. 2024), as used by the paper: a block-wise Sherman-Morrison average.

For block ``l`` with damping ``lambda_l`` (see :mod:`.damping`) and test gradient ``v_l``:

    x_l = (1 / (n lambda_l)) sum_j [ v_l - (<v_l, g_jl> / (lambda_l + ||g_jl||^2)) g_jl ]
    score[t, i] = sum_l <x_tl, g_il>

``x_l`` is the average of the exact inverses ``(g_jl g_jl^T + lambda_l I)^{-1} v_l`` of the
rank-one matrices, which approximates ``(G_l + lambda_l I)^{-1} v_l`` (with
``G_l = (1/n) sum_j g_jl g_jl^T``) only when the inverse of the average is close to the
average of the inverses. The diagnostics' residual ``||(G_l + lambda_l I) x_l - v_l|| /
||v_l||`` is therefore DataInf's approximation error, not a solver tolerance.

All test examples are solved at once with matrix products (cost ``O(n_test n d_l)`` per
block). Scores are float64.
"""

from __future__ import annotations

import torch

from ._common import BlockwiseInverseMethod
from .base import register


@register
class DataInf(BlockwiseInverseMethod):
    """Arguments (:class:`~.damping.DampingArguments`): ``damping`` or ``damping_ratio``."""

    name = "datainf"
    needs = frozenset({"grads"})


    def _prepare_block(self, block: str, X: torch.Tensor, lam: float) -> torch.Tensor:
        return X.square().sum(dim=1)  # ||g_jl||^2, [n]

    def _solve_block(self, block: str, V: torch.Tensor, X: torch.Tensor, lam: float,
                     state: torch.Tensor) -> torch.Tensor:
        n = X.shape[0]
        coef = (V @ X.T) / (lam + state)[None, :]  # [m, n]
        return (V - coef @ X / n) / lam
