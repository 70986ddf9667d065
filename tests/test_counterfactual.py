"""Counterfactual metrics (no model): Spearman and LDS against hand computations, masks,
top-k sets, and the leave-top-k-out / tail-patch bookkeeping on a retrainer whose losses
are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_influence.evaluation.counterfactual import (average_ranks, k_of, lds, leave_top_k_out, noise_ceiling,
                                                     plan_removals, predicted_losses, random_masks, spearman_columns,
                                                     subset_size, tail_patch, top_k, without)
from llm_influence.evaluation.uncertainty import bootstrap_ci
from llm_influence.training.retrain import check_mask, retrain_masks


def test_spearman_by_hand_with_ties():
    # x ranks (0-based, ties averaged) [0, 1.5, 1.5, 3]; y ranks [0, 2, 1, 3]
    # deviations [-1.5, 0, 0, 1.5] and [-1.5, .5, -.5, 1.5]: cov 4.5, var 4.5 and 5
    x = np.array([1.0, 2.0, 2.0, 4.0])
    y = np.array([10.0, 30.0, 20.0, 40.0])
    assert average_ranks(x).tolist() == [0.0, 1.5, 1.5, 3.0]
    rho = spearman_columns(x[:, None], y[:, None])[0]
    assert rho == pytest.approx(4.5 / math.sqrt(4.5 * 5.0), abs=1e-15)
    # constant columns have no correlation
    assert np.isnan(spearman_columns(np.array([[1.0], [1.0], [1.0]]), np.array([[1.0], [2.0], [3.0]]))[0])


def test_spearman_matches_scipy_on_tied_data():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(12, 6)).astype(float)
    b = rng.normal(size=(12, 6)).round(1)
    ours = spearman_columns(a, b)
    for j in range(6):
        assert ours[j] == pytest.approx(scipy_stats.spearmanr(a[:, j], b[:, j]).statistic, abs=1e-12)


def test_lds_by_hand():
    """Three training examples, three masks, three test examples (the third's loss is constant).

    pred[m, j] = -sum_{i in S_m} scores[j, i]:
      test 0: -(1+2), -(2+3), -(1+3) = -3, -5, -4 ; losses .3, .1, .2  -> same order, rho = 1
      test 1: -(3-1), -(-1+0), -(3+0) = -2, 1, -3 ; losses .5, .5, .1
              ranks [1, 2, 0] and [1.5, 1.5, 0] -> rho = 1.5 / sqrt(2 * 1.5) = sqrt(3) / 2
      test 2: constant loss -> NaN, excluded and counted
    """
    scores = np.array([[1.0, 2.0, 3.0], [3.0, -1.0, 0.0], [1.0, 1.0, 5.0]])
    masks = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    losses = np.array([[0.3, 0.5, 0.7], [0.1, 0.5, 0.7], [0.2, 0.1, 0.7]])
    np.testing.assert_array_equal(predicted_losses(scores, masks)[:, :2], [[-3, -2], [-5, 1], [-4, -3]])
    res = lds(scores, masks, losses)
    assert res.per_test[0] == pytest.approx(1.0, abs=1e-15)
    assert res.per_test[1] == pytest.approx(math.sqrt(3) / 2, abs=1e-15)
    assert np.isnan(res.per_test[2]) and res.n_nan == 1 and res.n_scored == 2 and res.n_masks == 3
    assert res.lds == pytest.approx((1 + math.sqrt(3) / 2) / 2, abs=1e-15)
    assert res.ci95 == bootstrap_ci(res.per_test[:2])
    # the sign convention: scores that say "helps" for the examples whose presence lowers the loss
    assert lds(-scores, masks, losses).per_test[0] == pytest.approx(-1.0)
    # a seed predicting itself is at the ceiling
    assert noise_ceiling(losses[:, :2], losses[:, :2]).lds == pytest.approx(1.0)


def test_random_masks_and_sizes():
    m = random_masks(40, 8, 0.5, seed=3)
    assert m.shape == (8, 40) and m.dtype == bool and (m.sum(axis=1) == 20).all()
    np.testing.assert_array_equal(random_masks(40, 3, 0.5, seed=3), m[:3])  # prefix-stable
    assert not np.array_equal(random_masks(40, 8, 0.5, seed=4), m)
    assert subset_size(7, 0.5) == 4 and subset_size(1, 0.1) == 1
    assert [k_of(f, n) for f, n in [(0.05, 40), (0.1, 40), (0.05, 100), (0.1, 100), (0.05, 8), (0.1, 8)]] == \
        [2, 4, 5, 10, 1, 1]
    assert top_k(np.array([0.1, 0.5, 0.5, -1.0, 0.9]), 3) == [4, 1, 2]  # ties toward the lower index
    assert without(5, [1, 3]).tolist() == [True, False, True, False, True]
    with pytest.raises(ValueError):
        check_mask(np.zeros(4, dtype=bool), 4)
    with pytest.raises(ValueError):
        check_mask(np.ones(3, dtype=bool), 4)


class AdditiveRetrainer:
    """A retrainer whose loss is exactly additive: loss_j(S) = c_j - sum_{i in S} true[j, i]."""

    def __init__(self, true: np.ndarray, c: np.ndarray) -> None:
        self.true, self.c, self.calls = true, c, 0

    @property
    def n_train(self) -> int:
        return self.true.shape[1]

    @property
    def n_test(self) -> int:
        return self.true.shape[0]

    def retrain(self, mask, seed=None):
        self.calls += 1
        return self.c - self.true @ check_mask(mask, self.n_train).astype(float)


def test_lds_is_one_for_the_true_additive_model_and_bookkeeping_of_leave_out():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(5, 20))
    r = AdditiveRetrainer(true, c=np.arange(5.0))
    masks = random_masks(20, 10, 0.5, seed=0)
    losses = retrain_masks(r, masks)
    assert lds(true, masks, losses).lds == pytest.approx(1.0)
    assert abs(lds(rng.normal(size=(5, 20)), masks, losses).lds) < 0.6

    scores = {"true": true, "anti": -true}
    plan = plan_removals(scores, tests=[0, 3], ks=[2], n_random=3, seed=5)
    assert plan.top["true"][2] == [sorted(top_k(true[0], 2)), sorted(top_k(true[3], 2))]
    assert len(plan.unique) == len(set(plan.unique)) <= 2 * 2 + 3
    r.calls = 0
    removal = retrain_masks(r, np.stack([without(20, rows) for rows in plan.unique]))
    assert r.calls == len(plan.unique)  # every distinct removal retrained once
    base = r.retrain(np.ones(20, dtype=bool))
    out = leave_top_k_out(plan, dict(zip(plan.unique, removal)), base)
    e = out["k"]["2"]
    # removing rows raises loss_j by exactly the sum of their true effects
    for t, j in enumerate([0, 3]):
        assert e["methods"]["true"]["delta"][t] == pytest.approx(true[j, plan.top["true"][2][t]].sum())
        rand = np.mean([true[j, rows].sum() for rows in plan.random[2]])
        assert e["random"]["delta"][t] == pytest.approx(rand)
        assert e["methods"]["true"]["vs_random"][t] == pytest.approx(e["methods"]["true"]["delta"][t] - rand)
    assert e["methods"]["true"]["vs_random_mean"] > 0 > e["methods"]["anti"]["vs_random_mean"]

    # tail-patch: a "step" on rows lowers loss_j by 0.1 * sum of their true effects
    before = r.c[[1, 2]]
    calls = []

    def step(rows, tests):
        calls.append(tuple(rows))
        return before[[{1: 0, 2: 1}[j] for j in tests]] - 0.1 * true[tests][:, rows].sum(axis=1)

    tp = tail_patch(step, before, scores, [1, 2], [2], n_random=2, seed=0)
    assert len(calls) == len(set(calls)) == tp["steps"]
    e = tp["k"]["2"]
    for t, j in enumerate([1, 2]):
        assert e["methods"]["true"]["delta"][t] == pytest.approx(-0.1 * true[j, top_k(true[j], 2)].sum())
    assert e["methods"]["true"]["vs_random_mean"] > 0 > e["methods"]["anti"]["vs_random_mean"]
