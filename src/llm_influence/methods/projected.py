"""Exact influence in a random-projection space (``projected``; LoGra / TRAK style).

The stored gradients of every block are concatenated into one vector per example: with
``--project-dim D`` they are the projected gradients ``p_i = P g_i`` (``[D]``, see
:mod:`llm_influence.features.projection`); without a projection they are the full
gradients and the method equals ``exact-full`` with the Gauss-Newton Hessian. Then

    A = (1/n) sum_j p_j p_j^T                       (= P G P^T, the projected Gauss-Newton matrix)
    lambda = damping, or damping_ratio x mean squared entry of the p_j (as exact-full)
    x_t = (A + lambda I)^{-1} v_t                   (v_t = P g_test)
    score[t, i] = <x_t, p_i> = v_t^T (P G P^T + lambda I)^{-1} p_i  (= -I(z_test, z_i); higher = more helpful)

over all blocks jointly (no block-diagonal approximation). Solved exactly in float64:

* ``D <= n`` ("primal"): ``A + lambda I`` (``D x D``) accumulated from chunks of training rows
  and factored by Cholesky;
* ``n < D`` ("woodbury"): ``x = (v - X^T (n lambda I + K)^{-1} X v) / lambda`` with the
  ``n x n`` Gram ``K = sum over column pieces X_c X_c^T``.

**Memory.** The training gradients are read in pieces of at most :data:`CHUNK_BYTES`
(64 MiB) of float64 (row chunks, or for ``K`` column pieces of all rows), one pass per
product, so memory-mapped features are never held whole: peak is the ``min(n, D)^2``
matrix, about two pieces, and the ``n_test x D`` solutions. ``min(n, D)`` above
``max_dim`` (default 16384) is refused with the advice to use ``--project-dim``.

**Several processes.** Under ``torchrun`` (:mod:`llm_influence.distributed`) each rank
accumulates the training chunks it owns and the sums are all-reduced: the damping's sum of
squares per chunk and the Gram tiles are combined exactly (each number comes from one
rank), the primal ``D x D`` sum by an all-reduce (equal to a single process up to float64
rounding, not bitwise).

Diagnostics: relative residual ``||(A + lambda I) x - v|| / ||v||`` (max, mean over test
examples), the damping, ``dim`` (``D``), the solver. Scores are float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .. import distributed
from ..errors import UserError
from ..features.types import Features
from ._common import DTYPE, ResidualStats, check_compatible, device_of, relative_residual, require_grads
from .arguments import argument, positive_int
from .base import Method, Scoring, register
from .damping import DampingArguments, damping_from_sums, damping_source
from .linalg import gram_factor, primal_factor, woodbury_solution

CHUNK_BYTES = 64 << 20
DEFAULT_MAX_DIM = 16384


def row_chunks(n: int, dim: int, budget: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most ``budget`` bytes of float64 ``[rows, dim]``."""
    rows = max(1, min(max(n, 1), budget // (8 * max(dim, 1))))
    return [(a, min(n, a + rows)) for a in range(0, n, rows)]


def concat_rows(features: Features, blocks: list[str], start: int, stop: int,
                device: torch.device) -> torch.Tensor:
    """``[stop - start, D]`` float64: rows of every block's gradients, concatenated (copied
    block by block into one buffer, so no other temporary of that size exists)."""
    parts = [features.grads[b][start:stop].reshape(stop - start, -1) for b in blocks]
    out = torch.empty(stop - start, sum(p.shape[1] for p in parts), dtype=DTYPE, device=device)
    offset = 0
    for p in parts:
        out[:, offset:offset + p.shape[1]].copy_(p)
        offset += p.shape[1]
    return out


@dataclass(frozen=True)
class ProjectedArguments(DampingArguments):
    max_dim: int = argument(DEFAULT_MAX_DIM, "largest min(n, D) accepted (the solve holds a min(n, D)^2 "
                            "float64 matrix)", check=positive_int)


@register
class Projected(Method):
    """Arguments: :class:`ProjectedArguments` (``damping`` / ``damping_ratio``, one damping for
    all dimensions, and ``max_dim``)."""

    name = "projected"
    needs = frozenset({"grads"})
    Arguments = ProjectedArguments
    scoring = Scoring.PRECONDITIONED

    # ------------------------------------------------------------------ fit

    def fit(self, train: Features) -> "Projected":
        require_grads(self.name, train, "training")
        world = distributed.current()
        self._train = train
        self._device = device_of(train)
        self._blocks = train.blocks
        self._sizes = [int(train.flat(b).shape[1]) for b in self._blocks]
        n, D = train.n, sum(self._sizes)
        self._dim = D
        if min(n, D) > self.args.max_dim:
            raise UserError(f"{self.name}: {n} training examples and {D} gradient dimensions need a "
                            f"{min(n, D)}^2 matrix (max_dim {self.args.max_dim}); extract with --project-dim "
                            f"{min(4096, self.args.max_dim)} or a smaller one")
        chunks = row_chunks(n, D)
        owned = distributed.mine(len(chunks), world) if chunks else []
        # damping: sum of squares per chunk, combined exactly (each chunk summed on one rank)
        sq = torch.zeros(len(chunks), dtype=DTYPE)
        for c in owned:
            sq[c] = self._rows(*chunks[c]).square().sum().cpu()
        sq = distributed.all_reduce_sum(sq, world)
        total = 0.0
        for value in sq.tolist():  # a fixed order, so every rank derives the same damping
            total += value
        lam = damping_from_sums(self.args.damping, self.args.damping_ratio, total, n * D) \
            if self.args.damping is not None or n * D else 0.0
        self._lam = lam
        self._stats = ResidualStats()
        self._kind = "none (zero gradients)"
        if lam > 0:
            if D <= n:
                self._kind = "primal"
                A = torch.zeros(D, D, dtype=DTYPE, device=self._device)
                for c in owned:
                    X = self._rows(*chunks[c])
                    A += X.T @ X
                A = distributed.all_reduce_sum(A, world) / n
                self._factor = primal_factor(A, lam)
                self._A = A  # now A + lam I
            else:
                self._kind = "woodbury"
                K = torch.zeros(n, n, dtype=DTYPE, device=self._device)
                width = max(1, CHUNK_BYTES // (8 * n))
                for blk in self._blocks:  # K = sum over column pieces of every block
                    flat = train.grads[blk].reshape(n, -1)
                    for c0 in range(0, flat.shape[1], width):
                        Xp = flat[:, c0:c0 + width].to(device=self._device, dtype=DTYPE)
                        for c in owned:  # this rank's rows of K (the others add exact zeros)
                            a, b = chunks[c]
                            K[a:b] += Xp[a:b] @ Xp.T
                K = distributed.all_reduce_sum(K, world)
                self._K = K
                self._factor = gram_factor(K, lam)
            self._chunks = chunks
        self._refresh_diagnostics()
        return self

    def _rows(self, start: int, stop: int, features: Features | None = None) -> torch.Tensor:
        return concat_rows(features or self.train, self._blocks, start, stop, self._device)

    # ------------------------------------------------------------------ solve / score

    def _X_times(self, x: torch.Tensor) -> torch.Tensor:
        """``X x^T``: ``[n, m]`` for ``x`` ``[m, D]`` (training rows streamed)."""
        out = torch.zeros(self.train.n, x.shape[0], dtype=DTYPE, device=self._device)
        for a, b in self._chunks:
            out[a:b] = self._rows(a, b) @ x.T
        return out

    def _Xt_times(self, z: torch.Tensor) -> torch.Tensor:
        """``X^T z``: ``[D, m]`` for ``z`` ``[n, m]``."""
        out = torch.zeros(self._dim, z.shape[1], dtype=DTYPE, device=self._device)
        for a, b in self._chunks:
            out += self._rows(a, b).T @ z[a:b]
        return out

    def _solve_rows(self, V: torch.Tensor) -> torch.Tensor:
        """``[m, D]`` solutions for test rows ``V`` ``[m, D]``; records residuals."""
        n, lam = self.train.n, self._lam
        if self._kind == "primal":
            x = self._factor.solve(V.T).T
            Hx = x @ self._A  # (A + lam I) is symmetric
        else:
            XV = self._X_times(V)  # [n, m]
            Z = self._factor.solve(XV)  # (n lam I + K)^{-1} X V^T
            x = woodbury_solution(V, self._Xt_times(Z).T, lam)
            Hx = self._Xt_times(self._X_times(x)).T / n + lam * x
        self._stats.add("all", relative_residual(Hx, V))
        return x

    def _solutions(self, test: Features) -> Iterator[tuple[int, int, torch.Tensor]]:
        check_compatible(self.name, self.train, test)
        for a, b in row_chunks(test.n, self._dim):
            yield a, b, self._solve_rows(self._rows(a, b, test))

    def solve(self, test: Features) -> dict[str, torch.Tensor]:
        """``{block: [n_test, rows, cols]}`` float64 ``(A + lambda I)^{-1} v`` (empty when all
        training gradients are zero)."""
        if self._lam == 0:
            check_compatible(self.name, self.train, test)
            return {}
        x = torch.zeros(test.n, self._dim, dtype=DTYPE, device=self._device)
        for a, b, xs in self._solutions(test):
            x[a:b] = xs
        self._refresh_diagnostics()
        parts = torch.split(x, self._sizes, dim=1)
        return {blk: p.reshape(test.grads[blk].shape) for blk, p in zip(self._blocks, parts)}

    def score(self, test: Features) -> torch.Tensor:
        scores = torch.zeros(test.n, self.train.n, dtype=DTYPE, device=self._device)
        if self._lam == 0:
            check_compatible(self.name, self.train, test)
            return scores
        for a, b, xs in self._solutions(test):
            scores[a:b] = self._X_times(xs).T
        self._refresh_diagnostics()
        return scores

    def _refresh_diagnostics(self) -> None:
        self.diagnostics = {
            **self._stats.summary(per_block=False),
            "residual_reference": "damped projected Gauss-Newton A + lambda I over all blocks jointly, "
                                  "A = (1/n) sum_j p_j p_j^T",
            "damping": self._lam,
            "damping_source": damping_source(self.args.damping, self.args.damping_ratio),
            "dim": self._dim,
            "blocks": len(self._blocks),
            "solver": self._kind if self._lam == 0 else f"{self._kind}/{self._factor.kind}",
        }
