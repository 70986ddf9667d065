"""Internals shared by the methods: feature checks, float64 block access, residuals, the
block-wise inverse-Hessian template and the true-Hessian operator (argument checks live in
:mod:`.arguments`, damping in :mod:`.damping`, factorisations in :mod:`.linalg`).

Numerics: every method computes in float64 on the device of the training gradients and
returns float64 scores there. Blocks are converted one at a time, so the float64 copy of
the training set never exists as a whole.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, ClassVar

import torch

from ..errors import UserError
from ..features.types import Features
from .base import Method, Scoring
from .damping import DampingArguments, block_damping, damping_source

DTYPE = torch.float64

GN_BLOCK_REFERENCE = (
    "block-diagonal damped Gauss-Newton: per block l, G_l + lambda_l I with "
    "G_l = (1/n) sum_j g_jl g_jl^T over the training gradients"
)


# ---------------------------------------------------------------------------------------
# feature checks and access

def require_grads(method: str, features: Features, role: str) -> None:
    if not features.grads:
        raise UserError(f"{method}: the {role} features have no per-example gradients (grads)")


def reps_of(method: str, features: Features, role: str) -> torch.Tensor:
    """``features.reps`` (``[n, hidden]``) in float64, or a user error naming ``method`` and
    ``role`` (``"training"``/``"test"``) when the features have no representations."""
    if features.reps is None:
        raise UserError(f"{method}: the {role} features have no representations (reps)")
    return features.reps.to(DTYPE)


def check_compatible(method: str, train: Features, test: Features) -> None:
    """Test and training features must have the same blocks with the same shapes."""
    require_grads(method, test, "test")
    if set(test.blocks) != set(train.blocks):
        missing = sorted(set(train.blocks) - set(test.blocks))
        extra = sorted(set(test.blocks) - set(train.blocks))
        raise UserError(
            f"{method}: test and training gradients have different blocks "
            f"(missing in test: {missing[:3]}{'...' if len(missing) > 3 else ''}; "
            f"extra in test: {extra[:3]}{'...' if len(extra) > 3 else ''})")
    for b in train.blocks:
        if tuple(test.grads[b].shape[1:]) != tuple(train.grads[b].shape[1:]):
            raise UserError(
                f"{method}: block {b!r} is {tuple(train.grads[b].shape[1:])} in training "
                f"but {tuple(test.grads[b].shape[1:])} in test gradients")


def device_of(features: Features) -> torch.device:
    for g in features.grads.values():
        return g.device
    if features.reps is not None:
        return features.reps.device
    return torch.device("cpu")


def flat64(features: Features, block: str, device: torch.device) -> torch.Tensor:
    """``[n, rows*cols]`` float64 copy of one block on ``device``."""
    return features.flat(block).to(device=device, dtype=DTYPE)


# ---------------------------------------------------------------------------------------
# residuals

def gn_apply(X: torch.Tensor, lam: float, x: torch.Tensor) -> torch.Tensor:
    """``(X^T X / n + lam I) x`` for each row of ``x`` ``[m, d]``; ``X`` is ``[n, d]``."""
    n = X.shape[0]
    return (x @ X.T) @ X / n + lam * x


def relative_residual(Hx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise ``||Hx - v|| / ||v||`` ``[m]``; NaN where ``||v|| = 0`` (undefined, skipped),
    inf where the solution itself is not finite (a diverged solver must show)."""
    return relative_residual_from_squares((Hx - v).square().sum(dim=-1), v.square().sum(dim=-1))


def relative_residual_from_squares(residual_sq: torch.Tensor, v_sq: torch.Tensor) -> torch.Tensor:
    """:func:`relative_residual` from accumulated ``||Hx - v||^2`` and ``||v||^2`` ``[m]``
    (for solutions assembled block by block)."""
    out = residual_sq.sqrt() / v_sq.sqrt()
    out[torch.isnan(out)] = float("inf")
    out[v_sq == 0] = float("nan")
    return out


class ResidualStats:
    """Running max / mean of relative residuals over (test example, block) pairs."""

    def __init__(self) -> None:
        self.per_block: dict[str, list[float]] = {}

    def add(self, block: str, rel: torch.Tensor) -> None:
        rel = rel[~torch.isnan(rel)].double().cpu()
        mx, total, count = self.per_block.get(block, [0.0, 0.0, 0])
        if rel.numel():
            mx = max(mx, float(rel.max()))
            total += float(rel.sum())
            count += int(rel.numel())
        self.per_block[block] = [mx, total, count]

    def summary(self, per_block: bool = True) -> dict[str, Any]:
        count = sum(int(c) for _, _, c in self.per_block.values())
        out: dict[str, Any] = {
            "residual_max": max((m for m, _, c in self.per_block.values() if c), default=None),
            "residual_mean": (sum(t for _, t, _ in self.per_block.values()) / count) if count else None,
            "residual_count": count,
        }
        if per_block:
            out["residual_per_block"] = {
                b: {"max": m, "mean": (t / c) if c else None} for b, (m, t, c) in self.per_block.items()}
        return out


# ---------------------------------------------------------------------------------------
# the block-diagonal inverse-Hessian template

class BlockwiseInverseMethod(Method):
    """Template for methods with a per-block solve ``x_l ~ (H_l + lambda_l I)^{-1} v_l``.

    ``score[t, i] = sum_l <x_tl, g_il>``. Subclasses implement :meth:`_solve_block` (and
    optionally :meth:`_prepare_block`, run once per block in :meth:`fit`).

    Diagnostics (accumulated over every :meth:`score` / :meth:`solve` call since
    :meth:`fit`): the relative residual ``||(G_l + lambda_l I) x_l - v_l|| / ||v_l||``
    against the block's damped Gauss-Newton matrix, max and mean over (test example,
    block) pairs with ``v_l != 0``, and per block; the damping per block.
    """

    residual_reference = GN_BLOCK_REFERENCE
    Arguments: ClassVar[type] = DampingArguments
    scoring: ClassVar[Scoring] = Scoring.PRECONDITIONED

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.damping_: dict[str, float] = {}
        self._state: dict[str, Any] = {}
        self._stats = ResidualStats()

    def fit(self, train: Features) -> "BlockwiseInverseMethod":
        require_grads(self.name, train, "training")
        self._check_fit(train)
        self._train = train
        self.damping_ = block_damping(train, self.args.damping, self.args.damping_ratio)
        self._device = device_of(train)
        self._state = {}
        for b in train.blocks:
            if self.damping_[b] > 0:
                self._state[b] = self._prepare_block(b, flat64(train, b, self._device), self.damping_[b])
        self._stats = ResidualStats()
        self._refresh_diagnostics()
        return self

    def _check_fit(self, train: Features) -> None:
        """Hook for extra checks on the training features."""

    def _prepare_block(self, block: str, X: torch.Tensor, lam: float) -> Any:
        """Precompute what the block's solve needs; ``X`` is ``[n, d]`` float64."""
        return None

    @abstractmethod
    def _solve_block(self, block: str, V: torch.Tensor, X: torch.Tensor, lam: float, state: Any) -> torch.Tensor:
        """``[m, d]`` solutions for the test rows ``V`` ``[m, d]`` (float64)."""

    def _extra_diagnostics(self) -> dict[str, Any]:
        return {}

    def _refresh_diagnostics(self) -> None:
        skipped = [b for b, lam in self.damping_.items() if lam == 0]
        self.diagnostics = {
            **self._stats.summary(),
            "residual_reference": self.residual_reference,
            "damping": dict(self.damping_),
            "damping_source": damping_source(self.args.damping, self.args.damping_ratio),
            "skipped_blocks_zero_gradients": skipped,
            **self._extra_diagnostics(),
        }

    def _iter_blocks(self, test: Features):
        train = self.train
        check_compatible(self.name, train, test)
        for b in train.blocks:
            lam = self.damping_[b]
            if lam == 0:
                continue
            X = flat64(train, b, self._device)
            V = flat64(test, b, self._device)
            x = self._solve_block(b, V, X, lam, self._state[b])
            self._stats.add(b, relative_residual(gn_apply(X, lam, x), V))
            yield b, X, x

    def solve(self, test: Features) -> dict[str, torch.Tensor]:
        """The preconditioned test gradients ``{block: [n_test, rows, cols]}`` (float64).

        Blocks with all-zero training gradients are left out (their scores are zero).
        """
        out = {b: x.reshape(test.grads[b].shape) for b, _, x in self._iter_blocks(test)}
        self._refresh_diagnostics()
        return out

    def score(self, test: Features) -> torch.Tensor:
        scores = torch.zeros(test.n, self.train.n, dtype=DTYPE, device=self._device)
        for _, X, x in self._iter_blocks(test):
            scores += x @ X.T
        self._refresh_diagnostics()
        return scores


# ---------------------------------------------------------------------------------------
# the true Hessian through Features.hvp, on concatenated float64 vectors

class HvpOperator:
    """``x [D] -> H x [D]`` (float64) through the dict-based ``Features.hvp`` callable.

    ``D`` is the total parameter count of ``blocks`` in order. The callable receives
    ``{block: [rows, cols]}`` tensors in the dtype and device of the training gradients
    (float32 for a float32 model, so products carry float32 rounding).
    """

    def __init__(self, method: str, features: Features) -> None:
        if features.hvp is None:
            raise UserError(f"{method}: hessian='true' needs a Hessian-vector product (Features.hvp) "
                            "on the training features, and they have none")
        require_grads(method, features, "training")
        self.method = method
        self.hvp = features.hvp
        self.blocks = features.blocks
        self.shapes = [tuple(features.grads[b].shape[1:]) for b in self.blocks]
        self.sizes = [math.prod(s) for s in self.shapes]
        first = features.grads[self.blocks[0]]
        self.dtype, self.device = first.dtype, first.device
        self.dim = sum(self.sizes)
        self.calls = 0

    def to_dict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(x, self.sizes)
        return {b: p.reshape(s).to(self.dtype) for b, p, s in zip(self.blocks, parts, self.shapes)}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.hvp(self.to_dict(x))
        self.calls += 1
        pieces = []
        for b, s in zip(self.blocks, self.shapes):
            if b not in out:
                raise UserError(f"{self.method}: the Hessian-vector product returned no block {b!r}")
            if tuple(out[b].shape) != s:
                raise UserError(f"{self.method}: the Hessian-vector product returned block {b!r} "
                                f"shaped {tuple(out[b].shape)}, expected {s}")
            pieces.append(out[b].reshape(-1).to(device=x.device, dtype=DTYPE))
        return torch.cat(pieces)


def concat_row(features: Features, blocks: list[str], t: int, device: torch.device) -> torch.Tensor:
    """``[D]`` float64 concatenated gradient of example ``t``."""
    return torch.cat([features.grads[b][t].reshape(-1).to(device=device, dtype=DTYPE) for b in blocks])


def split_dot(train: Features, blocks: list[str], x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[n_train]``: ``<x, g_i>`` for a concatenated ``x`` ``[D]``."""
    out = torch.zeros(train.n, dtype=DTYPE, device=device)
    start = 0
    for b in blocks:
        X = flat64(train, b, device)
        out += X @ x[start:start + X.shape[1]]
        start += X.shape[1]
    return out


def power_iteration(op, dim: int, iterations: int, seed: int, device: torch.device) -> float:
    """Largest ``|eigenvalue|`` estimate of a symmetric operator: ``||A u_k||`` after
    ``iterations`` steps from a seeded Gaussian start (approaches it from below)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(dim, generator=gen, dtype=DTYPE).to(device)
    u /= torch.linalg.vector_norm(u)
    est = 0.0
    for _ in range(iterations):
        w = op(u)
        est = float(torch.linalg.vector_norm(w))
        if est == 0.0:
            return 0.0
        u = w / est
    return est
