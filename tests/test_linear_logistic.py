"""The softmax-regression utilities against autograd, and their Features wrapper."""

from __future__ import annotations

import pytest
import torch

from llm_influence.linear import BLOCK, SoftmaxRegression, with_bias
from llm_influence.methods import make_method

F64 = torch.float64




def problem(n: int = 40, f: int = 5, c: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = with_bias(torch.randn(n, f, generator=gen, dtype=F64))
    W_true = torch.randn(c, f + 1, generator=gen, dtype=F64)
    y = torch.multinomial(torch.softmax(X @ W_true.T, dim=1), 1, generator=gen).squeeze(1)
    W = 0.3 * torch.randn(c, f + 1, generator=gen, dtype=F64)
    return X, y, W


def autograd_loss(X, y, W, l2, weights=None):
    losses = torch.nn.functional.cross_entropy(X @ W.T, y, reduction="none")
    w = torch.ones_like(losses) if weights is None else weights
    return (w * losses).sum() / X.shape[0] + 0.5 * l2 * (W ** 2).sum()


def test_derivatives_match_autograd():
    X, y, W = problem()
    weights = torch.linspace(0.0, 2.0, X.shape[0], dtype=F64)
    model = SoftmaxRegression(X.shape[1], 3, l2=0.05, weight=W)

    torch.testing.assert_close(model.loss(X, y, weights), autograd_loss(X, y, W, 0.05, weights))
    Wg = W.clone().requires_grad_(True)
    autograd_loss(X, y, Wg, 0.05, weights).backward()
    torch.testing.assert_close(model.gradient(X, y, weights), Wg.grad)

    per_example = torch.stack([
        torch.autograd.grad(torch.nn.functional.cross_entropy(X[i:i + 1] @ Wg.T, y[i:i + 1]), Wg)[0]
        for i in range(X.shape[0])])
    torch.testing.assert_close(model.per_example_grads(X, y), per_example)

    H = torch.autograd.functional.hessian(lambda w: autograd_loss(X, y, w.reshape(W.shape), 0.05, weights),
                                          W.reshape(-1))
    torch.testing.assert_close(model.hessian(X, y, weights), H)
    H_data = torch.autograd.functional.hessian(lambda w: autograd_loss(X, y, w.reshape(W.shape), 0.0),
                                               W.reshape(-1))
    torch.testing.assert_close(model.hessian(X, y, include_l2=False), H_data)
    V = torch.randn(W.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(model.hvp(X, y, V), (H_data @ V.reshape(-1)).reshape(W.shape))
    torch.testing.assert_close(model.hvp(X, y, V, weights, include_l2=True), (H @ V.reshape(-1)).reshape(W.shape))


@pytest.mark.parametrize("method,tol", [("newton", 1e-12), ("lbfgs", 1e-8)])
def test_fit_reaches_the_optimum(method, tol):
    # L-BFGS's line search stalls once loss changes fall below float64 resolution (~1e-9 here)
    X, y, _ = problem(seed=1)
    model = SoftmaxRegression(X.shape[1], 3, l2=0.1).fit(X, y, method=method, tol=tol, max_iter=500)
    assert model.fit_info["converged"], model.fit_info
    assert float(model.gradient(X, y).abs().max()) <= tol
    other = SoftmaxRegression(X.shape[1], 3, l2=0.1).fit(X, y, method="newton", tol=1e-12)
    # strong convexity (l2 = 0.1): ||W - W*|| <= ||grad|| / 0.1
    torch.testing.assert_close(model.weight, other.weight, rtol=0, atol=100 * tol)


def test_leave_one_out_is_the_optimum_without_that_row():
    X, y, _ = problem(seed=2)
    model = SoftmaxRegression(X.shape[1], 3, l2=0.1).fit(X, y)
    loo = model.leave_one_out(X, y, 7)
    weights = torch.ones(X.shape[0], dtype=F64)
    weights[7] = 0
    cold = SoftmaxRegression(X.shape[1], 3, l2=0.1).fit(X, y, weights=weights)
    torch.testing.assert_close(loo.weight, cold.weight, rtol=1e-9, atol=1e-10)
    assert float(loo.gradient(X, y, weights).abs().max()) <= 1e-10
    assert not torch.equal(loo.weight, model.weight)
    torch.testing.assert_close(model.weight, SoftmaxRegression(X.shape[1], 3, l2=0.1).fit(X, y).weight)


def test_features_wrap_gradients_kfac_and_hvp():
    X, y, W = problem(seed=3)
    model = SoftmaxRegression(X.shape[1], 3, l2=0.1, weight=W)
    f = model.features(X, y, hvp=True)
    assert f.blocks == [BLOCK] and f.grads[BLOCK].shape == (X.shape[0], 3, X.shape[1])
    torch.testing.assert_close(f.grads[BLOCK], model.per_example_grads(X, y))
    E = torch.softmax(X @ W.T, dim=1) - torch.nn.functional.one_hot(y, 3).to(F64)
    torch.testing.assert_close(f.kfac[BLOCK].input_cov, X.T @ X / X.shape[0])
    torch.testing.assert_close(f.kfac[BLOCK].grad_cov, E.T @ E / X.shape[0])
    V = torch.randn(W.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(f.hvp({BLOCK: V})[BLOCK], model.hvp(X, y, V))
    # the hvp is frozen at the weights it was built with
    model.weight = model.weight + 1.0
    torch.testing.assert_close(f.hvp({BLOCK: V})[BLOCK], SoftmaxRegression(X.shape[1], 3, weight=W).hvp(X, y, V))


def test_methods_run_on_linear_features_and_true_hessian_matches_explicit_inverse():
    X, y, _ = problem(n=30, seed=4)
    model = SoftmaxRegression(X.shape[1], 3, l2=0.1).fit(X, y)
    train, test = model.features(X[:25], y[:25], hvp=True), model.features(X[25:], y[25:], kfac=False)
    H = model.hessian(X[:25], y[:25])  # includes l2 = the damping below
    want = torch.linalg.solve(H, test.flat(BLOCK).T).T @ train.flat(BLOCK).T
    got = make_method("exact-full", hessian="true", damping=0.1, tol=1e-12).fit(train).score(test)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    for name in ["gradsim", "datainf", "lissa", "exact", "ekfac"]:
        s = make_method(name).fit(train).score(test)
        assert s.shape == (5, 25) and torch.isfinite(s).all()
