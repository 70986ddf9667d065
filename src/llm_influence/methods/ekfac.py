"""EK-FAC influence (George et al. 2018; Grosse et al. 2023) over the LoRA blocks.

For block ``l`` with gradient matrices ``G_i`` (``[rows, cols]``) and K-FAC factors
``A = kfac[l].input_cov`` (``[cols, cols]``) and ``S = kfac[l].grad_cov`` (``[rows, rows]``):

* eigendecompose ``A = Q_A diag(.) Q_A^T`` and ``S = Q_S diag(.) Q_S^T``;
* eigenvalue correction ``Lambda[a, b] = mean_i ((Q_S^T G_i Q_A)[a, b])^2``: the diagonal of
  the block's Gauss-Newton matrix ``G_l = (1/n) sum_i g_i g_i^T`` in the Kronecker eigenbasis
  ``Q_S (x) Q_A``;
* preconditioned test gradient ``x = Q_S ((Q_S^T V Q_A) / (Lambda + lambda_l)) Q_A^T`` and
  ``score[t, i] = sum_l <x_tl, G_il>``.

EK-FAC therefore inverts ``(Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T + lambda_l I``, which
equals the damped ``G_l + lambda_l I`` exactly when the Kronecker eigenbasis diagonalises
``G_l``. The damping is the shared block damping (:mod:`.damping`); because the basis is
orthogonal, ``mean(Lambda) = mean_i ||g_il||^2 / d_l``, so the default is 0.1 times the mean
corrected eigenvalue, as in Grosse et al. (2023). The diagnostics' residual against
``G_l + lambda_l I`` is EK-FAC's approximation error, not a solver tolerance.

Needs both ``grads`` (for the correction and the scores) and ``kfac``; there is no silent
fallback to factors estimated from the gradients. Scores are float64.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from ..features.types import Features
from ._common import DTYPE, BlockwiseInverseMethod
from .base import register


@register
class EKFAC(BlockwiseInverseMethod):
    """Arguments (:class:`~.damping.DampingArguments`): ``damping`` or ``damping_ratio``."""

    name = "ekfac"
    needs = frozenset({"grads", "kfac"})


    def _check_fit(self, train: Features) -> None:
        if train.kfac is None:
            raise UserError(f"{self.name}: the training features have no K-FAC factors (kfac); "
                            "compute features with EK-FAC factors enabled")
        for b in train.blocks:
            if b not in train.kfac:
                raise UserError(f"{self.name}: no K-FAC factors for block {b!r}")
            rows, cols = train.grads[b].shape[1:]
            f = train.kfac[b]
            if tuple(f.input_cov.shape) != (cols, cols) or tuple(f.grad_cov.shape) != (rows, rows):
                raise UserError(
                    f"{self.name}: K-FAC factors of block {b!r} are input_cov {tuple(f.input_cov.shape)}, "
                    f"grad_cov {tuple(f.grad_cov.shape)}; expected ({cols}, {cols}) and ({rows}, {rows})")

    def _prepare_block(self, block: str, X: torch.Tensor, lam: float) -> tuple[torch.Tensor, ...]:
        f = self.train.kfac[block]  # type: ignore[index]
        A = f.input_cov.to(device=X.device, dtype=DTYPE)
        S = f.grad_cov.to(device=X.device, dtype=DTYPE)
        _, Q_A = torch.linalg.eigh((A + A.T) / 2)
        _, Q_S = torch.linalg.eigh((S + S.T) / 2)
        rows, cols = S.shape[0], A.shape[0]
        G = X.reshape(-1, rows, cols)
        corrected = (Q_S.T @ G @ Q_A).square().mean(dim=0)  # Lambda, [rows, cols]
        return Q_S, Q_A, corrected

    def _solve_block(self, block: str, V: torch.Tensor, X: torch.Tensor, lam: float,
                     state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        Q_S, Q_A, corrected = state
        Vm = V.reshape(-1, Q_S.shape[0], Q_A.shape[0])
        x = Q_S @ ((Q_S.T @ Vm @ Q_A) / (corrected + lam)) @ Q_A.T
        return x.reshape(V.shape)

    def _extra_diagnostics(self) -> dict[str, Any]:
        return {"corrected_eigenvalue_mean": {b: float(st[2].mean()) for b, st in self._state.items()}}
