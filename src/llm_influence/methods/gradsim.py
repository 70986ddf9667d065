"""Gradient similarity: the paper's GradSim (``gradsim``) and its cosine version.

* ``gradsim``: ``score[t, i] = <v_t, g_i> = sum_l <v_tl, g_il>``, the influence score with
  the Hessian replaced by the identity (units: nats^2 per parameter^2).
* ``gradsim-cos``: ``<v_t, g_i> / (||v_t|| ||g_i||)`` over the full concatenated gradient
  (all blocks), in [-1, 1]; a zero gradient has cosine 0 with everything.

Both are positive when a gradient step on ``g_i`` lowers the test loss, matching the
score convention. Scores are float64. Neither needs a global fit: the columns of a
training set scored in chunks are the same as scored at once.
"""

from __future__ import annotations

import torch

from ..features.types import Features
from ._common import DTYPE, check_compatible, device_of, flat64, require_grads
from .base import Method, Scoring, register


def gradient_dot(train: Features, test: Features, device: torch.device) -> torch.Tensor:
    """``[n_test, n_train]`` float64 ``sum_l V_l X_l^T`` (blocks must match)."""
    out = torch.zeros(test.n, train.n, dtype=DTYPE, device=device)
    for b in train.blocks:
        out += flat64(test, b, device) @ flat64(train, b, device).T
    return out


def gradient_norms(features: Features, device: torch.device) -> torch.Tensor:
    """``[n]`` float64 norms of the concatenated gradients."""
    sq = torch.zeros(features.n, dtype=DTYPE, device=device)
    for b in features.blocks:
        sq += flat64(features, b, device).square().sum(dim=1)
    return sq.sqrt()


def safe_cosine(dots: torch.Tensor, test_norms: torch.Tensor, train_norms: torch.Tensor) -> torch.Tensor:
    """``dots / (|t| |i|)``, with 0 where either norm is 0."""
    den = test_norms[:, None] * train_norms[None, :]
    return torch.where(den > 0, dots / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(dots))


@register
class GradSim(Method):
    """``score = <v, g_i>`` summed over blocks. No arguments."""

    name = "gradsim"
    needs = frozenset({"grads"})
    scoring = Scoring.SEPARABLE

    def fit(self, train: Features) -> "GradSim":
        require_grads(self.name, train, "training")
        self._train = train
        return self

    def score(self, test: Features) -> torch.Tensor:
        check_compatible(self.name, self.train, test)
        return gradient_dot(self.train, test, device_of(self.train))


@register
class GradSimCos(GradSim):
    """Cosine similarity of the full concatenated gradient vectors. No arguments."""

    name = "gradsim-cos"

    def fit(self, train: Features) -> "GradSimCos":
        super().fit(train)
        self._train_norms = gradient_norms(train, device_of(train))
        return self

    def score(self, test: Features) -> torch.Tensor:
        check_compatible(self.name, self.train, test)
        device = device_of(self.train)
        dots = gradient_dot(self.train, test, device)
        return safe_cosine(dots, gradient_norms(test, device), self._train_norms)

