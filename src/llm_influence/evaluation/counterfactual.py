"""Counterfactual ground truth: do a method's scores predict what retraining does?

Three measurements on any ``[n_test, n_train]`` score matrix (``scores[j, i]`` = how much
training example ``i`` helped test example ``j``; **higher = more helpful**, the project's
convention ``score = -I(z_test, z_train)``) and any retrainer
(:class:`~llm_influence.training.retrain.Retrainer`: ``retrain(mask) -> [n_test]`` losses):

**LDS** (linear datamodeling score). ``M`` random subsets ``S_m`` of ``round(alpha n)``
training examples (:func:`random_masks`, seeded); retrain on each, giving losses
``L[m, j]``. A method predicts the loss of test example ``j`` after training on ``S`` as
``pred[m, j] = -sum_{i in S_m} scores[j, i]`` (additive model; including helpful examples
lowers the loss, hence the minus). Per test example, ``rho_j`` = Spearman correlation over
the ``M`` subsets between ``pred[:, j]`` and ``L[:, j]`` (average ranks for ties; NaN when
either column is constant: such test examples are excluded and counted in ``n_nan``).
``LDS = mean_j rho_j`` with a 95 % percentile-bootstrap interval over test examples
(:func:`~llm_influence.evaluation.uncertainty.bootstrap_ci`, 2,000 seeded resamples).
**Noise ceiling**: the same masks (a subset) retrained with a second training seed, and the
LDS of seed-1 losses predicting seed-2 losses (Spearman per test example across those
masks): how well the best possible predictor could do given training noise.

**Leave-top-k-out** (:func:`leave_top_k_out`). For sampled test examples ``j`` remove the
method's top-k training examples for ``j`` (highest scores; ties toward the lower index)
and retrain; ``delta_j = L_j(without top-k) - L_j(all)``. Baseline: ``R`` random k-sets
(shared by the sampled test examples), ``delta^rand_j`` = their mean increase. Reported:
mean ``delta`` with interval, and the paired ``delta_j - delta^rand_j`` (positive = removing
what the method blames raises the loss more than removing random examples).

**Tail-patch** (:func:`tail_patch`). From the final model, one optimiser step on the
method's top-k for ``j``; ``delta_j = L_j(after) - L_j(before)`` (negative = the step
lowered the loss). Baseline: ``R`` random k-sets. Reported: mean ``delta`` and the paired
``delta^rand_j - delta_j`` (positive = the method's examples lower the loss more than random
ones).

Recomputing a stored LDS
------------------------
The ``counterfactual`` study stores, per task, the masks (``[M, n_train]`` 0/1), the losses
per training seed (``[M, n_test]``) and, per method, the scores file it used (path and
SHA-256; the path is relative to the folder of ``counterfactual.json`` when the file lies
below it, as in ``results/cpu/``).
With those, an LDS is these lines of numpy (what :func:`lds` computes)::

    import json, numpy as np
    from pathlib import Path
    from safetensors.numpy import load_file
    study = Path("results/cpu/counterfactual.json")
    task = json.load(open(study))["data"]["tasks"][0]
    masks = np.array(task["lds"]["masks"], dtype=bool)             # [M, n_train]
    losses = np.array(task["lds"]["losses"], dtype=np.float64)     # [M, n_test], seed 1
    ref = task["methods"]["datainf"]["scores"]                     # {"path", "sha256"}
    scores = load_file(study.parent / ref["path"])["scores"].astype(np.float64)  # [n_test, n_train]
    pred = -(masks.astype(np.float64) @ scores.T)                  # [M, n_test]

    def ranks(x):                                                  # average ranks of ties
        r = np.empty(len(x)); r[np.argsort(x, kind="stable")] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    rho = np.array([np.corrcoef(ranks(pred[:, j]), ranks(losses[:, j]))[0, 1]
                    if np.ptp(pred[:, j]) > 0 and np.ptp(losses[:, j]) > 0 else np.nan
                    for j in range(pred.shape[1])])
    lds = np.nanmean(rho)   # == task["methods"]["datainf"]["lds"]["lds"]

The noise ceiling is the same ``rho`` with ``pred = losses[task["lds"]["noise_masks"]]`` (the
first training seed's losses on the masks retrained twice: a seed's own losses are its
prediction of another seed's) and ``losses = np.array(task["lds"]["noise_losses"])`` (the
second seed's, ``[len(noise_masks), n_test]``); ``np.nanmean(rho)`` is
``task["lds"]["noise_ceiling"]["lds"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .uncertainty import DEFAULT_CI_SEED, DEFAULT_RESAMPLES, bootstrap_ci


# ---------------------------------------------------------------------------------------
# masks and predictions


def subset_size(n_train: int, alpha: float) -> int:
    """``round(alpha * n_train)`` (halves up), at least 1 and at most ``n_train``."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return int(min(n_train, max(1, math.floor(alpha * n_train + 0.5))))


def random_masks(n_train: int, n_masks: int, alpha: float, seed: int) -> np.ndarray:
    """``[n_masks, n_train]`` bool: row ``m`` keeps a uniformly random subset of exactly
    :func:`subset_size` ``(n_train, alpha)`` training examples (``numpy.random.default_rng(seed)``,
    one permutation per mask, so the first ``m`` masks do not depend on ``n_masks``)."""
    if n_masks < 1:
        raise ValueError(f"n_masks must be >= 1, got {n_masks}")
    size = subset_size(n_train, alpha)
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_masks, n_train), dtype=bool)
    for m in range(n_masks):
        masks[m, rng.permutation(n_train)[:size]] = True
    return masks


def _scores(scores: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(scores, torch.Tensor):
            scores = scores.detach().cpu().to(torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"scores must be [n_test, n_train], got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores must be finite")
    return arr


def predicted_losses(scores: Any, masks: np.ndarray) -> np.ndarray:
    """``[M, n_test]`` float64: ``pred[m, j] = -sum_{i in S_m} scores[j, i]``.

    ``scores``: ``[n_test, n_train]`` (higher = more helpful); ``masks``: ``[M, n_train]`` bool."""
    arr = _scores(scores)
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.shape[1] != arr.shape[1]:
        raise ValueError(f"masks must be [M, {arr.shape[1]}], got shape {masks.shape}")
    return -(masks.astype(np.float64) @ arr.T)


# ---------------------------------------------------------------------------------------
# Spearman per test example


def average_ranks(x: np.ndarray) -> np.ndarray:
    """``[n]`` float64 ranks 0..n-1 of ``x`` (``[n]``), ties sharing their average rank."""
    x = np.asarray(x)
    r = np.empty(len(x), dtype=np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[n_cols]`` float64: Spearman correlation of column ``j`` of ``a`` with column ``j``
    of ``b`` (both ``[M, n_cols]``, ``M >= 2``): the Pearson correlation of their average
    ranks; NaN where either column is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"spearman_columns: need two [M, n] arrays of one shape, got {a.shape} and {b.shape}")
    if a.shape[0] < 2:
        raise ValueError("spearman_columns: need at least 2 rows (subsets)")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("spearman_columns: values must be finite")
    out = np.full(a.shape[1], np.nan)
    for j in range(a.shape[1]):
        if np.ptp(a[:, j]) > 0 and np.ptp(b[:, j]) > 0:
            out[j] = np.corrcoef(average_ranks(a[:, j]), average_ranks(b[:, j]))[0, 1]
    return out


@dataclass(frozen=True)
class LDSResult:
    """An LDS (or noise ceiling).

    Attributes:
        lds: mean of ``per_test`` over the test examples where it is finite (NaN if none).
        ci95: 95 % percentile-bootstrap interval of that mean over those test examples.
        per_test: ``[n_test]`` Spearman correlations (NaN where excluded).
        n_scored: test examples with a finite correlation.
        n_nan: test examples whose predictions or losses were constant across subsets.
        n_masks: subsets the correlations run over.
    """

    lds: float
    ci95: tuple[float, float]
    per_test: np.ndarray
    n_scored: int
    n_nan: int
    n_masks: int

    def to_dict(self) -> dict[str, Any]:
        return {"lds": self.lds, "ci95": list(self.ci95), "n_scored": self.n_scored, "n_nan": self.n_nan,
                "n_masks": self.n_masks, "per_test": [None if not np.isfinite(v) else float(v) for v in self.per_test]}


def _summarise(rho: np.ndarray, n_masks: int, n_resamples: int, ci_seed: int) -> LDSResult:
    finite = rho[np.isfinite(rho)]
    mean = float(finite.mean()) if finite.size else math.nan
    ci = bootstrap_ci(finite, n_resamples=n_resamples, seed=ci_seed)
    return LDSResult(mean, ci, rho, int(finite.size), int(rho.size - finite.size), n_masks)


def lds(scores: Any, masks: np.ndarray, losses: np.ndarray, *, n_resamples: int = DEFAULT_RESAMPLES,
        ci_seed: int = DEFAULT_CI_SEED) -> LDSResult:
    """The LDS of ``scores`` (``[n_test, n_train]``, higher = more helpful) on retrained
    ``losses`` (``[M, n_test]``, nats) of the subsets ``masks`` (``[M, n_train]`` bool)."""
    pred = predicted_losses(scores, masks)
    losses = np.asarray(losses, dtype=np.float64)
    if losses.shape != pred.shape:
        raise ValueError(f"losses must be [M, n_test] = {list(pred.shape)}, got {list(losses.shape)}")
    return _summarise(spearman_columns(pred, losses), pred.shape[0], n_resamples, ci_seed)


def noise_ceiling(losses_a: np.ndarray, losses_b: np.ndarray, *, n_resamples: int = DEFAULT_RESAMPLES,
                  ci_seed: int = DEFAULT_CI_SEED) -> LDSResult:
    """The LDS of one training seed's losses predicting another's on the same subsets:
    per test example the Spearman correlation across subsets of ``losses_a`` and
    ``losses_b`` (both ``[M, n_test]``), averaged, with its interval."""
    a, b = np.asarray(losses_a, dtype=np.float64), np.asarray(losses_b, dtype=np.float64)
    return _summarise(spearman_columns(a, b), a.shape[0], n_resamples, ci_seed)


# ---------------------------------------------------------------------------------------
# top-k sets


def k_of(fraction: float, n_train: int) -> int:
    """``round(fraction * n_train)`` (halves up), at least 1 and at most ``n_train - 1``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"top-k fraction must be in (0, 1), got {fraction}")
    return int(max(1, min(n_train - 1, math.floor(fraction * n_train + 0.5))))


def top_k(scores_row: np.ndarray, k: int) -> list[int]:
    """The ``k`` training indices with the highest scores, best first (ties toward the lower
    index, as :func:`~llm_influence.evaluation.metrics.rank_training` orders them)."""
    row = np.asarray(scores_row, dtype=np.float64)
    return [int(i) for i in np.argsort(-row, kind="stable")[:k]]


def random_sets(n_train: int, k: int, count: int, seed: int) -> list[list[int]]:
    """``count`` uniformly random k-subsets of ``range(n_train)`` (sorted), seeded."""
    rng = np.random.default_rng(seed)
    return [sorted(int(i) for i in rng.choice(n_train, size=k, replace=False)) for _ in range(count)]


def without(n_train: int, rows: Sequence[int]) -> np.ndarray:
    """``[n_train]`` bool mask keeping every training example except ``rows``."""
    mask = np.ones(n_train, dtype=bool)
    mask[list(rows)] = False
    return mask


def sample_tests(n_test: int, count: int, seed: int) -> list[int]:
    """``min(count, n_test)`` distinct test indices drawn uniformly (seeded), ascending."""
    rng = np.random.default_rng(seed)
    return sorted(int(j) for j in rng.choice(n_test, size=min(count, n_test), replace=False))


def mean_interval(values: Sequence[float], *, n_resamples: int = DEFAULT_RESAMPLES,
                  ci_seed: int = DEFAULT_CI_SEED) -> dict[str, Any]:
    """``{"mean", "ci95", "n"}`` of per-test-example values (bootstrap over them)."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()) if arr.size else math.nan,
            "ci95": list(bootstrap_ci(arr, n_resamples=n_resamples, seed=ci_seed)), "n": int(arr.size)}


# ---------------------------------------------------------------------------------------
# leave-top-k-out and tail-patch


@dataclass
class RemovalPlan:
    """The retrains leave-top-k-out needs: which rows each (method, test, k) removes and the
    random k-sets, with every distinct removal listed once (``unique``)."""

    tests: list[int]
    ks: list[int]
    top: dict[str, dict[int, list[list[int]]]]  # method -> k -> per sampled test: removed rows
    random: dict[int, list[list[int]]]  # k -> random removed sets
    unique: list[tuple[int, ...]] = field(default_factory=list)


def plan_removals(scores: Mapping[str, Any], tests: Sequence[int], ks: Sequence[int], n_random: int,
                  seed: int) -> RemovalPlan:
    """Top-k and random removal sets for leave-top-k-out (random sets from ``seed + k``)."""
    arrays = {m: _scores(s) for m, s in scores.items()}
    n_train = next(iter(arrays.values())).shape[1]
    top = {m: {k: [sorted(top_k(a[j], k)) for j in tests] for k in ks} for m, a in arrays.items()}
    rand = {k: random_sets(n_train, k, n_random, seed + k) for k in ks}
    seen: dict[tuple[int, ...], None] = {}
    for k in ks:
        for rows in rand[k]:
            seen.setdefault(tuple(rows))
        for m in arrays:
            for rows in top[m][k]:
                seen.setdefault(tuple(rows))
    return RemovalPlan(list(tests), list(ks), top, rand, list(seen))


def leave_top_k_out(plan: RemovalPlan, removal_losses: Mapping[tuple[int, ...], np.ndarray],
                    base_losses: np.ndarray, *, n_resamples: int = DEFAULT_RESAMPLES,
                    ci_seed: int = DEFAULT_CI_SEED) -> dict[str, Any]:
    """Leave-top-k-out summaries from retrained losses.

    ``removal_losses[rows]``: ``[n_test]`` losses after retraining without ``rows`` (every
    entry of ``plan.unique``); ``base_losses``: ``[n_test]`` losses of the full training set.
    Returns ``{"tests", "k": {k: {"random": {...}, "methods": {m: {...}}}}}`` where each
    method entry holds ``removed`` (rows per sampled test), ``delta`` (``L_j(without) -
    L_j(all)`` per sampled test), ``delta_mean``/``delta_ci95``, ``vs_random`` (``delta_j -
    random delta_j``) and ``vs_random_mean``/``vs_random_ci95``."""
    base = np.asarray(base_losses, dtype=np.float64)
    tests = plan.tests
    out: dict[str, Any] = {"tests": tests, "k": {}}
    for k in plan.ks:
        rand = np.array([[removal_losses[tuple(r)][j] - base[j] for j in tests] for r in plan.random[k]])
        rand_delta = rand.mean(axis=0)
        entry: dict[str, Any] = {"random": {"removed": plan.random[k], "delta": rand_delta.tolist(),
                                            **_prefixed("delta", mean_interval(rand_delta, n_resamples=n_resamples,
                                                                               ci_seed=ci_seed))},
                                 "methods": {}}
        for m, per_k in plan.top.items():
            delta = np.array([removal_losses[tuple(rows)][j] - base[j] for rows, j in zip(per_k[k], tests)])
            entry["methods"][m] = {
                "removed": per_k[k], "delta": delta.tolist(),
                **_prefixed("delta", mean_interval(delta, n_resamples=n_resamples, ci_seed=ci_seed)),
                "vs_random": (delta - rand_delta).tolist(),
                **_prefixed("vs_random", mean_interval(delta - rand_delta, n_resamples=n_resamples,
                                                       ci_seed=ci_seed)),
            }
        out["k"][str(k)] = entry
    return out


def tail_patch(step_losses: Callable[[Sequence[int], Sequence[int]], np.ndarray], before: np.ndarray,
               scores: Mapping[str, Any], tests: Sequence[int], ks: Sequence[int], n_random: int, seed: int, *,
               n_resamples: int = DEFAULT_RESAMPLES, ci_seed: int = DEFAULT_CI_SEED) -> dict[str, Any]:
    """Tail-patch summaries (module docstring).

    ``step_losses(rows, test_indices)``: losses of ``test_indices`` after one optimiser step
    on ``rows`` from the final model (e.g. :meth:`LoraRetrainer.tail_patch`); ``before``:
    ``[len(tests)]`` losses of the sampled ``tests`` before the step, measured the same way.
    Every distinct row set is stepped once and evaluated on the tests that need it. Returns
    the same layout as :func:`leave_top_k_out`, with ``delta = L_j(after) - L_j(before)`` and
    ``vs_random = random delta_j - delta_j`` (positive = the method's examples lower the loss
    more than random ones); random sets from ``seed + k``."""
    arrays = {m: _scores(s) for m, s in scores.items()}
    n_train = next(iter(arrays.values())).shape[1]
    tests = list(tests)
    before = np.asarray(before, dtype=np.float64)
    needs: dict[tuple[int, ...], set[int]] = {}
    top = {m: {k: [sorted(top_k(a[j], k)) for j in tests] for k in ks} for m, a in arrays.items()}
    rand = {k: random_sets(n_train, k, n_random, seed + k) for k in ks}
    for k in ks:
        for rows in rand[k]:
            needs.setdefault(tuple(rows), set()).update(range(len(tests)))
        for m in arrays:
            for t, rows in enumerate(top[m][k]):
                needs.setdefault(tuple(rows), set()).add(t)
    after: dict[tuple[int, ...], dict[int, float]] = {}
    for rows, positions in needs.items():
        pos = sorted(positions)
        values = step_losses(list(rows), [tests[t] for t in pos])
        after[rows] = {t: float(v) for t, v in zip(pos, values)}
    out: dict[str, Any] = {"tests": tests, "before": before.tolist(), "steps": len(needs), "k": {}}
    for k in ks:
        rand_delta = np.array([[after[tuple(r)][t] - before[t] for t in range(len(tests))] for r in rand[k]]).mean(0)
        entry: dict[str, Any] = {"random": {"rows": rand[k], "delta": rand_delta.tolist(),
                                            **_prefixed("delta", mean_interval(rand_delta, n_resamples=n_resamples,
                                                                               ci_seed=ci_seed))},
                                 "methods": {}}
        for m in arrays:
            delta = np.array([after[tuple(rows)][t] - before[t] for t, rows in enumerate(top[m][k])])
            entry["methods"][m] = {
                "rows": top[m][k], "delta": delta.tolist(),
                **_prefixed("delta", mean_interval(delta, n_resamples=n_resamples, ci_seed=ci_seed)),
                "vs_random": (rand_delta - delta).tolist(),
                **_prefixed("vs_random", mean_interval(rand_delta - delta, n_resamples=n_resamples,
                                                       ci_seed=ci_seed)),
            }
        out["k"][str(k)] = entry
    return out


def _prefixed(prefix: str, summary: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}_mean": summary["mean"], f"{prefix}_ci95": summary["ci95"]}
