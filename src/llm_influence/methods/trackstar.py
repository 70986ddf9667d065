"""Optimizer-aware, normalised gradient similarity: ``trackstar`` (Chang et al. 2024) and
``less`` (Xia et al. 2024).

Both rescale the per-example LoRA gradients with the AdamW state the fine-tuning checkpoint
saved (:mod:`llm_influence.features.optimizer`: ``m`` = ``exp_avg``, ``v`` = ``exp_avg_sq``
after ``t`` steps, ``beta1``, ``beta2``, ``eps``), optionally project them with the seeded
random projections of :mod:`llm_influence.features.projection`, compare unit-normalised
vectors, and sum over checkpoints. ``g`` is a training example's loss gradient, ``q`` the
test vector (the gradient of the test measurement, :mod:`llm_influence.features.measure`;
by default the test example's own loss). All arithmetic is float64; scores are float64,
**higher = the training example helped the test example more** (positive: a gradient step
on the training example lowers the test loss / moves the measurement toward the behaviour).

``trackstar`` (Chang et al. 2024, "Scalable Influence and Fact Tracing for Large Language
Model Pretraining", arXiv 2410.17413)
    per checkpoint, for every training and test example::

        u   = P ( grad / (sqrt(v_hat) + eps) )          optimizer second-moment correction, projection P
        u~  = (R + delta I)^(-1/2) u                     the paper's Hessian approximation R
        score[t, i] = < u~_t / |u~_t| , u~_i / |u~_i| >  unit-normalised encodings (a cosine)

    with ``v_hat = v / (1 - beta2^t)`` (Adam's bias-corrected second moment; its constant
    factor cancels in the normalisation and only sets the scale against ``eps``), applied to
    the training and the test gradients alike. ``R`` is the paper's task-specific Hessian
    approximation, a mixture of the autocorrelation (uncentred second moment) of the
    corrected, projected *test* vectors and of the *training* vectors::

        R = lambda R_eval + (1 - lambda) R_train,  R_eval = (1/m) sum_t u_t u_t^T,  R_train = (1/n) sum_i u_i u_i^T

    which down-weights directions common to the evaluation examples (in the paper: the
    shared template of fact queries). ``lambda`` (``mixing``) is either given or ``auto``:
    the paper's rule (its Appendix A.1.3) picks ``lambda`` so that the ``k``-th largest
    eigenvalues of ``lambda R_eval`` and ``(1 - lambda) R_train`` are equal,
    ``lambda = s_train[k] / (s_eval[k] + s_train[k])`` (``k``: ``downweight_components``).
    Scores summed over checkpoints ``c`` with weights ``w_c`` when ``checkpoints="all"``.

    Choices where the paper is silent or its regime differs from a LoRA fine-tune:

    * ``damping`` (``delta``): the paper's ``R`` comes from millions of examples and is
      full rank; here ``n + m`` vectors span a tiny subspace of the LoRA space, so
      ``R^(-1/2)`` needs damping. Default: ``damping_ratio`` (0.1) times the mean diagonal
      entry ``trace(R) / d`` of ``R``, the project's rule for every damped method; or an
      explicit ``damping``. Computed exactly through the ``(n+m) x (n+m)`` Gram matrix of
      the corrected vectors (Woodbury: ``(A^T A + delta I)^(-1) = (I - A^T (delta I + A A^T)^(-1) A) / delta``
      with ``A`` the rows ``sqrt((1-lambda)/n) u_i`` and ``sqrt(lambda/m) u_t``), so the
      ``d x d`` matrix is never formed.
    * ``k`` for ``mixing="auto"``: the paper uses ``k = 1000`` of ``65,536`` dimensions. Here
      ``R_eval`` has at most ``m`` non-zero eigenvalues, so the default keeps the paper's
      *share* of the available spectrum, ``k = max(1, round(1000/65536 * r))`` with ``r`` the
      smaller of the two ranks (``k = 1`` for a few hundred examples: the top eigenvalues of
      the two parts are balanced).
    * ``structure``: ``joint`` (default) is one ``R`` over the whole (projected) LoRA
      gradient, as the paper's single ``R`` over its projected vector; ``block`` uses a
      block-diagonal ``R`` per LoRA matrix (the project's block structure), with ``lambda``
      chosen from the eigenvalues of all blocks pooled.
    * ``hessian``: ``mixed`` (the paper), ``train`` (``lambda = 0``, the classic
      Gauss-Newton ``R``), or ``none`` (no ``R``: optimizer-corrected gradient cosine).
    * checkpoints: the paper computes its encodings on the final model, so the default is
      the attributed checkpoint alone (``checkpoints="last"``, weight 1, scores in [-1, 1]);
      ``"all"`` sums over the run's checkpoints as TracIn reads them (every epoch up to the
      attributed one, each weighted by its mean learning rate), each with its own AdamW state
      and its own ``R``.
    * projection: ``project_dim=D`` (None: no projection, the exact encodings) projects the
      *corrected* gradients with :class:`~llm_influence.features.projection.GradientProjector`
      (``project_seed``, ``project_kind``; ``D`` split over blocks by size), as the paper
      projects ``grad / sqrt(V)``. The correction must precede the projection, so stored
      ``--project-dim`` features cannot be used with ``optimizer_correction=true``.
    * ``eps``: the optimizer's own ``eps`` (AdamW's ``1e-8``), added outside the square root
      as Adam does, unless given.

    Scoring ``WHOLE``: ``R`` couples every training example, so rank 0 scores the whole
    matrix under ``torchrun`` (the other ranks add zeros). Memory: one LoRA block of the
    ``n + m`` vectors in float64 at a time, the ``(n+m)^2`` Gram (one per block with
    ``structure="block"``); ``n + m`` above ``max_rows`` is refused.

``less`` (Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction
Tuning", arXiv 2402.04333)
    per checkpoint, the training example's *Adam update direction* against the test
    example's plain gradient::

        m' = beta1 m + (1 - beta1) g,   v' = beta2 v + (1 - beta2) g^2          (one more Adam step from the saved state)
        Gamma = (m' / (1 - beta1^(t+1))) / (sqrt(v' / (1 - beta2^(t+1))) + eps)
        score[t, i] = sum_c w_c cos(P q_t^(c), P Gamma_i^(c))

    with ``w_c`` the mean learning rate of epoch ``c`` (the paper's ``eta_bar_i``), over every
    epoch checkpoint up to the attributed one (``checkpoints="all"``, the paper's warm-up
    checkpoints; here the run's own). Cosine is the paper's fix for the short-sequence
    gradient-norm bias. Choices: bias correction with ``t + 1`` (the step Adam would take;
    ``bias_correction=false`` drops it, as the authors' released code does), ``eps`` added
    outside the root as in the paper's formula (the optimizer's ``eps`` unless given),
    ``first_moment=false`` drops the checkpoint's ``m`` from ``Gamma`` (``g / (sqrt(v_hat') + eps)``),
    projection as for ``trackstar`` (the paper uses ``D = 8192``; default: none, exact).
    Scoring ``SEPARABLE``: a column depends only on its training example, the test set and
    the checkpoints' optimizer state, so training chunks are scored on their own (and by
    different ranks under ``torchrun``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import UserError
from ..features.projection import PROJECTION_KINDS, GradientProjector, ProjectionSpec
from ..features.types import Features
from ._common import DTYPE, check_compatible, device_of, flat64, require_grads
from .arguments import (ArgumentError, MethodArguments, argument, integer, optional_positive_float, positive_int)
from .base import Method, Scoring, register
from .damping import DampingArguments, damping_source
from .gradsim import safe_cosine
from .linalg import SPDFactor

CHECKPOINT_CHOICES = ("last", "all")
HESSIAN_CHOICES = ("mixed", "train", "none")
STRUCTURE_CHOICES = ("joint", "block")
#: the paper's 1000 down-weighted components of its 65,536-dimensional projection
PAPER_COMPONENT_SHARE = 1000 / 65536
DEFAULT_MAX_ROWS = 16384


# ---------------------------------------------------------------------------------------
# argument checks

def boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ArgumentError(f"{name} must be true or false, got {value!r}")


def optional_positive_int(name: str, value: Any) -> Optional[int]:
    return None if value is None or value == "none" else positive_int(name, value)


def mixing_value(name: str, value: Any) -> float | str:
    if value == "auto":
        return "auto"
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if isinstance(value, bool) or not (0.0 <= out <= 1.0):
        raise ArgumentError(f"{name} must be 'auto' or a number in [0, 1], got {value!r}")
    return out


@dataclass(frozen=True)
class OptimizerAwareArguments(MethodArguments):
    """The arguments ``trackstar`` and ``less`` share."""

    checkpoints: str = argument("last", "last: the attributed checkpoint alone (weight 1); all: every epoch "
                                "checkpoint up to it, weighted by its mean learning rate", choices=CHECKPOINT_CHOICES)
    bias_correction: bool = argument(True, "divide Adam's moments by 1 - beta^step as Adam does", check=boolean)
    eps: Optional[float] = argument(None, "added to sqrt(v); None: the optimizer's eps", check=optional_positive_float)
    project_dim: Optional[int] = argument(None, "project the corrected gradients to D dimensions inside the method "
                                          "(None: no projection)", check=optional_positive_int)
    project_seed: int = argument(0, "seed of the method's projection", check=integer)
    project_kind: str = argument("gaussian", "distribution of the method's projection", choices=PROJECTION_KINDS)


@dataclass(frozen=True)
class TrackStarArguments(OptimizerAwareArguments, DampingArguments):
    """:class:`OptimizerAwareArguments`, the damping of ``R + delta I`` (``damping`` /
    ``damping_ratio``: ratio x the mean diagonal entry of ``R``), and TrackStar's own."""

    optimizer_correction: bool = argument(True, "divide each gradient entry by sqrt(v_hat) + eps of the checkpoint's "
                                          "AdamW state", check=boolean)
    hessian: str = argument("mixed", "R: mixed (lambda R_eval + (1-lambda) R_train, the paper), train (R_train), "
                            "none", choices=HESSIAN_CHOICES)
    structure: str = argument("joint", "one R over all LoRA blocks (joint) or one per block (block)",
                              choices=STRUCTURE_CHOICES)
    mixing: Any = argument("auto", "lambda of the mixed R: a number in [0, 1], or auto (the paper's eigenvalue rule)",
                           check=mixing_value)
    downweight_components: Optional[int] = argument(
        None, "k of the auto rule; None: the paper's share 1000/65536 of the smaller rank, at least 1",
        check=optional_positive_int)
    normalize: bool = argument(True, "unit-normalise the encodings (scores are cosines)", check=boolean)
    max_rows: int = argument(DEFAULT_MAX_ROWS, "largest n_train + n_test accepted (an (n+m)^2 float64 Gram)",
                             check=positive_int)


@dataclass(frozen=True)
class LESSArguments(OptimizerAwareArguments):
    checkpoints: str = argument("all", "all: every epoch checkpoint up to the attributed one, weighted by its mean "
                                "learning rate (the paper); last: the attributed checkpoint alone",
                                choices=CHECKPOINT_CHOICES)
    first_moment: bool = argument(True, "include the checkpoint's first moment m in the Adam direction (the paper)",
                                  check=boolean)


# ---------------------------------------------------------------------------------------
# shared machinery


def checkpoint_triples(method: str, train: Features, test: Features,
                       which: str) -> list[tuple[float, Features, Features]]:
    """``[(weight, train features, test features)]`` of the checkpoints summed over:
    ``"last"`` the features themselves with weight 1; ``"all"`` their histories (TracIn's,
    matched by position, equal positive weights required), or the features themselves with
    weight 1 when neither has a history."""
    if which == "last" or (not train.history and not test.history):
        return [(1.0, train, test)]
    if len(train.history) != len(test.history):
        raise UserError(f"{method}: the training features have {len(train.history)} history checkpoints but "
                        f"the test features {len(test.history)}")
    out = []
    for k, ((w_tr, tr), (w_te, te)) in enumerate(zip(train.history, test.history)):
        if not (isinstance(w_tr, (int, float)) and math.isfinite(w_tr) and w_tr > 0):
            raise UserError(f"{method}: checkpoint {k} has weight {w_tr!r}; weights must be positive numbers")
        if not math.isclose(w_tr, w_te, rel_tol=1e-9, abs_tol=0.0):
            raise UserError(f"{method}: checkpoint {k} has weight {w_tr} for training but {w_te} for test features")
        if tr.n != train.n or te.n != test.n:
            raise UserError(f"{method}: checkpoint {k} has {tr.n}/{te.n} examples, expected {train.n}/{test.n}")
        out.append((float(w_tr), tr, te))
    return out


class Encoder:
    """Per checkpoint: the optimizer-state rescaling and the method's projection of one
    block's flattened gradients (float64)."""

    def __init__(self, method: str, args: OptimizerAwareArguments, train: Features, moments, *,
                 need_moments: bool) -> None:
        self.method, self.args, self.moments = method, args, moments
        if need_moments:
            if moments is None:
                raise UserError(f"{method}: the checkpoint has no AdamW state (epoch-0, or an adapter without "
                                "optimizer.safetensors); it needs the optimizer's moments"
                                + ("; set optimizer_correction=false to go without" if method == "trackstar" else ""))
            for b in train.blocks:
                if b not in moments.exp_avg_sq:
                    raise UserError(f"{method}: the optimizer state has no block {b!r}")
                if tuple(train.grads[b].shape[1:]) != tuple(moments.exp_avg_sq[b].shape):
                    raise UserError(f"{method}: block {b!r} gradients are {tuple(train.grads[b].shape[1:])} but its "
                                    f"AdamW state is {tuple(moments.exp_avg_sq[b].shape)}: projected features "
                                    "(--project-dim) cannot be rescaled entry by entry; use "
                                    f"{method}.project_dim instead")
        self.projector = None
        if args.project_dim is not None:
            shapes = {b: tuple(train.grads[b].shape[1:]) for b in train.blocks}
            try:
                self.projector = GradientProjector(ProjectionSpec(dim=args.project_dim, seed=args.project_seed,
                                                                  kind=args.project_kind), shapes)
            except UserError as exc:
                raise UserError(f"{method}.project_dim: {exc}") from None

    def eps(self, block: str) -> float:
        return self.args.eps if self.args.eps is not None else self.moments.eps[block]

    def precondition(self, block: str, X: torch.Tensor) -> torch.Tensor:
        """``X / (sqrt(v_hat) + eps)`` entry-wise (``X``: ``[rows, d]`` float64)."""
        v = self.moments.second_moment(block, self.args.bias_correction).reshape(-1).to(X.device)
        return X / (v.sqrt() + self.eps(block))

    def adam_direction(self, block: str, X: torch.Tensor, first_moment: bool) -> torch.Tensor:
        """LESS's ``Gamma`` of each row of ``X`` (one more Adam step from the saved state)."""
        mo = self.moments
        b1, b2 = mo.betas[block]
        t = mo.step + 1
        m = mo.exp_avg[block].reshape(-1).to(device=X.device, dtype=DTYPE)
        v = mo.exp_avg_sq[block].reshape(-1).to(device=X.device, dtype=DTYPE)
        m_new = b1 * m + (1.0 - b1) * X if first_moment else X
        v_new = b2 * v + (1.0 - b2) * X.square()
        if self.args.bias_correction:
            if first_moment:
                m_new = m_new / (1.0 - b1 ** t)
            v_new = v_new / (1.0 - b2 ** t)
        return m_new / (v_new.sqrt() + self.eps(block))

    def project(self, block: str, X: torch.Tensor) -> torch.Tensor:
        if self.projector is None:
            return X
        P = self.projector.matrix(block, DTYPE, X.device)
        return X @ P.T

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.moments is not None:
            out["optimizer_step"] = self.moments.step
            first = next(iter(self.moments.eps), None)
            out["eps"] = self.args.eps if self.args.eps is not None else (self.moments.eps[first] if first else None)
        if self.projector is not None:
            out["projection"] = self.projector.describe()
        return out


def auto_mixing(train_eigs: torch.Tensor, eval_eigs: torch.Tensor, k: Optional[int]) -> tuple[float, int]:
    """The paper's rule: ``lambda`` with ``lambda s_eval[k] = (1 - lambda) s_train[k]`` for the
    ``k``-th largest eigenvalues (1-based; pooled spectra). Returns ``(lambda, k used)``."""
    tr = torch.sort(train_eigs.clamp(min=0), descending=True).values
    ev = torch.sort(eval_eigs.clamp(min=0), descending=True).values
    top = float(torch.cat([tr[:1], ev[:1]]).max()) if tr.numel() + ev.numel() else 0.0
    tol = top * 1e-12
    rank = min(int((tr > tol).sum()), int((ev > tol).sum()))
    if rank == 0:
        return 0.0, 0
    if k is None:
        k = max(1, round(PAPER_COMPONENT_SHARE * rank))
    k = min(k, rank)
    s_tr, s_ev = float(tr[k - 1]), float(ev[k - 1])
    return s_tr / (s_ev + s_tr), k


class _OptimizerAwareMethod(Method):
    """What TrackStar and LESS share: ``fit`` only keeps the training gradients (their
    optimizer state and checkpoint history travel inside ``Features``); all work is in ``score``."""

    def fit(self, train: Features) -> "_OptimizerAwareMethod":
        require_grads(self.name, train, "training")
        self._train = train
        self.diagnostics = {}
        return self


# ---------------------------------------------------------------------------------------
# trackstar


@register
class TrackStar(_OptimizerAwareMethod):
    """Arguments: :class:`TrackStarArguments`. See the module docstring."""

    name = "trackstar"
    needs = frozenset({"grads", "optimizer"})
    Arguments = TrackStarArguments
    scoring = Scoring.WHOLE

    def required_features(self) -> frozenset[str]:
        out = {"grads"}
        if self.args.optimizer_correction:
            out.add("optimizer")
        if self.args.checkpoints == "all":
            out.add("history")
        return frozenset(out)

    def score(self, test: Features) -> torch.Tensor:
        train = self.train
        check_compatible(self.name, train, test)
        n, m = train.n, test.n
        if n + m > self.args.max_rows:
            raise UserError(f"{self.name}: {n} training and {m} test examples need a ({n + m})^2 Gram matrix "
                            f"(max_rows {self.args.max_rows})")
        device = device_of(train)
        total = torch.zeros(m, n, dtype=DTYPE, device=device)
        per_checkpoint = []
        for w, tr, te in checkpoint_triples(self.name, train, test, self.args.checkpoints):
            check_compatible(self.name, tr, te)
            scores, info = self._one_checkpoint(tr, te, device)
            total += w * scores
            per_checkpoint.append({"weight": w, **info})
        self.diagnostics = {
            "checkpoints": per_checkpoint,
            "hessian": self.args.hessian, "structure": self.args.structure,
            "damping_source": damping_source(self.args.damping, self.args.damping_ratio),
            "optimizer_correction": self.args.optimizer_correction, "normalize": self.args.normalize,
        }
        return total

    def grams(self, tr: Features, te: Features, device: torch.device) -> tuple[dict[str, torch.Tensor],
                                                                                  dict[str, int], Encoder]:
        """``{block: M_l}``: the ``(n+m) x (n+m)`` Gram matrices of the corrected, projected
        training (first ``n`` rows) and test vectors, and each block's dimension."""
        enc = Encoder(self.name, self.args, tr, tr.optimizer, need_moments=self.args.optimizer_correction)
        grams, dims = {}, {}
        for b in tr.blocks:
            Z = torch.cat([flat64(tr, b, device), flat64(te, b, device)])
            if self.args.optimizer_correction:
                Z = enc.precondition(b, Z)
            Z = enc.project(b, Z)
            grams[b] = Z @ Z.T
            dims[b] = int(Z.shape[1])
        return grams, dims, enc

    def _one_checkpoint(self, tr: Features, te: Features, device: torch.device) -> tuple[torch.Tensor, dict]:
        n, m = tr.n, te.n
        grams, dims, enc = self.grams(tr, te, device)
        info: dict[str, Any] = enc.describe()
        if self.args.structure == "joint":
            units = {"all": (sum(grams.values()), sum(dims.values()))}
        else:
            units = {b: (grams[b], dims[b]) for b in grams}
        if self.args.hessian == "none":
            G = sum(M for M, _ in units.values())
        else:
            lam, k = self._mixing(units, n, m)
            info.update({"mixing": lam, "downweight_components": k})
            G = torch.zeros(n + m, n + m, dtype=DTYPE, device=device)
            damping = {}
            for u, (M, d) in units.items():
                Gu, delta = self._corrected_gram(M, d, n, m, lam)
                G += Gu
                damping[u] = delta
            info["damping"] = damping["all"] if self.args.structure == "joint" else {
                "min": min(damping.values()), "max": max(damping.values())}
        G = (G + G.T) / 2
        dots = G[n:, :n]
        if not self.args.normalize:
            return dots, info
        norms = G.diagonal().clamp(min=0).sqrt()
        info["zero_norm_train"] = int((norms[:n] == 0).sum())
        info["zero_norm_test"] = int((norms[n:] == 0).sum())
        return safe_cosine(dots, norms[n:], norms[:n]), info

    def _mixing(self, units: dict[str, tuple[torch.Tensor, int]], n: int, m: int) -> tuple[float, Optional[int]]:
        if self.args.hessian == "train":
            return 0.0, None
        if self.args.mixing != "auto":
            return float(self.args.mixing), None
        tr = torch.cat([torch.linalg.eigvalsh(M[:n, :n]) / n for M, _ in units.values()])
        ev = torch.cat([torch.linalg.eigvalsh(M[n:, n:]) / m for M, _ in units.values()])
        return auto_mixing(tr, ev, self.args.downweight_components)

    def _corrected_gram(self, M: torch.Tensor, dim: int, n: int, m: int, lam: float) -> tuple[torch.Tensor, float]:
        """``<u~_a, u~_b> = u_a^T (R + delta I)^{-1} u_b`` for all pairs, from the Gram ``M``
        of the ``u`` (Woodbury through ``K = A A^T = S M S``)."""
        s = torch.cat([torch.full((n,), math.sqrt((1.0 - lam) / n), dtype=DTYPE),
                       torch.full((m,), math.sqrt(lam / m), dtype=DTYPE)]).to(M.device)
        K = s[:, None] * M * s[None, :]
        trace = float(K.diagonal().sum())  # = trace(R)
        delta = float(self.args.damping) if self.args.damping is not None else self.args.damping_ratio * trace / dim
        if delta <= 0:  # every vector is zero
            return torch.zeros_like(M), 0.0
        B = s[:, None] * M  # column b: A u_b
        factor = SPDFactor(K + delta * torch.eye(n + m, dtype=DTYPE, device=M.device))
        return (M - B.T @ factor.solve(B)) / delta, delta


# ---------------------------------------------------------------------------------------
# less


@register
class LESS(_OptimizerAwareMethod):
    """Arguments: :class:`LESSArguments`. See the module docstring."""

    name = "less"
    needs = frozenset({"grads", "optimizer", "history"})
    Arguments = LESSArguments
    scoring = Scoring.SEPARABLE

    def required_features(self) -> frozenset[str]:
        return frozenset({"grads", "optimizer"} | ({"history"} if self.args.checkpoints == "all" else set()))

    def score(self, test: Features) -> torch.Tensor:
        train = self.train
        check_compatible(self.name, train, test)
        device = device_of(train)
        total = torch.zeros(test.n, train.n, dtype=DTYPE, device=device)
        per_checkpoint = []
        for w, tr, te in checkpoint_triples(self.name, train, test, self.args.checkpoints):
            check_compatible(self.name, tr, te)
            enc = Encoder(self.name, self.args, tr, tr.optimizer, need_moments=True)
            dots = torch.zeros(te.n, tr.n, dtype=DTYPE, device=device)
            train_sq = torch.zeros(tr.n, dtype=DTYPE, device=device)
            test_sq = torch.zeros(te.n, dtype=DTYPE, device=device)
            for b in tr.blocks:
                gamma = enc.project(b, enc.adam_direction(b, flat64(tr, b, device), self.args.first_moment))
                q = enc.project(b, flat64(te, b, device))
                dots += q @ gamma.T
                train_sq += gamma.square().sum(dim=1)
                test_sq += q.square().sum(dim=1)
            total += w * safe_cosine(dots, test_sq.sqrt(), train_sq.sqrt())
            per_checkpoint.append({"weight": w, **enc.describe()})
        self.diagnostics = {"checkpoints": per_checkpoint, "first_moment": self.args.first_moment,
                            "bias_correction": self.args.bias_correction}
        return total
