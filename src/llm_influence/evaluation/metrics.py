"""Acc and Cover: how well a score matrix ranks the ground-truth training examples.

Conventions (shared by every function here):

* ``scores`` is ``[n_test, n_train]``, numpy array or torch tensor of any real dtype;
  ``scores[i, j]`` says how much training example ``j`` helped test example ``i``.
  **Higher = more helpful** (the project's score convention, ``score = -I(z_test, z_train)``).
* ``relevant`` is ``[n_test, n_train]`` booleans (``bool`` dtype, or integers/floats that
  are all 0 or 1): ``relevant[i, j]`` says whether training example ``j`` is a correct
  answer for test example ``i`` (default ground truth: same group, see
  :func:`relevance_from_task`).
* Ranking, per test row:

  - ``rank_by="score"`` (default, the paper's v2 ranking by -IF): descending by score.
  - ``rank_by="abs"`` (the paper's older v1 ranking by |IF|): descending by ``|score|``.

  Scores are compared in float64 (exact for every float16/bfloat16/float32/float64 input,
  so no ties are created or broken by the conversion); ``-0.0`` and ``0.0`` are equal keys.
* **Ties.** Acc and Cover are the *expected* values over a uniformly random order of tied
  scores, computed exactly (no sampling): if the top key is shared by ``t`` training
  examples of which ``r`` are relevant, the hit is ``r / t``; if the Cover cut-off ``k``
  falls inside a run of ``t`` tied examples holding ``r`` relevant ones, of which ``u``
  must still be taken, that run contributes ``u * r / t``. So permuting the training
  columns never changes a metric, and with all scores equal Acc = Cover = the fraction of
  relevant training examples. :func:`rank_training` (a concrete order, for lists shown to
  people) breaks ties toward the lower training index and :func:`tie_ranks` marks which
  positions are tied, so every list can say so.
* NaN or +/-Inf anywhere in ``scores`` raises :class:`ValueError` naming the first
  offending ``(test, train)`` position in row-major order; nothing is ranked silently.
* **Acc** = mean over test examples of "the top-ranked training example is relevant"
  (expected over tie orders, see above).
* **Cover** = mean over test examples of ``(#relevant among the top k) / k`` (expected
  over tie orders). By default
  ``k`` for test example ``i`` is the number of training examples relevant to it (its
  ground-truth group's size in train). For the paper's balanced tasks that equals the
  paper's ``k = n_train / n_classes`` (90 for Grammars/MathQA, 20 for Mixed); for an
  unbalanced task it is the size of the test example's own group. An explicit ``k``
  (one int for all test examples, or one per test example) is clipped to ``n_train``
  when larger; the denominator is the clipped ``k``. A ``k`` larger than the group caps
  Cover below 1 (at ``group size / k``), by definition.
* A test example with **no** relevant training example (its group is absent from train)
  cannot be scored: it is excluded from both the Acc and the Cover averages and counted
  in :attr:`AttributionMetrics.n_skipped`. If every test example is skipped,
  :class:`ValueError` is raised.
* **Intervals.** ``acc_ci95`` / ``cover_ci95`` are 95 % percentile-bootstrap intervals over
  the scored test examples (:func:`~llm_influence.evaluation.uncertainty.bootstrap_ci`,
  seeded, 2,000 resamples): the uncertainty that comes from which test examples were drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence, Union

import numpy as np
import torch

from .uncertainty import DEFAULT_CI_SEED, DEFAULT_RESAMPLES, bootstrap_ci

if TYPE_CHECKING:
    from ..data.example import TaskData

RankBy = Literal["score", "abs"]
RANK_BY_CHOICES: tuple[str, ...] = ("score", "abs")
#: how every metric treats tied scores (recorded beside each metric in metrics.json)
TIE_RULE = "expected over a uniformly random order of tied scores"

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]


# --------------------------------------------------------------------------- helpers

def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bool:
            return x.numpy()
        if x.is_complex():
            raise ValueError("scores must be real, got a complex tensor")
        if x.is_floating_point():
            return x.to(torch.float64).numpy()
        return x.numpy()
    return np.asarray(x)


def _check_scores(scores: ArrayLike) -> np.ndarray:
    """``scores`` as a finite float64 ``[n_test, n_train]`` array, or ValueError."""
    arr = _to_numpy(scores)
    if arr.ndim != 2:
        raise ValueError(f"scores must be 2-D [n_test, n_train], got shape {tuple(arr.shape)}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"scores must be a real-valued (float or int) matrix, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.shape[1] == 0:
        raise ValueError(f"scores has no training columns (shape {tuple(arr.shape)})")
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"scores[{i}, {j}] (test {i}, train {j}) is {arr[i, j]!r}; "
            f"{int(bad.sum())} non-finite entr{'y' if bad.sum() == 1 else 'ies'} in total; "
            "scores must be finite to be ranked"
        )
    return arr


def _check_relevant(relevant: ArrayLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """``relevant`` as a bool ``[n_test, n_train]`` array, or ValueError."""
    arr = _to_numpy(relevant)
    if arr.ndim != 2:
        raise ValueError(f"relevant must be 2-D [n_test, n_train], got shape {tuple(arr.shape)}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(
            f"relevant has shape {tuple(arr.shape)} but scores has shape {tuple(shape)}; "
            "both must be [n_test, n_train]"
        )
    if arr.dtype != np.bool_:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ValueError(f"relevant must be boolean (or 0/1), got dtype {arr.dtype}")
        not01 = ~((arr == 0) | (arr == 1))
        if not01.any():
            i, j = (int(v) for v in np.argwhere(not01)[0])
            raise ValueError(f"relevant must be boolean (or 0/1); relevant[{i}, {j}] is {arr[i, j]!r}")
        arr = arr == 1
    return arr


def _check_rank_by(rank_by: str) -> str:
    if rank_by not in RANK_BY_CHOICES:
        raise ValueError(f"rank_by must be one of {RANK_BY_CHOICES}, got {rank_by!r}")
    return rank_by


def _keys(arr: np.ndarray, rank_by: str) -> np.ndarray:
    """The ranking keys of a checked float64 matrix (+ 0.0 maps -0.0 to 0.0)."""
    return (np.abs(arr) if rank_by == "abs" else arr) + 0.0


def _order(arr: np.ndarray, rank_by: str) -> np.ndarray:
    """Stable descending order of a checked float64 matrix (lower index first on ties)."""
    # Negating a float64 is exact, so a stable ascending sort of -key is a descending sort
    # of key that keeps equal keys in index order.
    return np.argsort(-_keys(arr, rank_by), axis=1, kind="stable")


def _tie_runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(start, stop)`` ``[n_test, n_train]``: position ``p`` of a row sorted by key lies in
    the run of equal keys ``start[p] <= q < stop[p]``."""
    n = sorted_keys.shape[1]
    idx = np.broadcast_to(np.arange(n), sorted_keys.shape)
    opens = np.ones(sorted_keys.shape, dtype=bool)
    opens[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    start = np.maximum.accumulate(np.where(opens, idx, 0), axis=1)
    closes = np.ones(sorted_keys.shape, dtype=bool)
    closes[:, :-1] = sorted_keys[:, :-1] != sorted_keys[:, 1:]
    last_from_right = np.maximum.accumulate(np.where(closes[:, ::-1], idx, 0), axis=1)[:, ::-1]
    return start, n - last_from_right


def expected_relevant_in_top(scores: np.ndarray, relevant: np.ndarray, k: np.ndarray,
                             rank_by: str = "score") -> np.ndarray:
    """``[n_test]`` float64: the expected number of relevant training examples among the top
    ``k[i]`` of row ``i``, over a uniformly random order of tied scores (exact).

    ``scores`` checked float64 ``[n_test, n_train]``, ``relevant`` bool of the same shape,
    ``1 <= k[i] <= n_train``. ``k`` may also be ``[m, n_test]`` (m cut-offs per row, e.g.
    Acc's 1 and Cover's k, from one sort); the result then has the same shape. The run of tied keys that the cut-off falls into, of length
    ``t`` with ``r`` relevant members of which ``u`` positions are inside the top ``k``,
    contributes ``u * r / t``; everything ranked strictly above it counts fully."""
    order = _order(scores, rank_by)
    sorted_keys = np.take_along_axis(-_keys(scores, rank_by), order, axis=1)
    ranked_rel = np.take_along_axis(relevant, order, axis=1)
    n_test = scores.shape[0]
    cum = np.zeros((n_test, scores.shape[1] + 1))
    cum[:, 1:] = np.cumsum(ranked_rel, axis=1)
    start, stop = _tie_runs(sorted_keys)
    rows = np.arange(n_test)
    last = k - 1
    a, b = start[rows, last], stop[rows, last]
    before, in_run = cum[rows, a], cum[rows, b] - cum[rows, a]
    return before + (k - a) * in_run / (b - a)


def _resolve_k(k: int | Sequence[int] | np.ndarray | torch.Tensor | None, n_relevant: np.ndarray,
               n_train: int) -> np.ndarray:
    n_test = n_relevant.shape[0]
    if k is None:
        k_arr = n_relevant.astype(np.int64)
    else:
        raw = _to_numpy(k)
        if raw.ndim == 0:
            raw = np.full(n_test, raw.item())
        if raw.ndim != 1 or raw.shape[0] != n_test:
            raise ValueError(f"k must be an int or one int per test example ({n_test}), got shape {tuple(raw.shape)}")
        if raw.dtype == np.bool_ or not (np.issubdtype(raw.dtype, np.integer)
                                         or (np.issubdtype(raw.dtype, np.floating)
                                             and np.all(np.isfinite(raw)) and np.all(raw == np.round(raw)))):
            raise ValueError(f"k must be a positive integer (or one per test example), got {k!r}")
        k_arr = raw.astype(np.int64)
        if (k_arr < 1).any():
            i = int(np.argmax(k_arr < 1))
            raise ValueError(f"k must be >= 1; k for test example {i} is {int(k_arr[i])}")
    return np.minimum(k_arr, n_train)


# --------------------------------------------------------------------------- public API

def rank_training(scores: ArrayLike, rank_by: RankBy = "score") -> np.ndarray | torch.Tensor:
    """Training indices ranked per test example, most helpful first.

    Args:
        scores: ``[n_test, n_train]`` real scores, higher = more helpful.
        rank_by: ``"score"`` (descending score) or ``"abs"`` (descending ``|score|``, the
            paper's v1 ranking).

    Returns:
        ``[n_test, n_train]`` int64 indices: row ``i`` is a permutation of
        ``range(n_train)``, ``out[i, 0]`` the top-ranked training example. Ties keep the
        lower training index first (stable); this concrete order is for displayed lists
        (see :func:`tie_ranks`), the metrics average over the order of ties instead. A torch tensor (on CPU) when ``scores`` is a
        tensor, else a numpy array.

    Raises:
        ValueError: bad shape, unknown ``rank_by``, or a NaN/Inf score (position named).
    """
    _check_rank_by(rank_by)
    order = _order(_check_scores(scores), rank_by).astype(np.int64)
    if isinstance(scores, torch.Tensor):
        return torch.from_numpy(order)
    return order


def tie_ranks(scores: ArrayLike, rank_by: RankBy = "score") -> np.ndarray:
    """``[n_test, n_train]`` int64: for each position of :func:`rank_training`'s order, the
    1-based rank shared by its run of tied scores (competition ranking: ``1, 2, 2, 4``).

    A displayed list shows ``ranks[i, p]`` and marks a tie where it repeats; the metrics
    average over the order within such a run (module docstring)."""
    _check_rank_by(rank_by)
    arr = _check_scores(scores)
    order = _order(arr, rank_by)
    start, _ = _tie_runs(np.take_along_axis(-_keys(arr, rank_by), order, axis=1))
    return start.astype(np.int64) + 1


@dataclass(frozen=True)
class AttributionMetrics:
    """Acc/Cover of one score matrix, with the per-test details.

    Attributes:
        acc: mean of ``per_test_hit`` over scored test examples, in ``[0, 1]``.
        cover: mean of ``per_test_cover`` over scored test examples, in ``[0, 1]``.
        acc_ci95, cover_ci95: ``(low, high)`` 95 % bootstrap intervals of ``acc`` and
            ``cover`` over the scored test examples.
        n_scored: test examples with at least one relevant training example.
        n_skipped: test examples with none (excluded from both averages).
        rank_by: the ranking used (``"score"`` or ``"abs"``).
        scored: ``[n_test]`` bool, which test examples were scored.
        per_test_hit: ``[n_test]`` float64 in ``[0, 1]``, the probability that the
            top-ranked training example is relevant (1 or 0 without a tie at the top; ``r/t``
            for a top run of ``t`` tied examples with ``r`` relevant); NaN when skipped.
        per_test_cover: ``[n_test]`` float64, expected ``#relevant in top k / k``; NaN when
            skipped.
        k: ``[n_test]`` int64, the Cover cut-off used for each test example (after
            clipping to ``n_train``; 0 for skipped test examples when ``k`` defaulted).
    """

    acc: float
    cover: float
    n_scored: int
    n_skipped: int
    rank_by: str
    scored: np.ndarray
    per_test_hit: np.ndarray
    per_test_cover: np.ndarray
    k: np.ndarray
    acc_ci95: tuple[float, float] = (float("nan"), float("nan"))
    cover_ci95: tuple[float, float] = (float("nan"), float("nan"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready summary (scalars only) for ``metrics.json``."""
        return {
            "acc": self.acc,
            "acc_ci95": [float(v) for v in self.acc_ci95],
            "cover": self.cover,
            "cover_ci95": [float(v) for v in self.cover_ci95],
            "n_scored": self.n_scored,
            "n_skipped": self.n_skipped,
            "rank_by": self.rank_by,
            "ties": TIE_RULE,
        }


def evaluate_scores(
    scores: ArrayLike,
    relevant: ArrayLike,
    rank_by: RankBy = "score",
    k: int | Sequence[int] | np.ndarray | torch.Tensor | None = None,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    ci_seed: int = DEFAULT_CI_SEED,
) -> AttributionMetrics:
    """Acc and Cover of ``scores`` against the ground truth ``relevant``, expected over a
    uniformly random order of tied scores, with 95 % bootstrap intervals.

    Args:
        scores: ``[n_test, n_train]`` real scores, higher = more helpful.
        relevant: ``[n_test, n_train]`` booleans (or 0/1), the ground truth.
        rank_by: ``"score"`` or ``"abs"`` (see :func:`rank_training`).
        k: Cover cut-off: ``None`` (default) = per test example, the number of training
            examples relevant to it; an int for all test examples; or ``[n_test]`` ints.
            Values above ``n_train`` are clipped to ``n_train``; values below 1 raise.
        n_resamples, ci_seed: the bootstrap of the intervals (over scored test examples).

    Returns:
        :class:`AttributionMetrics`. Test examples without any relevant training example
        are skipped (excluded from both averages, counted in ``n_skipped``).

    Raises:
        ValueError: bad shapes/dtypes, unknown ``rank_by``, non-finite scores (position
            named), bad ``k``, or every test example skipped.
    """
    _check_rank_by(rank_by)
    arr = _check_scores(scores)
    rel = _check_relevant(relevant, arr.shape)
    n_test, n_train = arr.shape

    n_relevant = rel.sum(axis=1)
    scored = n_relevant > 0
    n_scored = int(scored.sum())
    n_skipped = n_test - n_scored
    if n_scored == 0:
        raise ValueError(
            f"no test example can be scored: none of the {n_test} test examples has a relevant "
            "training example (are their groups absent from the training set?)"
        )
    k_arr = _resolve_k(k, n_relevant, n_train)

    k_safe = np.maximum(k_arr, 1)
    hit, in_top_k = expected_relevant_in_top(arr, rel, np.stack([np.ones(n_test, dtype=np.int64), k_safe]),
                                             rank_by)
    cov = in_top_k / k_safe

    per_hit = np.where(scored, hit, np.nan)
    per_cov = np.where(scored, cov, np.nan)
    return AttributionMetrics(
        acc=float(hit[scored].mean()),
        cover=float(cov[scored].mean()),
        n_scored=n_scored,
        n_skipped=n_skipped,
        rank_by=rank_by,
        scored=scored,
        per_test_hit=per_hit,
        per_test_cover=per_cov,
        k=k_arr,
        acc_ci95=bootstrap_ci(hit[scored], n_resamples=n_resamples, seed=ci_seed),
        cover_ci95=bootstrap_ci(cov[scored], n_resamples=n_resamples, seed=ci_seed),
    )


def acc(scores: ArrayLike, relevant: ArrayLike, rank_by: RankBy = "score") -> float:
    """Fraction of (scorable) test examples whose top-ranked training example is relevant.

    Shapes and conventions as in :func:`evaluate_scores`; test examples with no relevant
    training example are excluded.
    """
    return evaluate_scores(scores, relevant, rank_by=rank_by).acc


def cover(
    scores: ArrayLike,
    relevant: ArrayLike,
    k: int | Sequence[int] | np.ndarray | torch.Tensor | None = None,
    rank_by: RankBy = "score",
) -> float:
    """Mean over (scorable) test examples of ``#relevant in the top k / k``.

    ``k`` defaults per test example to its number of relevant training examples; larger
    values are clipped to ``n_train``. See :func:`evaluate_scores`.
    """
    return evaluate_scores(scores, relevant, rank_by=rank_by, k=k).cover


def relevance_from_task(task: "TaskData") -> torch.Tensor:
    """The task's ground truth as a ``[n_test, n_train]`` bool tensor.

    Entry ``[i, j]`` is ``task.relevant(task.test[i], task.train[j])`` (default: same group).
    """
    n_test, n_train = len(task.test), len(task.train)
    out = torch.zeros((n_test, n_train), dtype=torch.bool)
    if n_test and n_train:
        out[:] = torch.tensor(task.relevance_matrix(), dtype=torch.bool)
    return out


def evaluate_task(
    scores: ArrayLike,
    task: "TaskData",
    rank_by: RankBy = "score",
    k: int | Sequence[int] | np.ndarray | torch.Tensor | None = None,
) -> AttributionMetrics:
    """:func:`evaluate_scores` against ``task``'s ground truth (:func:`relevance_from_task`).

    ``scores`` rows follow ``task.test`` and columns follow ``task.train``.
    """
    return evaluate_scores(scores, relevance_from_task(task), rank_by=rank_by, k=k)
