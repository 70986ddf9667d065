"""Block-exact influence (the paper's "Original"): ``x_l = (G_l + lambda_l I)^{-1} v_l``.

``G_l = (1/n) sum_j g_jl g_jl^T`` is the block's Gauss-Newton (empirical Fisher) matrix from
the stored training gradients and ``lambda_l`` the block damping (:mod:`.damping`);
``score[t, i] = sum_l <x_tl, g_il>``. With ``X_l = [g_1l; ...; g_nl]`` (``[n, d_l]``):

* ``n < d_l``: the Woodbury identity through the ``n x n`` Gram matrix,
  ``(X^T X / n + lambda I)^{-1} v = (1/lambda) (v - X^T (n lambda I + X X^T)^{-1} X v)``;
* otherwise the ``d_l x d_l`` matrix ``X^T X / n + lambda I`` directly.

Either system is factored once per block in :meth:`fit` by Cholesky in float64 (falling
back to an eigendecomposition if Cholesky reports the matrix as not numerically positive
definite), so fit memory is ``sum_l min(n, d_l)^2`` float64 numbers. The residual in the
diagnostics checks the solve against ``G_l + lambda_l I`` (it is at rounding level).
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import BlockwiseInverseMethod
from .base import register


class SPDFactor:
    """A factorisation of a symmetric positive definite ``[k, k]`` float64 matrix."""

    def __init__(self, A: torch.Tensor) -> None:
        A = (A + A.T) / 2
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            self.kind = "cholesky"
            self._L = L
        else:
            self.kind = "eigh"
            evals, evecs = torch.linalg.eigh(A)
            self._evals, self._evecs = evals, evecs

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``A^{-1} B`` for ``B`` ``[k, m]``."""
        if self.kind == "cholesky":
            return torch.cholesky_solve(B, self._L)
        return self._evecs @ ((self._evecs.T @ B) / self._evals[:, None])


def damped_gn_factor(X: torch.Tensor, lam: float) -> tuple[str, SPDFactor]:
    """Factor the damped Gauss-Newton system of ``X`` ``[n, d]``: ``("woodbury", chol(n lam I +
    X X^T))`` when ``n < d``, else ``("primal", chol(X^T X / n + lam I))``."""
    n, d = X.shape
    if n < d:
        K = X @ X.T
        K.diagonal().add_(n * lam)
        return "woodbury", SPDFactor(K)
    A = X.T @ X / n
    A.diagonal().add_(lam)
    return "primal", SPDFactor(A)


def damped_gn_solve(kind: str, factor: SPDFactor, X: torch.Tensor, lam: float, V: torch.Tensor) -> torch.Tensor:
    """Rows of ``V`` ``[m, d]`` mapped through ``(X^T X / n + lam I)^{-1}`` (see :func:`damped_gn_factor`)."""
    if kind == "woodbury":
        Z = factor.solve((V @ X.T).T)  # (n lam I + X X^T)^{-1} X V^T, [n, m]
        return (V - Z.T @ X) / lam
    return factor.solve(V.T).T


@register
class Exact(BlockwiseInverseMethod):
    """Arguments: ``damping`` (explicit float, all blocks) or ``damping_ratio`` (default 0.1)."""

    name = "exact"
    needs = frozenset({"grads"})

    def __init__(self, damping: float | None = None, damping_ratio: float = 0.1) -> None:
        super().__init__(damping=damping, damping_ratio=damping_ratio)

    def _prepare_block(self, block: str, X: torch.Tensor, lam: float) -> tuple[str, SPDFactor]:
        return damped_gn_factor(X, lam)

    def _solve_block(self, block: str, V: torch.Tensor, X: torch.Tensor, lam: float,
                     state: tuple[str, SPDFactor]) -> torch.Tensor:
        kind, factor = state
        return damped_gn_solve(kind, factor, X, lam, V)

    def _extra_diagnostics(self) -> dict[str, Any]:
        return {"solver": {b: f"{kind}/{factor.kind}" for b, (kind, factor) in self._state.items()}}
