"""Linear-model helpers shared by the studies: MNIST inputs, a precise trainer, exact influence.

Everything is float64 and deterministic in its seeds.

* :func:`random_relu_features`: seeded random ReLU features that keep input norms.
* :func:`fit_newton_cg`: Newton's method with conjugate-gradient steps for
  :class:`~llm_influence.linear.SoftmaxRegression` (no ``[D, D]`` Hessian is ever formed), to
  a gradient max-abs entry of ``1e-10`` or so, for models with 1e5 parameters.
* :func:`explicit_solve` / :func:`cg_solve`: the exact damped influence solve
  ``(H + mu I + damping I)^{-1} v`` with an explicit Hessian (Cholesky) or with conjugate
  gradient on Hessian-vector products (the registered ``exact-full`` method with the true
  Hessian), for the same model; tests check they agree.
* :func:`normalised_distance`: the approximation-error metric.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from ..features.types import Features, KFACFactors
from ..linear import SoftmaxRegression
from ..methods import make_method

DTYPE = torch.float64


def random_relu_features(X: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``[n, k]`` features ``phi(x) = sqrt(2/k) max(0, R x)`` with ``R`` ``[k, F]`` i.i.d. N(0, 1).

    ``R`` is drawn from a CPU generator seeded with ``seed`` (the same ``seed`` gives the same
    features on every machine). With this scaling ``E ||phi(x)||^2 = ||x||^2`` (the degree-1
    arc-cosine kernel), so the features have the same scale as the pixels they come from.
    ``X`` is ``[n, F]``; the output is float64.
    """
    X = torch.as_tensor(X, dtype=DTYPE)
    gen = torch.Generator().manual_seed(int(seed))
    R = torch.randn(int(k), X.shape[1], generator=gen, dtype=DTYPE)
    return math.sqrt(2.0 / k) * torch.relu(X @ R.T)


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, rtol: float,
                       max_iter: int) -> tuple[torch.Tensor, int, float]:
    """Solve ``A x = b`` for a symmetric positive definite operator ``apply`` (any tensor shape).

    Stops when ``||r|| <= rtol ||b||`` (recursive residual) or after ``max_iter`` products.
    Returns ``(x, iterations, relative residual ||A x - b|| / ||b|| recomputed)``.
    """
    x = torch.zeros_like(b)
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0:
        return x, 0, 0.0
    r = b.clone()
    p = r.clone()
    rs = float((r * r).sum())
    iterations = 0
    while iterations < max_iter:
        Ap = apply(p)
        pAp = float((p * Ap).sum())
        iterations += 1
        if pAp <= 0:
            break
        alpha = rs / pAp
        x += alpha * p
        r -= alpha * Ap
        rs_new = float((r * r).sum())
        if math.sqrt(rs_new) <= rtol * b_norm:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    rel = float(torch.linalg.vector_norm(apply(x) - b)) / b_norm
    return x, iterations, rel


def fit_newton_cg(model: SoftmaxRegression, X: torch.Tensor, y: torch.Tensor,
                  weights: Optional[torch.Tensor] = None, tol: float = 1e-10, max_iter: int = 100,
                  cg_rtol: float = 1e-12, cg_max_iter: int = 1000) -> SoftmaxRegression:
    """Minimise the model's objective ``L`` (see :mod:`llm_influence.linear.logistic`) in place.

    Newton steps ``s = (H + mu I)^{-1} grad L`` solved by :func:`conjugate_gradient` with
    the model's Hessian-vector products (needs ``l2 > 0``), a backtracking (Armijo) line
    search, warm-started from the current weights, until the gradient's max-abs entry is
    ``<= tol``. Costs ``O(n F C)`` per product, so it trains ``F C = 1e5`` parameters in
    seconds. ``model.fit_info`` records iterations, CG products, final loss and gradient.
    """
    if model.l2 <= 0:
        raise ValueError("fit_newton_cg needs l2 > 0 (a positive definite Hessian)")
    X = torch.as_tensor(X, dtype=DTYPE)
    loss = float(model.loss(X, y, weights))
    iterations = cg_products = 0
    grad_max = float("inf")
    while True:
        g = model.gradient(X, y, weights)
        grad_max = float(g.abs().max())
        if grad_max <= tol or iterations >= max_iter:
            break
        step, its, _ = conjugate_gradient(lambda V: model.hvp(X, y, V, weights, include_l2=True), g,
                                          cg_rtol, cg_max_iter)
        cg_products += its
        model.weight, loss = model.line_search(X, y, weights, g, step, loss)
        iterations += 1
    model.fit_info = {"method": "newton-cg", "iterations": iterations, "cg_products": cg_products,
                      "loss": loss, "grad_max_abs": grad_max, "converged": grad_max <= tol}
    return model


def explicit_solve(model: SoftmaxRegression, X: torch.Tensor, y: torch.Tensor, V: torch.Tensor,
                   damping: float = 0.0) -> torch.Tensor:
    """``[m, C*F]`` rows ``(H + mu I + damping I)^{-1} v_t`` with the explicit Hessian.

    ``H + mu I`` is the exact Hessian of the model's mean regularised training loss at its
    current weights (``model.hessian``, ``[C F, C F]`` float64, 8 (C F)^2 bytes), factored by
    Cholesky. ``V`` is ``[m, C, F]`` or ``[m, C*F]`` (test gradients).
    """
    H = model.hessian(X, y)
    if damping:
        H.diagonal().add_(float(damping))
    L = torch.linalg.cholesky(H)
    del H
    Vf = torch.as_tensor(V, dtype=DTYPE).reshape(V.shape[0], -1)
    return torch.cholesky_solve(Vf.T.contiguous(), L).T


def cg_solve(train: Features, test: Features, l2: float, damping: float = 0.0, tol: float = 1e-10,
             max_iterations: int = 5000) -> tuple[torch.Tensor, dict]:
    """``([m, C*F] solutions, diagnostics)`` of ``(H + mu I + damping I) x_t = v_t`` by CG.

    Uses the registered ``exact-full`` method with ``hessian="true"``: ``train.hvp`` must be
    the data-term Hessian-vector product (``SoftmaxRegression.features(..., hvp=True)``), and
    the L2 strength ``mu = l2`` enters as part of the explicit damping ``mu + damping``.
    Stops at relative residual ``||(H + (mu + damping) I) x - v|| / ||v|| <= tol``.
    """
    method = make_method("exact-full", hessian="true", damping=float(l2) + float(damping), tol=tol,
                         max_iterations=max_iterations)
    method.fit(train)
    sol = method.solve(test)
    x = torch.cat([sol[b].reshape(test.n, -1) for b in train.blocks], dim=1)
    return x, dict(method.diagnostics)


def input_span_features(model: SoftmaxRegression, Xtr: torch.Tensor, ytr: torch.Tensor, Xte: torch.Tensor,
                        yte: torch.Tensor, block: str = "weight") -> tuple[Features, Features]:
    """Training and test :class:`Features` of ``model`` with inputs mapped to ``U^T x``.

    ``U`` ``[F, r]`` is an orthonormal basis of the span of the training inputs (QR of
    ``Xtr^T``, ``r = n_train`` when they are independent). Gradients are ``e_i (U^T x_i)^T``
    ``[n, C, r]`` (residuals ``e`` of the full model) and the K-FAC factors are
    ``U^T (X^T X / n) U`` and ``E^T E / n``.

    Why: EK-FAC with the full factors needs an eigendecomposition of the ``[F, F]`` input
    covariance (hours for ``F = 10,001`` on one core), yet its scores are *exactly* those of
    these reduced features with the same damping: the input covariance's null space is
    orthogonal to every training input, so its corrected eigenvalues there are 0 and its
    directions never reach a score ``<x_t, g_i> = e_i^T x_t x_i``; the range directions are
    ``U`` times the reduced eigenvectors. Pass the full model's damping explicitly (the
    ratio rule would see ``r`` instead of ``F`` columns).
    """
    Xtr = torch.as_tensor(Xtr, dtype=DTYPE)
    U, _ = torch.linalg.qr(Xtr.T, mode="reduced")  # [F, r]
    Ztr, Zte = Xtr @ U, torch.as_tensor(Xte, dtype=DTYPE) @ U
    Etr, Ete = model.residuals(Xtr, ytr), model.residuals(Xte, yte)
    n = Xtr.shape[0]
    train = Features(ids=[str(i) for i in range(n)], grads={block: Etr[:, :, None] * Ztr[:, None, :]},
                     kfac={block: KFACFactors(input_cov=Ztr.T @ Ztr / n, grad_cov=Etr.T @ Etr / n, n_tokens=n)})
    test = Features(ids=[str(i) for i in range(Zte.shape[0])], grads={block: Ete[:, :, None] * Zte[:, None, :]})
    return train, test


def normalised_distance(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``[m]``: ``|| s_t/||s_t|| - r_t/||r_t|| ||`` per row (test point), in ``[0, 2]``.

    ``scores`` and ``reference`` are ``[m, n_train]`` influence vectors. A zero row is left
    at zero (distance 1 to any unit vector).
    """
    def unit(a: torch.Tensor) -> torch.Tensor:
        a = a.to(DTYPE)
        norm = torch.linalg.vector_norm(a, dim=1, keepdim=True)
        return torch.where(norm > 0, a / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(a))

    return torch.linalg.vector_norm(unit(scores) - unit(reference), dim=1)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``(fn(), seconds)`` by ``time.perf_counter``."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
