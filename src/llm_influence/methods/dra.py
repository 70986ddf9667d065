"""DRA: denoised representation attribution (Pan, Shi, Zhao, Ma 2025, arXiv 2502.11411).

The paper observes that a text's representation mixes the few "critical" features that
make it what it is with "neutral" ones every fluent text shares (stop words, benign facts),
and denoises the training and target representations before comparing them: it centres and
whitens them and keeps the dimensions selected by a leave-target-out discriminability
criterion. This implementation, fitted on the **training representations only** (no test
example, no label of any kind enters the fit):

1. **Centre and whiten** with the training set: ``mu`` = mean of the training
   representations ``r_i`` (``Features.reps``: RepSim's hidden state, ``--rep-layer`` /
   ``--rep-pooling``), ``C = (1/n) sum_i (r_i - mu)(r_i - mu)^T = V diag(lambda) V^T``; the
   ``rank`` directions with ``lambda_j > rank_tol * lambda_max`` are kept (the others carry
   no training variance) and ``z(r) = diag(lambda)^{-1/2} V^T (r - mu)`` (PCA whitening: the
   training ``z`` have mean 0 and covariance I).
2. **Select dimensions** (``select``):

   * ``"neighbors"`` (default): leave-one-out discriminability with each training example
     as the held-out target: its ``neighbors`` nearest other training examples (cosine of
     the centred representations, the example itself left out) stand in for the paper's
     remaining targets, and a whitened dimension ``j`` scores
     ``a_j = (1/n) sum_i z_ij * mean_{i' in N(i)} z_i'j``, the agreement of every example
     with its neighbourhood along ``j`` (with unit variance, ``a_j`` is about in ``[-1, 1]``; it
     is the Laplacian score's idea of a feature that respects the data's neighbourhood graph).
     The ``dims`` dimensions with the largest ``a_j`` are kept; ``dims="auto"`` keeps every
     dimension with ``a_j >= relative_agreement * max_j a_j`` (0.5; at least 2, since a cosine
     in one dimension is only a sign): directions along which neighbours agree carry the
     cluster structure, the others are noise. (Measured before choosing the default, on the
     un-fine-tuned SmolLM2's last-layer representations of the cpu tasks' training sets: the
     sorted ``a_j`` fall from about 1 to below 0.4 after 9 dimensions for the ten-class
     grammars and math and after 2-7 for the two- and four-group tasks; the rule keeps 2 to 9.)
   * ``"variance"``: the ``dims`` leading principal directions (``"auto"``: all ``rank``),
     i.e. truncated PCA whitening.
3. **Similarity**: ``score[t, i] = cos(z_S(r_t), z_S(r_i))`` over the selected set ``S``, in
   ``[-1, 1]``, higher = more similar = ranked as more helpful (0 for a zero vector).

**Where we depart from the paper, and why.** Only the paper's abstract and summaries could be
read here ("centering/whitening and dimension selection guided by leave-target-out
discriminability"), not its exact criterion. Its selection uses a *set of target*
(test-side, unsafe) examples: the dimensions that discriminate held-out targets from the
training data. Our benchmark attributes each test example on its own and must not
let the test set or its labels shape the fit, so the "targets" are the training examples'
own leave-one-out neighbourhoods (step 2). With fewer training examples than hidden
dimensions, full whitening alone makes every pair of training examples equally similar
(``z_i . z_k = -1`` for ``i != k``): the dimension selection is what gives the training set
structure again. Whitening is global (``mu``, ``C``, ``S`` depend on the whole training
set), so DRA is fitted and scored whole (``Scoring.WHOLE``; rank 0 under ``torchrun``);
its cost is one SVD of the ``n x hidden`` centred representations (or an eigen-decomposition
of the ``hidden x hidden`` covariance when ``n > hidden``) and an ``n x n`` neighbour search
in row chunks. Float64 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import UserError
from ..features.types import Features
from ._common import DTYPE, reps_of
from .arguments import ArgumentError, MethodArguments, argument, positive_float, positive_int
from .base import Method, Scoring, register
from .gradsim import safe_cosine

SELECTIONS = ("neighbors", "variance")
#: dims="auto" keeps at least this many dimensions (a cosine in one dimension is only a sign)
AUTO_MIN_DIMS = 2
_ROW_CHUNK = 2048


def dims_or_auto(name: str, value: Any) -> int | str:
    if value == "auto":
        return "auto"
    try:
        return positive_int(name, value)
    except ArgumentError:
        raise ArgumentError(f"{name} must be 'auto' or a positive integer, got {value!r}") from None


@dataclass(frozen=True)
class DRAArguments(MethodArguments):
    select: str = argument("neighbors", "dimension selection: neighbors (leave-one-out agreement of each training "
                           "example with its nearest training neighbours) or variance (leading principal directions)",
                           choices=SELECTIONS)
    dims: int | str = argument("auto", "whitened dimensions kept; auto: those whose neighbour agreement is at least "
                               "relative_agreement x the largest (select=neighbors; at least 2) or all of them "
                               "(select=variance)", check=dims_or_auto)
    relative_agreement: float = argument(0.5, "dims='auto' with select=neighbors keeps the dimensions whose agreement "
                                         "is at least this fraction of the largest", check=positive_float)
    neighbors: int = argument(5, "nearest training neighbours per held-out example (select=neighbors)",
                              check=positive_int)
    rank_tol: float = argument(1e-10, "principal directions with eigenvalue <= rank_tol x the largest are dropped "
                               "(no training variance)", check=positive_float)


def whitening(reps: torch.Tensor, rank_tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mu [d], W [d, r], eigenvalues [r])`` of the training representations ``reps`` ``[n, d]``
    (float64): ``z = (r - mu) @ W`` has mean 0 and identity covariance over the training set.
    Directions are sorted by decreasing eigenvalue; those with ``lambda <= rank_tol * lambda_max``
    are dropped."""
    x = reps.to(DTYPE)
    n, d = x.shape
    mu = x.mean(dim=0)
    xc = x - mu
    if n <= d:
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        evals, evecs = s.square() / n, vh.T
    else:
        evals, evecs = torch.linalg.eigh(xc.T @ xc / n)
        evals, evecs = evals.flip(0), evecs.flip(1)
    top = float(evals[0]) if evals.numel() else 0.0
    keep = evals > rank_tol * top if top > 0 else torch.zeros_like(evals, dtype=torch.bool)
    evals, evecs = evals[keep], evecs[:, keep]
    return mu, evecs / evals.sqrt(), evals


def neighbour_means(centred: torch.Tensor, z: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, r]``: for each row ``i``, the mean of ``z`` over its ``k`` nearest other rows by
    cosine of ``centred`` (itself excluded; ties to the lower index)."""
    n = centred.shape[0]
    norms = torch.linalg.vector_norm(centred, dim=1)
    out = torch.empty_like(z)
    for a in range(0, n, _ROW_CHUNK):
        b = min(n, a + _ROW_CHUNK)
        cos = safe_cosine(centred[a:b] @ centred.T, norms[a:b], norms)
        cos[torch.arange(b - a), torch.arange(a, b)] = -float("inf")
        order = torch.sort(-cos, dim=1, stable=True).indices[:, :k]
        out[a:b] = z[order].mean(dim=1)
    return out


@register
class DRA(Method):
    """Cosine of centred, whitened, dimension-selected representations; needs ``reps``."""

    name = "dra"
    needs = frozenset({"reps"})
    Arguments = DRAArguments
    scoring = Scoring.WHOLE

    def fit(self, train: Features) -> "DRA":
        reps = reps_of(self.name, train, "training")
        n = reps.shape[0]
        if n == 0:
            raise UserError(f"{self.name}: no training examples")
        mu, w, evals = whitening(reps, self.args.rank_tol)
        z = (reps - mu) @ w
        rank = w.shape[1]
        agreement: Optional[torch.Tensor] = None
        m = 0
        if self.args.select == "neighbors" and n >= 2 and rank > 0:
            m = min(self.args.neighbors, n - 1)
            agreement = (z * neighbour_means(reps - mu, z, m)).sum(dim=0) / n
            order = torch.sort(-agreement, stable=True).indices
            if self.args.dims == "auto":
                top = float(agreement.max())
                k = max(int((agreement >= self.args.relative_agreement * top).sum()) if top > 0 else 0, AUTO_MIN_DIMS)
            else:
                k = self.args.dims
        else:
            order = torch.arange(rank)
            k = rank if self.args.dims == "auto" else self.args.dims
        k = max(1, min(k, rank)) if rank else 0
        self.selected = order[:k].sort().values
        self.mu, self.w = mu, w[:, self.selected]
        self._train_z = z[:, self.selected]
        self._train_norms = torch.linalg.vector_norm(self._train_z, dim=1)
        self._train = train
        self.diagnostics = {
            "rank": rank, "dims": k, "select": self.args.select, "neighbors": m,
            "eigenvalue_max": float(evals[0]) if rank else 0.0,
            "eigenvalue_min_kept": float(evals[-1]) if rank else 0.0,
            "variance_share_selected": float(evals[self.selected].sum() / evals.sum()) if rank else 0.0,
        }
        if agreement is not None:
            self.diagnostics["agreement_selected_mean"] = float(agreement[self.selected].mean())
            self.diagnostics["agreement_max"] = float(agreement.max())
        return self

    def transform(self, reps: torch.Tensor) -> torch.Tensor:
        """``[m, k]`` whitened, selected coordinates of representations ``[m, d]``."""
        return (reps.to(DTYPE) - self.mu) @ self.w

    def score(self, test: Features) -> torch.Tensor:
        self.train  # noqa: B018 -- raises if fit() was not called
        reps = reps_of(self.name, test, "test")
        if reps.shape[1] != self.mu.shape[0]:
            raise UserError(f"{self.name}: test representations have {reps.shape[1]} dimensions, "
                            f"training ones {self.mu.shape[0]}")
        z = self.transform(reps)
        return safe_cosine(z @ self._train_z.T, torch.linalg.vector_norm(z, dim=1), self._train_norms)
