"""Exact influence with the full damped Hessian over all blocks jointly (``exact-full``).

``x = (H + lambda I)^{-1} v`` over the concatenation of every block (``D = sum_l d_l``
parameters), one damping ``lambda`` for all of them (:func:`.damping.global_damping`:
explicit, or ``damping_ratio`` times the mean squared entry of the concatenated training
gradients), and ``score[t, i] = <x_t, g_i>``. Unlike ``exact`` it keeps the cross-block
curvature.

* ``hessian="gauss-newton"`` (default): ``H = G = (1/n) sum_j g_j g_j^T`` over concatenated
  gradients, solved exactly in float64 as in ``exact``: when ``n < D`` through the Woodbury
  identity with the ``n x n`` Gram matrix ``K = sum_l X_l X_l^T`` (accumulated block by
  block, so the ``[n, D]`` concatenation is never formed); otherwise through the
  ``D x D`` matrix (then ``D <= n``, and the concatenation is small).
* ``hessian="true"``: ``H`` is the Hessian of the mean training loss through
  ``Features.hvp``, solved by conjugate gradient for each test example (the callable takes
  one vector) until ``||r_k|| <= tol ||v||`` or ``max_iterations`` products. CG needs
  ``H + lambda I`` positive definite; if it meets a direction of non-positive curvature it
  stops there and the diagnostics count it. With float32 Hessian-vector products a
  relative residual below about 1e-6 is out of reach: the run then stops at
  ``max_iterations`` and reports non-convergence (and warns).

Diagnostics: the relative residual ``||(H + lambda I) x - v|| / ||v||`` of the returned
``x`` recomputed from scratch (against the joint damped Gauss-Newton matrix, or the joint
damped true Hessian), max and mean over test examples; the damping; for CG, iterations
(max and mean), how many examples converged and how many hit negative curvature. Scores
are float64.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from ..features.types import Features
from ._common import (DTYPE, HvpOperator, ResidualStats, check_compatible, concat_row, device_of, flat64,
                      gn_apply, relative_residual, relative_residual_from_squares, require_grads)
from .arguments import argument, positive_float, positive_int
from .base import Method, Scoring, register
from .damping import DampingArguments, damping_source, global_damping
from .linalg import gram_factor, primal_factor, woodbury_solution

HESSIANS = ("gauss-newton", "true")
_TEST_CHUNK = 64


@dataclass(frozen=True)
class ExactFullArguments(DampingArguments):
    hessian: str = argument("gauss-newton", "gauss-newton: the joint G from the stored gradients; true: the "
                            "Hessian through Hessian-vector products, solved by conjugate gradient",
                            choices=HESSIANS)
    tol: float = argument(1e-8, "conjugate gradient: stop at relative residual ||r|| <= tol ||v||",
                          check=positive_float)
    max_iterations: int = argument(1000, "conjugate gradient: most Hessian-vector products per test example",
                                   check=positive_int)


@register
class ExactFull(Method):
    """Arguments: :class:`ExactFullArguments` (``damping`` / ``damping_ratio``, ``hessian``,
    ``tol``, ``max_iterations``)."""

    name = "exact-full"
    needs = frozenset({"grads"})
    Arguments = ExactFullArguments
    scoring = Scoring.PRECONDITIONED

    def required_features(self) -> frozenset[str]:
        return frozenset({"grads", "hvp"}) if self.args.hessian == "true" else frozenset(self.needs)

    def fit(self, train: Features) -> "ExactFull":
        require_grads(self.name, train, "training")
        self._train = train
        self._device = device_of(train)
        self._blocks = train.blocks
        self._sizes = [int(train.flat(b).shape[1]) for b in self._blocks]
        self._lam = global_damping(train, self.args.damping, self.args.damping_ratio)
        self._stats = ResidualStats()
        self._cg = {"iterations": [], "converged": 0, "negative_curvature": 0}
        if self.args.hessian == "true":
            if self._lam <= 0:
                raise UserError(f"{self.name}: the training gradients are all zero, so the damping ratio "
                                "gives no damping; pass an explicit damping")
            self._op = HvpOperator(self.name, train)
        elif self._lam > 0:
            n, D = train.n, sum(self._sizes)
            if n < D:
                self._kind = "woodbury"
                K = torch.zeros(n, n, dtype=DTYPE, device=self._device)
                for b in self._blocks:
                    X = flat64(train, b, self._device)
                    K += X @ X.T
                self._K = K
                self._factor = gram_factor(K, self._lam)
            else:
                self._kind = "primal"
                X = self._concat(train)
                self._factor = primal_factor(X.T @ X / n, self._lam)
        self._refresh_diagnostics()
        return self

    def _concat(self, features: Features) -> torch.Tensor:
        return torch.cat([flat64(features, b, self._device) for b in self._blocks], dim=1)

    # ------------------------------------------------------------------ Gauss-Newton

    def _gn_solve(self, test: Features) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """``(scores [m, n], x per block or None)``; records residuals."""
        train, lam, m = self.train, self._lam, test.n
        if lam == 0:  # all training gradients are zero: every score is zero
            return torch.zeros(m, train.n, dtype=DTYPE, device=self._device), None
        n = train.n
        if self._kind == "primal":
            X, V = self._concat(train), self._concat(test)
            x = self._factor.solve(V.T).T
            self._stats.add("all", relative_residual(gn_apply(X, lam, x), V))
            return x @ X.T, list(torch.split(x, self._sizes, dim=1))
        p = torch.zeros(m, n, dtype=DTYPE, device=self._device)
        for b in self._blocks:
            p += flat64(test, b, self._device) @ flat64(train, b, self._device).T
        Z = self._factor.solve(p.T)  # (n lam I + K)^{-1} X V^T, [n, m]
        scores = (p - Z.T @ self._K) / lam  # = X x, row by row
        res_sq = torch.zeros(m, dtype=DTYPE, device=self._device)
        v_sq = torch.zeros(m, dtype=DTYPE, device=self._device)
        xs = []
        for b in self._blocks:
            X, V = flat64(train, b, self._device), flat64(test, b, self._device)
            x = woodbury_solution(V, Z.T @ X, lam)
            res_sq += (scores @ X / n + lam * x - V).square().sum(dim=1)
            v_sq += V.square().sum(dim=1)
            xs.append(x)
        self._stats.add("all", relative_residual_from_squares(res_sq, v_sq))
        return scores, xs

    # ------------------------------------------------------------------ true Hessian, CG

    def _cg_one(self, v: torch.Tensor) -> torch.Tensor:
        op, lam = self._op, self._lam
        x = torch.zeros_like(v)
        v_norm = float(torch.linalg.vector_norm(v))
        if v_norm == 0:
            self._cg["iterations"].append(0)
            self._cg["converged"] += 1
            self._stats.add("all", torch.tensor([float("nan")]))
            return x
        r = v.clone()
        p = r.clone()
        rs = float(r @ r)
        iterations, converged = 0, False
        while iterations < self.args.max_iterations:
            Ap = op(p) + lam * p
            pAp = float(p @ Ap)
            iterations += 1
            if pAp <= 0:
                self._cg["negative_curvature"] += 1
                break
            alpha = rs / pAp
            x += alpha * p
            r -= alpha * Ap
            rs_new = float(r @ r)
            if rs_new ** 0.5 <= self.args.tol * v_norm:
                converged = True
                break
            p = r + (rs_new / rs) * p
            rs = rs_new
        self._cg["iterations"].append(iterations)
        self._cg["converged"] += int(converged)
        self._stats.add("all", relative_residual(op(x) + lam * x, v))
        return x

    def _true_solve(self, test: Features) -> tuple[torch.Tensor, list[torch.Tensor]]:
        train = self.train
        scores = torch.zeros(test.n, train.n, dtype=DTYPE, device=self._device)
        chunks = []
        for start in range(0, test.n, _TEST_CHUNK):
            stop = min(test.n, start + _TEST_CHUNK)
            xs = torch.stack([self._cg_one(concat_row(test, self._blocks, t, self._device))
                              for t in range(start, stop)])
            offset = 0
            for b, size in zip(self._blocks, self._sizes):
                scores[start:stop] += xs[:, offset:offset + size] @ flat64(train, b, self._device).T
                offset += size
            chunks.append(xs)
        x = torch.cat(chunks) if chunks else torch.zeros(0, sum(self._sizes), dtype=DTYPE, device=self._device)
        failed = len(self._cg["iterations"]) - self._cg["converged"]
        if failed:
            warnings.warn(f"{self.name}: conjugate gradient reached no relative residual <= {self.args.tol} "
                          f"for {failed} test example(s) (see diagnostics)", RuntimeWarning, stacklevel=3)
        return scores, list(torch.split(x, self._sizes, dim=1))

    # ------------------------------------------------------------------ protocol

    def _run(self, test: Features) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        check_compatible(self.name, self.train, test)
        out = self._true_solve(test) if self.args.hessian == "true" else self._gn_solve(test)
        self._refresh_diagnostics()
        return out

    def score(self, test: Features) -> torch.Tensor:
        return self._run(test)[0]

    def solve(self, test: Features) -> dict[str, torch.Tensor]:
        """``{block: [n_test, rows, cols]}`` float64 solutions ``(H + lambda I)^{-1} v``
        (empty when all training gradients are zero)."""
        _, xs = self._run(test)
        if xs is None:
            return {}
        return {b: x.reshape(test.grads[b].shape) for b, x in zip(self._blocks, xs)}

    def _refresh_diagnostics(self) -> None:
        diag: dict[str, Any] = {
            **self._stats.summary(per_block=False),
            "hessian": self.args.hessian,
            "damping": self._lam,
            "damping_source": damping_source(self.args.damping, self.args.damping_ratio),
        }
        if self.args.hessian == "true":
            its = self._cg["iterations"]
            diag.update({
                "residual_reference": "damped true Hessian H + lambda I over all blocks jointly (Features.hvp)",
                "solver": "conjugate gradient",
                "tol": self.args.tol,
                "iterations_max": max(its, default=0),
                "iterations_mean": (sum(its) / len(its)) if its else 0.0,
                "converged": self._cg["converged"],
                "not_converged": len(its) - self._cg["converged"],
                "negative_curvature": self._cg["negative_curvature"],
                "hvp_calls": self._op.calls,
            })
        else:
            diag.update({
                "residual_reference": "damped Gauss-Newton G + lambda I over all blocks jointly, "
                                      "G = (1/n) sum_j g_j g_j^T",
                "solver": "none (zero gradients)" if self._lam == 0 else f"{self._kind}/{self._factor.kind}",
            })
        self.diagnostics = diag
