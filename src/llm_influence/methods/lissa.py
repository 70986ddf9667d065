"""LiSSA (Agarwal et al. 2017): a truncated Neumann series toward ``(H + lambda I)^{-1} v``.

With scale ``s`` and ``r_0 = v``, each of the ``iterations`` steps is

    r_{t+1} = v + r_t - (H + lambda I) r_t / s,        estimate x = r_T / s,

so ``x = (1/s) sum_{k=0..T} (I - (H + lambda I)/s)^k v``, which converges to the exact
``(H + lambda I)^{-1} v`` when every eigenvalue of ``H + lambda I`` lies in ``(0, 2s)``. (The
paper's code subtracts ``lambda r`` inside the Hessian term and so iterates toward
``(G - lambda I)^{-1} v``; this implementation does not.) The error after ``T`` steps is
``(I - (H + lambda I)/s)^{T+1} (H + lambda I)^{-1} v``: it shrinks by at least the factor
``1 - lambda_min/s`` per step, so a few steps are far from converged when the damping is
small relative to the largest eigenvalue.

Two choices of ``H`` (argument ``hessian``):

* ``"gauss-newton"`` (default): block-wise, ``H_l = G_l = (1/n) sum_j g_jl g_jl^T`` from the
  stored training gradients, with the block damping ``lambda_l`` (:mod:`.damping`). ``G_l``
  is never formed: ``G_l r = X_l^T (X_l r) / n``. All test examples iterate together
  (``O(T n_test n d_l)`` per block). ``scale="auto"`` uses, per block,
  ``s_l = 1.05 (lambda_max(G_l) + lambda_l)``, with ``lambda_max(G_l)`` exact from the smaller
  of the two Gram matrices when ``min(n, d_l) <= 512`` and otherwise from
  ``power_iterations`` steps of power iteration (cost ``O(n d_l)`` each; it approaches
  ``lambda_max`` from below, and an underestimate by less than a factor 2 still converges,
  since the condition is ``s > lambda_max / 2``).
* ``"true"``: ``H`` is the Hessian of the mean training loss over *all* blocks jointly,
  through ``Features.hvp`` on the training features, with one damping ``lambda`` for all
  parameters (:func:`.damping.global_damping`: explicit, or ``damping_ratio`` times the mean
  squared entry of the concatenated training gradients) and one scale ``s``
  (``"auto"``: 1.05 times the largest ``|eigenvalue|`` of ``H + lambda I`` from power
  iteration with Hessian-vector products, seeded by ``seed``). The ``hvp`` callable takes a
  single vector, so test examples are iterated one at a time (``T + 1`` products each). The
  true Hessian may be indefinite; then convergence is not guaranteed and the residual says
  so.

Diagnostics: relative residual ``||(H + lambda I) x - v|| / ||v||`` against the operator
being inverted (per block ``G_l + lambda_l I`` for Gauss-Newton; the joint damped true
Hessian for ``"true"``, at the cost of one extra product per test example), iterations,
scale(s), damping(s). Scores are float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from ..features.types import Features
from ._common import (DTYPE, BlockwiseInverseMethod, HvpOperator, ResidualStats, check_compatible,
                      concat_row, device_of, flat64, power_iteration, relative_residual, require_grads)
from .arguments import argument, integer, positive_float_or_auto, positive_int
from .base import register
from .damping import DampingArguments, global_damping

AUTO_SCALE_MARGIN = 1.05
EXACT_EIG_MAX_DIM = 512
HESSIANS = ("gauss-newton", "true")
_TEST_CHUNK = 64
TRUE_HESSIAN_REFERENCE = "damped true Hessian H + lambda I over all blocks jointly (Features.hvp)"


def gn_largest_eigenvalue(X: torch.Tensor, power_iterations: int, seed: int) -> float:
    """``lambda_max(X^T X / n)`` for ``X`` ``[n, d]`` float64 (exact or power iteration)."""
    n, d = X.shape
    if min(n, d) <= EXACT_EIG_MAX_DIM:
        gram = X @ X.T if n <= d else X.T @ X
        return float(torch.linalg.eigvalsh(gram / n)[-1].clamp_min(0))
    return power_iteration(lambda u: X.T @ (X @ u) / n, d, power_iterations, seed, X.device)


@dataclass(frozen=True)
class LiSSAArguments(DampingArguments):
    iterations: int = argument(10, "Neumann-series steps T", check=positive_int)
    scale: float | str = argument("auto", "scale s (the series converges when s > lambda_max / 2); 'auto': "
                                  "1.05 x (largest eigenvalue + damping)", check=positive_float_or_auto)
    hessian: str = argument("gauss-newton", "gauss-newton: block-wise G_l from the stored gradients; true: "
                            "the joint Hessian through Hessian-vector products", choices=HESSIANS)
    power_iterations: int = argument(50, "power-iteration steps for scale='auto' when no exact eigenvalue "
                                     "is computed", check=positive_int)
    seed: int = argument(0, "seed of the power-iteration start vector", check=integer)


@register
class LiSSA(BlockwiseInverseMethod):
    """Arguments: :class:`LiSSAArguments` (``iterations``, ``scale``, ``hessian``,
    ``power_iterations``, ``seed``, ``damping`` / ``damping_ratio``)."""

    name = "lissa"
    needs = frozenset({"grads"})
    Arguments = LiSSAArguments

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.args.hessian == "true":
            self.residual_reference = TRUE_HESSIAN_REFERENCE
        self.scale_: dict[str, float] | float = {}

    def required_features(self) -> frozenset[str]:
        return frozenset({"grads", "hvp"}) if self.args.hessian == "true" else frozenset(self.needs)

    # ---------------------------------------------------------------- Gauss-Newton, block-wise

    def _prepare_block(self, block: str, X: torch.Tensor, lam: float) -> float:
        if self.args.scale != "auto":
            return float(self.args.scale)
        return AUTO_SCALE_MARGIN * (gn_largest_eigenvalue(X, self.args.power_iterations, self.args.seed) + lam)

    def _solve_block(self, block: str, V: torch.Tensor, X: torch.Tensor, lam: float, state: float) -> torch.Tensor:
        s = state
        n = X.shape[0]
        r = V.clone()
        for _ in range(self.args.iterations):
            r = V + r - ((r @ X.T) @ X / n + lam * r) / s
        return r / s

    def _extra_diagnostics(self) -> dict[str, Any]:
        scale = self.scale_ if self.args.hessian == "true" else dict(self._state)
        return {"hessian": self.args.hessian, "iterations": self.args.iterations, "scale": scale,
                "scale_source": "auto" if self.args.scale == "auto" else "explicit"}

    # ---------------------------------------------------------------- true Hessian, joint

    def fit(self, train: Features) -> "LiSSA":
        if self.args.hessian == "gauss-newton":
            return super().fit(train)
        require_grads(self.name, train, "training")
        self._train = train
        self._device = device_of(train)
        self._op = HvpOperator(self.name, train)
        lam = global_damping(train, self.args.damping, self.args.damping_ratio)
        if lam <= 0:
            raise UserError(f"{self.name}: the training gradients are all zero, so the damping ratio "
                            "gives no damping; pass an explicit damping")
        self._lam = lam
        self.damping_ = {"all": lam}
        if self.args.scale == "auto":
            top = power_iteration(lambda u: self._op(u) + lam * u, self._op.dim, self.args.power_iterations,
                                  self.args.seed, self._device)
            self.scale_ = AUTO_SCALE_MARGIN * top
        else:
            self.scale_ = float(self.args.scale)
        self._state = {}
        self._stats = ResidualStats()
        self._refresh_true_diagnostics()
        return self

    def _true_solve_one(self, v: torch.Tensor) -> torch.Tensor:
        op, lam, s = self._op, self._lam, float(self.scale_)
        r = v.clone()
        for _ in range(self.args.iterations):
            r = v + r - (op(r) + lam * r) / s
        x = r / s
        self._stats.add("all", relative_residual(op(x) + lam * x, v))
        return x

    def _true_solutions(self, test: Features):
        """Yield ``(rows, X_chunk [k, D])`` for chunks of test rows."""
        check_compatible(self.name, self.train, test)
        blocks = self._op.blocks
        for start in range(0, test.n, _TEST_CHUNK):
            rows = list(range(start, min(test.n, start + _TEST_CHUNK)))
            xs = torch.stack([self._true_solve_one(concat_row(test, blocks, t, self._device)) for t in rows])
            yield rows, xs

    def solve(self, test: Features) -> dict[str, torch.Tensor]:
        if self.args.hessian == "gauss-newton":
            return super().solve(test)
        chunks = [xs for _, xs in self._true_solutions(test)]
        x = torch.cat(chunks) if chunks else torch.zeros(0, self._op.dim, dtype=DTYPE, device=self._device)
        self._refresh_true_diagnostics()
        parts = torch.split(x, self._op.sizes, dim=1)
        return {b: p.reshape(test.grads[b].shape) for b, p in zip(self._op.blocks, parts)}

    def score(self, test: Features) -> torch.Tensor:
        if self.args.hessian == "gauss-newton":
            return super().score(test)
        train = self.train
        scores = torch.zeros(test.n, train.n, dtype=DTYPE, device=self._device)
        for rows, xs in self._true_solutions(test):
            start = 0
            for b, size in zip(self._op.blocks, self._op.sizes):
                scores[rows[0]:rows[-1] + 1] += xs[:, start:start + size] @ flat64(train, b, self._device).T
                start += size
        self._refresh_true_diagnostics()
        return scores

    def _refresh_true_diagnostics(self) -> None:
        self._refresh_diagnostics()
        self.diagnostics["hvp_calls"] = self._op.calls
