"""TracIn (Pruthi et al. 2020) over saved checkpoints.

    score[t, i] = sum_c w_c <v_t^(c), g_i^(c)>

over the checkpoints ``c`` in ``Features.history``: a list of ``(w_c, Features)`` with
``w_c`` the learning rate in effect at checkpoint ``c`` (any positive weight). The test and
training features must carry histories of the same length with the same weights, matched
by position.

Which checkpoints are included: exactly those in ``history``, in order. The top-level
(current) gradients are *not* added on top of a non-empty history; the features stage
decides whether the final checkpoint is part of the history. Only when both histories
are empty is the current checkpoint used alone with weight 1, which makes the score equal
to ``gradsim``. Units: weight times squared gradient; positive = a gradient step on
``g_i`` at those checkpoints lowered the test loss. Float64 scores; no global fit
(chunking the training set gives the same columns).
"""

from __future__ import annotations

import math
import torch

from ..errors import UserError
from ..features.types import Features
from ._common import check_compatible, device_of, require_grads
from .base import Method, Scoring, register
from .gradsim import gradient_dot


def checkpoints(features: Features) -> list[tuple[float, Features]]:
    """The ``(weight, Features)`` pairs TracIn sums over (see the module docstring)."""
    return list(features.history) if features.history else [(1.0, features)]


@register
class TracIn(Method):
    """No arguments; the weights come from the features' history."""

    name = "tracin"
    needs = frozenset({"grads", "history"})
    scoring = Scoring.SEPARABLE

    def fit(self, train: Features) -> "TracIn":
        for k, (w, f) in enumerate(checkpoints(train)):
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise UserError(f"{self.name}: checkpoint {k} has weight {w!r}; weights must be positive numbers")
            if f.n != train.n:
                raise UserError(f"{self.name}: training checkpoint {k} has {f.n} examples, expected {train.n}")
            require_grads(self.name, f, f"training checkpoint {k}")
        self._train = train
        return self

    def score(self, test: Features) -> torch.Tensor:
        train_cps, test_cps = checkpoints(self.train), checkpoints(test)
        if len(train_cps) != len(test_cps):
            raise UserError(f"{self.name}: the training features have {len(self.train.history)} history "
                            f"checkpoints but the test features {len(test.history)}")
        device = device_of(self.train)
        total = None
        for k, ((w_tr, f_tr), (w_te, f_te)) in enumerate(zip(train_cps, test_cps)):
            if not math.isclose(w_tr, w_te, rel_tol=1e-9, abs_tol=0.0):
                raise UserError(f"{self.name}: checkpoint {k} has weight {w_tr} for training "
                                f"but {w_te} for test features")
            if f_te.n != test.n:
                raise UserError(f"{self.name}: test checkpoint {k} has {f_te.n} examples, expected {test.n}")
            check_compatible(self.name, f_tr, f_te)
            term = w_tr * gradient_dot(f_tr, f_te, device)
            total = term if total is None else total + term
        return total

