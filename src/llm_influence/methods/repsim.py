"""Representation similarity (the paper's RepSim baseline).

``score[t, i] = cos(r_t, r_i)`` with ``r`` the representation in ``Features.reps``
(``[n, hidden]``; the features stage stores the last-layer hidden state at the last prompt
token). In [-1, 1], higher = more similar = ranked as more helpful; a zero representation
has cosine 0 with everything. Float64 scores; no global fit (chunking the training set
gives the same columns).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..features.types import Features
from ._common import reps_of
from .base import Method, Scoring, register
from .gradsim import safe_cosine


@register
class RepSim(Method):
    """Cosine similarity of representations. No arguments; needs ``reps``."""

    name = "repsim"
    needs = frozenset({"reps"})
    scoring = Scoring.SEPARABLE

    def fit(self, train: Features) -> "RepSim":
        reps = reps_of(self.name, train, "training")
        self._train = train
        self._train_reps = reps
        self._train_norms = torch.linalg.vector_norm(reps, dim=1)
        return self

    def score(self, test: Features) -> torch.Tensor:
        self.train  # noqa: B018 -- raises if fit() was not called
        reps = reps_of(self.name, test, "test").to(self._train_reps.device)
        if reps.shape[1] != self._train_reps.shape[1]:
            raise UserError(f"{self.name}: test representations have {reps.shape[1]} dimensions, "
                            f"training ones {self._train_reps.shape[1]}")
        dots = reps @ self._train_reps.T
        return safe_cosine(dots, torch.linalg.vector_norm(reps, dim=1), self._train_norms)

