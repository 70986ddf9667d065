"""Multinomial logistic regression (a linear softmax classifier) with exact derivatives.

Model: ``p(y | x) = softmax(W x)`` with ``W`` ``[C, F]`` (``C`` classes, ``F`` features; append
a constant-1 feature with :func:`with_bias` for an intercept). Everything is float64.

Per-example loss ``l_i = -log p(y_i | x_i)`` (nats). The training objective with example
weights ``w`` (default all 1) and L2 strength ``mu`` is

    L(W) = (1/n) sum_i w_i l_i(W) + (mu/2) ||W||^2,        n = number of rows,

so setting ``w_i = 0`` removes example ``i`` while keeping the ``1/n`` normalisation (what
:meth:`SoftmaxRegression.leave_one_out` does; the influence-function approximation is
derived for exactly this objective).

Derivatives, with ``e_i = p_i - onehot(y_i)`` and ``D_i = diag(p_i) - p_i p_i^T``:

* per-example gradient ``grad l_i = e_i x_i^T`` (``[C, F]``);
* Hessian of ``L`` ``(1/n) sum_i w_i D_i (x) x_i x_i^T + mu I`` (``[C F, C F]``, row-major
  ``vec(W)``: index ``c F + f``), which is also the Gauss-Newton matrix (the model is linear in
  ``W``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..features.types import Features, KFACFactors

DTYPE = torch.float64
BLOCK = "weight"


def with_bias(X: torch.Tensor) -> torch.Tensor:
    """``[n, F + 1]``: ``X`` with a constant-1 column appended (an intercept)."""
    X = torch.as_tensor(X, dtype=DTYPE)
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=DTYPE)], dim=1)


def _weights(n: int, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        return torch.ones(n, dtype=DTYPE)
    w = torch.as_tensor(weights, dtype=DTYPE)
    if w.shape != (n,):
        raise ValueError(f"weights must be [{n}], got {tuple(w.shape)}")
    return w


class SoftmaxRegression:
    """``softmax(W x)`` classifier with L2 strength ``l2`` (``mu`` above); ``weight`` ``[C, F]``."""

    def __init__(self, n_features: int, n_classes: int, l2: float = 0.0,
                 weight: Optional[torch.Tensor] = None) -> None:
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.n_features, self.n_classes, self.l2 = int(n_features), int(n_classes), float(l2)
        if weight is None:
            weight = torch.zeros(self.n_classes, self.n_features, dtype=DTYPE)
        weight = torch.as_tensor(weight, dtype=DTYPE).clone()
        if weight.shape != (self.n_classes, self.n_features):
            raise ValueError(f"weight must be [{n_classes}, {n_features}], got {tuple(weight.shape)}")
        self.weight = weight
        self.fit_info: dict = {}

    @property
    def dim(self) -> int:
        return self.n_classes * self.n_features

    def copy(self) -> "SoftmaxRegression":
        return SoftmaxRegression(self.n_features, self.n_classes, self.l2, self.weight)

    def _check(self, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.as_tensor(X, dtype=DTYPE)
        y = torch.as_tensor(y, dtype=torch.long)
        if X.dim() != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must be [n, {self.n_features}], got {tuple(X.shape)}")
        if y.shape != (X.shape[0],):
            raise ValueError(f"y must be [{X.shape[0]}], got {tuple(y.shape)}")
        return X, y

    # ----------------------------------------------------------------- values and derivatives

    def probs(self, X: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[n, C]`` class probabilities."""
        W = self.weight if weight is None else weight
        return torch.softmax(torch.as_tensor(X, dtype=DTYPE) @ W.T, dim=1)

    def per_example_losses(self, X: torch.Tensor, y: torch.Tensor,
                           weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[n]`` cross-entropy losses ``l_i`` (nats, no L2 term)."""
        X, y = self._check(X, y)
        W = self.weight if weight is None else weight
        logp = torch.log_softmax(X @ W.T, dim=1)
        return -logp.gather(1, y[:, None]).squeeze(1)

    def loss(self, X: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor] = None,
             weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scalar objective ``L`` (module docstring) at ``weight`` (default: the model's)."""
        W = self.weight if weight is None else weight
        losses = self.per_example_losses(X, y, W)
        w = _weights(losses.shape[0], weights)
        return (w * losses).sum() / losses.shape[0] + 0.5 * self.l2 * W.square().sum()

    def residuals(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[n, C]``: ``e_i = p_i - onehot(y_i)``, the gradient of ``l_i`` w.r.t. the logits."""
        X, y = self._check(X, y)
        return self.probs(X) - torch.nn.functional.one_hot(y, self.n_classes).to(DTYPE)

    def per_example_grads(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[n, C, F]``: ``grad_W l_i = e_i x_i^T`` (no L2 term)."""
        X, y = self._check(X, y)
        return self.residuals(X, y)[:, :, None] * X[:, None, :]

    def gradient(self, X: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[C, F]`` gradient of ``L``."""
        X, y = self._check(X, y)
        w = _weights(X.shape[0], weights)
        return (w[:, None] * self.residuals(X, y)).T @ X / X.shape[0] + self.l2 * self.weight

    def hessian(self, X: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor] = None,
                include_l2: bool = True) -> torch.Tensor:
        """``[C F, C F]`` Hessian of ``L`` (of the data term only if ``include_l2`` is False)."""
        X, y = self._check(X, y)
        n, C, F = X.shape[0], self.n_classes, self.n_features
        w = _weights(n, weights)
        p = self.probs(X)
        # sum_i w_i D_i (x) x_i x_i^T = blockdiag_c(X^T diag(w p_c) X) - Z^T diag(w) Z, Z_i = p_i (x) x_i
        Z = (p[:, :, None] * X[:, None, :]).reshape(n, C * F)
        H = -(Z.T * w[None, :]) @ Z
        diag_blocks = (X.T[None, :, :] * (w[:, None] * p).T[:, None, :]) @ X  # [C, F, F]
        for c in range(C):
            H[c * F:(c + 1) * F, c * F:(c + 1) * F] += diag_blocks[c]
        H /= n
        if include_l2:
            H.diagonal().add_(self.l2)
        return (H + H.T) / 2

    def hvp(self, X: torch.Tensor, y: torch.Tensor, V: torch.Tensor, weights: Optional[torch.Tensor] = None,
            include_l2: bool = False) -> torch.Tensor:
        """``[C, F]`` Hessian-vector product with direction ``V`` ``[C, F]`` (data term by default)."""
        X, y = self._check(X, y)
        w = _weights(X.shape[0], weights)
        V = torch.as_tensor(V, dtype=DTYPE)
        p = self.probs(X)
        U = X @ V.T  # [n, C]
        DU = p * U - p * (p * U).sum(dim=1, keepdim=True)
        out = (w[:, None] * DU).T @ X / X.shape[0]
        return out + self.l2 * V if include_l2 else out

    def hvp_callable(self, X: torch.Tensor, y: torch.Tensor,
                     block: str = BLOCK) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """``Features.hvp`` for the mean data loss (no L2: pass ``damping=l2`` to a method to
        get the Hessian of the regularised objective). Frozen at the current weights."""
        X, y = self._check(X, y)
        p = self.probs(X)  # frozen: the weights may change later, the callable must not
        n = X.shape[0]

        def hvp(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            v = vectors[block]
            U = X @ v.to(DTYPE).T
            DU = p * U - p * (p * U).sum(dim=1, keepdim=True)
            return {block: (DU.T @ X / n).to(v.dtype)}

        return hvp

    # ----------------------------------------------------------------- training

    def fit(self, X: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor] = None,
            method: str = "newton", tol: float = 1e-10, max_iter: int = 100) -> "SoftmaxRegression":
        """Minimise ``L`` from the current weights (a warm start), in float64.

        ``method="newton"``: damped Newton steps with the exact Hessian and a backtracking
        line search, until the gradient's max-abs entry is ``<= tol`` (needs ``l2 > 0``, or a
        Hessian that is positive definite for other reasons). ``method="lbfgs"``: torch's
        L-BFGS with a strong-Wolfe line search, ``tolerance_grad=tol``. ``fit_info`` records
        iterations, final loss and gradient norm.
        """
        X, y = self._check(X, y)
        if method == "newton":
            self._fit_newton(X, y, weights, tol, max_iter)
        elif method == "lbfgs":
            self._fit_lbfgs(X, y, weights, tol, max_iter)
        else:
            raise ValueError(f"method must be 'newton' or 'lbfgs', got {method!r}")
        return self

    def _fit_newton(self, X, y, weights, tol, max_iter) -> None:
        loss = float(self.loss(X, y, weights))
        iterations = 0
        while True:
            g = self.gradient(X, y, weights)
            grad_max = float(g.abs().max())
            if grad_max <= tol or iterations >= max_iter:
                break
            L, info = torch.linalg.cholesky_ex(self.hessian(X, y, weights))
            if int(info) != 0:
                raise ValueError("Newton: the Hessian is not positive definite; use l2 > 0 or method='lbfgs'")
            step = torch.cholesky_solve(g.reshape(-1, 1), L).reshape(g.shape)
            self.weight, loss = self.line_search(X, y, weights, g, step, loss)
            iterations += 1
        self.fit_info = {"method": "newton", "iterations": iterations, "loss": loss,
                         "grad_max_abs": grad_max, "converged": grad_max <= tol}

    def line_search(self, X, y, weights, grad: torch.Tensor, step: torch.Tensor,
                    loss: float) -> tuple[torch.Tensor, float]:
        """Backtracking (Armijo) search along ``-step`` from the current weight; returns the
        accepted ``(weight, loss)``. Does not change ``self.weight``."""
        slope = float((grad * step).sum())
        t = 1.0
        while True:
            candidate = self.weight - t * step
            new = float(self.loss(X, y, weights, weight=candidate))
            # a Newton decrement at rounding level: loss differences carry no information,
            # and the full step is the right one (quadratic convergence region)
            if slope <= 1e-13 * max(1.0, abs(loss)) or new <= loss - 1e-4 * t * slope or t < 1e-10:
                return candidate, new
            t /= 2

    def _fit_lbfgs(self, X, y, weights, tol, max_iter) -> None:
        W = self.weight.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([W], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = self.loss(X, y, weights, weight=W)
            value.backward()
            return value

        opt.step(closure)
        self.weight = W.detach().clone()
        g = self.gradient(X, y, weights)
        state = opt.state[opt.param_groups[0]["params"][0]]
        self.fit_info = {"method": "lbfgs", "iterations": int(state.get("n_iter", 0)),
                         "loss": float(self.loss(X, y, weights)), "grad_max_abs": float(g.abs().max()),
                         "converged": float(g.abs().max()) <= tol}

    def leave_one_out(self, X: torch.Tensor, y: torch.Tensor, index: int, **fit_kwargs) -> "SoftmaxRegression":
        """A copy retrained without row ``index`` (weight 0, normalisation still ``1/n``),
        warm-started from this model's weights (which should be the optimum on all rows)."""
        X, y = self._check(X, y)
        weights = torch.ones(X.shape[0], dtype=DTYPE)
        weights[index] = 0.0
        return self.copy().fit(X, y, weights=weights, **fit_kwargs)

    # ----------------------------------------------------------------- attribution features

    def features(self, X: torch.Tensor, y: torch.Tensor, ids: Optional[Sequence[str]] = None,
                 kfac: bool = True, hvp: bool = False, block: str = BLOCK) -> Features:
        """Per-example gradients as :class:`Features` with one block ``[n, C, F]``.

        ``kfac``: attach K-FAC factors, ``input_cov = X^T X / n`` ``[F, F]`` and
        ``grad_cov = E^T E / n`` ``[C, C]`` with ``E`` the residuals ``p - onehot`` (one "token"
        per example). ``hvp``: attach :meth:`hvp_callable` of these rows (use it on the
        training features).
        """
        X, y = self._check(X, y)
        n = X.shape[0]
        if ids is None:
            ids = [str(i) for i in range(n)]
        E = self.residuals(X, y)
        factors = None
        if kfac:
            factors = {block: KFACFactors(input_cov=X.T @ X / n, grad_cov=E.T @ E / n, n_tokens=n)}
        return Features(ids=list(ids), grads={block: E[:, :, None] * X[:, None, :]}, kfac=factors,
                        hvp=self.hvp_callable(X, y, block) if hvp else None)
