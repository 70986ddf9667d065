"""The convex check of the counterfactual metrics: on the MNIST logistic regression of
``linear/``, exact influence has an LDS above 0.9 and shuffled scores an LDS near 0, with
the same LDS code and the same retrainer interface as the LLM harness; that retrainer equals
``SoftmaxRegression.leave_one_out`` on single-example masks; masks split across ranks give
the one-process result.

Needs the shared data directory in ``$LLM_INFLUENCE_DATA`` (skipped otherwise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_influence.data.mnist import load_mnist, mnist_split
from llm_influence.distributed import World
from llm_influence.evaluation.counterfactual import lds, random_masks, without
from llm_influence.linear import SoftmaxRegression, with_bias
from llm_influence.training.retrain import ConvexRetrainer, retrain_masks, retrain_owned


N_TRAIN, N_TEST, L2 = 200, 40, 1e-2


@pytest.fixture(scope="module")
def convex(data_dir):
    """10-class softmax regression on 4x4-pooled MNIST (16 pixels + intercept, 170
    parameters), L2 1e-2, at its optimum on 200 images; 40 test images."""
    x, y = load_mnist(data_dir, pool=7)
    (xtr, ytr), (xte, yte) = mnist_split(x, y, [N_TRAIN, N_TEST], seed=1)
    Xtr, Xte = with_bias(xtr), with_bias(xte)
    model = SoftmaxRegression(Xtr.shape[1], 10, l2=L2).fit(Xtr, ytr, tol=1e-10)
    assert model.fit_info["converged"]
    return model, Xtr, ytr, Xte, yte


def exact_influence(model, Xtr, ytr, Xte, yte) -> np.ndarray:
    """``[n_test, n_train]``: ``score[j, i] = grad l_j^T H^{-1} grad l_i`` with ``H`` the exact
    Hessian of the regularised objective (explicit solve). Removing ``i`` (weight 0, 1/n kept)
    changes ``l_j`` by about ``score[j, i] / n``, so ``-sum_{i in S} score`` ranks ``l_j(W_S)``."""
    H = model.hessian(Xtr, ytr)
    G = model.per_example_grads(Xtr, ytr).reshape(Xtr.shape[0], -1)
    V = model.per_example_grads(Xte, yte).reshape(Xte.shape[0], -1)
    return (V @ torch.linalg.solve(H, G.T)).numpy()


def test_exact_influence_has_high_lds_and_shuffled_scores_none(convex):
    model, Xtr, ytr, Xte, yte = convex
    retrainer = ConvexRetrainer(model, Xtr, ytr, Xte, yte, tol=1e-10)
    masks = random_masks(N_TRAIN, 32, 0.5, seed=0)
    losses = retrain_masks(retrainer, masks)
    scores = exact_influence(model, Xtr, ytr, Xte, yte)
    exact = lds(scores, masks, losses)
    assert exact.lds > 0.9 and exact.ci95[0] > 0.9 and exact.n_nan == 0, exact
    rng = np.random.default_rng(0)
    shuffled = lds(np.stack([rng.permutation(row) for row in scores]), masks, losses)
    assert abs(shuffled.lds) < 0.1, shuffled
    # scores with the wrong sign are anti-correlated: the minus of -sum score is the right one
    assert lds(-scores, masks, losses).lds < -0.9


def test_convex_retrain_equals_leave_one_out(convex):
    model, Xtr, ytr, Xte, yte = convex
    retrainer = ConvexRetrainer(model, Xtr, ytr, Xte, yte, tol=1e-10)
    for i in (0, 57, N_TRAIN - 1):
        loo = model.leave_one_out(Xtr, ytr, i, tol=1e-10)
        mine = retrainer.retrained_model(without(N_TRAIN, [i]))
        assert torch.equal(mine.weight, loo.weight)
        np.testing.assert_array_equal(retrainer.retrain(without(N_TRAIN, [i])),
                                      loo.per_example_losses(Xte, yte).numpy())


def test_masks_split_over_ranks_equal_one_process(convex):
    model, Xtr, ytr, Xte, yte = convex
    retrainer = ConvexRetrainer(model, Xtr, ytr, Xte, yte, tol=1e-10)
    masks = random_masks(N_TRAIN, 5, 0.5, seed=1)
    whole = retrain_masks(retrainer, masks)
    parts = [retrain_owned(retrainer, masks, None, World(rank=r, size=2)) for r in range(2)]
    assert [np.flatnonzero(p.any(axis=1)).tolist() for p in parts] == [[0, 1, 2], [3, 4]]  # contiguous ranges
    np.testing.assert_array_equal(parts[0] + parts[1], whole)
