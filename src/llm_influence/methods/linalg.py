"""The exact damped Gauss-Newton solves shared by ``exact``, ``exact-full`` and ``projected``.

With ``X = [g_1; ...; g_n]`` (``[n, d]`` float64) and damping ``lambda > 0`` the system is
``(X^T X / n + lambda I) x = v``. Two equivalent routes, chosen by the caller:

* primal (``d <= n``): factor the ``d x d`` matrix ``X^T X / n + lambda I``;
* Woodbury (``n < d``): ``x = (v - X^T (n lambda I + K)^{-1} X v) / lambda`` with the ``n x n``
  Gram matrix ``K = X X^T`` (which the callers may accumulate block by block or in column
  pieces).

Factorisations are Cholesky in float64, falling back to an eigendecomposition when
Cholesky reports the matrix as not numerically positive definite.
"""

from __future__ import annotations

import torch


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


def primal_factor(A: torch.Tensor, lam: float) -> SPDFactor:
    """Factor ``A + lam I`` for ``A = X^T X / n`` ``[d, d]`` (``A``'s diagonal is changed in place)."""
    A.diagonal().add_(lam)
    return SPDFactor(A)


def gram_factor(K: torch.Tensor, lam: float) -> SPDFactor:
    """Factor ``n lam I + K`` for the Gram matrix ``K = X X^T`` ``[n, n]`` (``K`` is kept)."""
    n = K.shape[0]
    return SPDFactor(K + n * lam * torch.eye(n, dtype=K.dtype, device=K.device))


def woodbury_solution(V: torch.Tensor, XtZ: torch.Tensor, lam: float) -> torch.Tensor:
    """``x = (V - X^T Z) / lam`` row-wise, given ``XtZ = (X^T Z)^T = Z^T X`` ``[m, d]`` with
    ``Z = (n lam I + K)^{-1} X V^T`` (:func:`gram_factor`)."""
    return (V - XtZ) / lam


def damped_gn_factor(X: torch.Tensor, lam: float) -> tuple[str, SPDFactor]:
    """Factor the damped Gauss-Newton system of ``X`` ``[n, d]``: ``("woodbury", chol(n lam I +
    X X^T))`` when ``n < d``, else ``("primal", chol(X^T X / n + lam I))``."""
    n, d = X.shape
    if n < d:
        return "woodbury", gram_factor(X @ X.T, lam)
    return "primal", primal_factor(X.T @ X / n, lam)


def damped_gn_solve(kind: str, factor: SPDFactor, X: torch.Tensor, lam: float, V: torch.Tensor) -> torch.Tensor:
    """Rows of ``V`` ``[m, d]`` mapped through ``(X^T X / n + lam I)^{-1}`` (see :func:`damped_gn_factor`)."""
    if kind == "woodbury":
        Z = factor.solve((V @ X.T).T)  # (n lam I + X X^T)^{-1} X V^T, [n, m]
        return woodbury_solution(V, Z.T @ X, lam)
    return factor.solve(V.T).T
