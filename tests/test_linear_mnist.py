"""MNIST loading, and influence on an MNIST logistic regression against ground truth.

Needs the shared data directory in ``$LLM_INFLUENCE_DATA`` (skipped, with the reason
shown, when it is not set).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_influence.data.mnist import load_mnist, mnist_split
from llm_influence.errors import UserError
from llm_influence.features.types import Features
from llm_influence.linear import BLOCK, SoftmaxRegression, with_bias
from llm_influence.methods import make_method




def _data_dir() -> Path:
    value = os.environ.get("LLM_INFLUENCE_DATA")
    if not value or not (Path(value) / "mnist").is_dir():
        pytest.skip("set LLM_INFLUENCE_DATA to the shared data directory (with mnist/) to run the MNIST tests")
    return Path(value)


@pytest.fixture(scope="module")
def mnist_pool7():
    """4x4-pooled MNIST: 16 pixel features."""
    return load_mnist(_data_dir(), pool=7)


def test_load_mnist_shapes_ranges_and_pooling():
    x, y = load_mnist(_data_dir())
    assert x.shape == (10000, 784) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    assert y[:5].tolist() == [7, 2, 1, 0, 4]  # the canonical first test labels
    x4, y4 = load_mnist(_data_dir(), pool=4)
    assert x4.shape == (10000, 49) and torch.equal(y4, y)
    img = x[3].reshape(28, 28)
    torch.testing.assert_close(x4[3].reshape(7, 7)[2, 5], img[8:12, 20:24].mean())


def test_mnist_split_is_deterministic_and_disjoint(mnist_pool7):
    x, y = mnist_pool7
    x = torch.cat([x, torch.arange(len(x), dtype=x.dtype)[:, None]], 1)  # tag rows to check overlap
    (a, ya), (b, yb) = mnist_split(x, y, [100, 50], seed=3)
    (a2, _), (b2, _) = mnist_split(x, y, [100, 50], seed=3)
    assert torch.equal(a, a2) and torch.equal(b, b2) and a.shape == (100, 17) and yb.shape == (50,)
    assert not set(a[:, -1].tolist()) & set(b[:, -1].tolist())
    assert not torch.equal(mnist_split(x, y, [100], seed=4)[0][0], a)
    with pytest.raises(UserError, match="do not fit"):
        mnist_split(x, y, [9000, 2000])


def _write_gz(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(payload)


def test_bad_mnist_files_are_user_errors(tmp_path):
    images = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(UserError, match="not found"):
        load_mnist(tmp_path)
    _write_gz(images, struct.pack(">iiii", 2049, 2, 28, 28) + bytes(2 * 784))
    _write_gz(labels, struct.pack(">ii", 2049, 2) + bytes([1, 2]))
    with pytest.raises(UserError, match="magic number 2049"):
        load_mnist(tmp_path)
    _write_gz(images, struct.pack(">iiii", 2051, 3, 28, 28) + bytes(2 * 784))
    with pytest.raises(UserError, match="header says 3 images"):
        load_mnist(tmp_path)
    _write_gz(images, struct.pack(">iiii", 2051, 2, 28, 28) + bytes(2 * 784))
    _write_gz(labels, struct.pack(">ii", 2049, 2) + bytes([1, 12]))
    with pytest.raises(UserError, match="label 12"):
        load_mnist(tmp_path)
    _write_gz(labels, struct.pack(">ii", 2049, 3) + bytes([1, 2, 3]))
    with pytest.raises(UserError, match="2 images but 3 labels"):
        load_mnist(tmp_path)
    labels.write_bytes(b"not gzip")
    with pytest.raises(UserError, match="gzip"):
        load_mnist(tmp_path)
    with pytest.raises(UserError, match="pool"):
        load_mnist(tmp_path, pool=3)
    with pytest.raises(UserError, match="does not exist"):
        load_mnist(tmp_path / "missing")


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


def test_ekfac_tracks_exact_influence_on_mnist_logistic_regression(mnist_pool7):
    """EK-FAC against exact influence with the same damped Gauss-Newton matrix.

    Model: 10-class softmax regression on 4x4-pooled MNIST (16 pixels + intercept, 170
    parameters), L2 1e-3, trained to convergence on 300 images. Reference: ``exact``,
    i.e. ``(G + lambda I)^{-1}`` with ``G = (1/n) sum_i g_i g_i^T`` the empirical Fisher
    (Gauss-Newton from the stored per-example gradients), which is the matrix EK-FAC's
    eigenvalue correction is fitted to; both use ``damping_ratio = 1``.

    Pearson over all 60 x 300 scores, measured when this test was written:

    ==============  =====  =======  =======
    damping_ratio   ekfac  datainf  gradsim
    ==============  =====  =======  =======
    1 (this test)   0.980  0.885    0.877
    0.1 (paper)     0.870  0.528    0.522
    ==============  =====  =======  =======

    With less damping the directions the Kronecker eigenbasis gets wrong weigh more, so
    the test holds EK-FAC to > 0.95 at ratio 1 and, at the paper's ratio, to clearly
    beating DataInf.
    """
    x, y = mnist_pool7
    (xtr, ytr), (xte, yte) = mnist_split(x, y, [300, 60], seed=0)
    Xtr, Xte = with_bias(xtr), with_bias(xte)
    model = SoftmaxRegression(Xtr.shape[1], 10, l2=1e-3).fit(Xtr, ytr)
    train, test = model.features(Xtr, ytr), model.features(Xte, yte, kfac=False)
    exact = make_method("exact", damping_ratio=1.0).fit(train).score(test)
    ekfac = make_method("ekfac", damping_ratio=1.0).fit(train)
    r_ekfac = _pearson(ekfac.score(test), exact)
    r_datainf = _pearson(make_method("datainf", damping_ratio=1.0).fit(train).score(test), exact)
    assert r_ekfac > 0.95, r_ekfac
    assert r_ekfac > r_datainf + 0.03
    assert ekfac.diagnostics["residual_mean"] < 1.0

    exact_paper = make_method("exact").fit(train).score(test)
    r_ekfac_paper = _pearson(make_method("ekfac").fit(train).score(test), exact_paper)
    r_datainf_paper = _pearson(make_method("datainf").fit(train).score(test), exact_paper)
    assert r_ekfac_paper > 0.8 and r_ekfac_paper > r_datainf_paper + 0.2


def test_exact_influence_predicts_leave_one_out_retraining(mnist_pool7):
    """Influence of the L2-regularised logistic regression tracks true leave-one-out.

    Model: 10-class softmax regression on 4x4-pooled MNIST with an intercept, 300 training
    and 100 test images. Objective ``L(W) = (1/n) sum_j l_j(W) + (mu/2) ||W||^2`` with optimum ``W*``. Removing
    example ``i`` (weight ``1 -> 0``, normalisation kept at ``1/n``) is the perturbation
    ``L + eps l_i`` with ``eps = -1/n``. The implicit-function theorem gives
    ``dW*/d eps = -H^{-1} grad l_i`` with ``H`` the Hessian of ``L`` at ``W*``, so

        W*_{-i} - W* ~= (1/n) H^{-1} g_i,
        L_test(W*_{-i}) - L_test(W*) ~= (1/n) v^T H^{-1} g_i = score_i / n,

    with ``v`` the gradient of the mean test loss. ``H`` is the Hessian of the mean data
    loss plus ``mu I``, i.e. ``exact-full`` with ``hessian="true"`` (``Features.hvp`` of the
    data loss) and ``damping = mu``. Removing a helpful example (positive score) raises the
    test loss. Scored with one pseudo test example whose gradient is ``v`` (scores are linear
    in the test gradient).
    """
    x, y = mnist_pool7
    (xtr, ytr), (xte, yte) = mnist_split(x, y, [300, 100], seed=1)
    Xtr, Xte = with_bias(xtr), with_bias(xte)  # 17 features, 170 parameters
    mu = 1e-3
    model = SoftmaxRegression(Xtr.shape[1], 10, l2=mu).fit(Xtr, ytr, tol=1e-12)
    assert model.fit_info["converged"]
    train = model.features(Xtr, ytr, hvp=True)
    v = model.per_example_grads(Xte, yte).mean(dim=0, keepdim=True)
    method = make_method("exact-full", hessian="true", damping=mu, tol=1e-12).fit(train)
    predicted = method.score(Features(ids=["mean-test-loss"], grads={BLOCK: v}))[0] / train.n
    assert method.diagnostics["residual_max"] < 1e-10

    base = float(model.per_example_losses(Xte, yte).mean())
    order = torch.argsort(predicted.abs(), descending=True)
    rest = order[20:][torch.randperm(len(order) - 20, generator=torch.Generator().manual_seed(2))[:20]]
    removed = torch.cat([order[:20], rest]).tolist()  # the 20 most influential + 20 at random
    actual = []
    for i in removed:
        loo = model.leave_one_out(Xtr, ytr, i, tol=1e-12)
        assert loo.fit_info["converged"]
        actual.append(float(loo.per_example_losses(Xte, yte).mean()) - base)
    actual, pred = np.array(actual), predicted[removed].numpy()
    assert _pearson(pred, actual) >= 0.95
    assert _pearson(pred[20:], actual[20:]) >= 0.95  # also among ordinary points
    slope = float(pred @ actual / (pred @ pred))  # sign and scale, not just correlation
    assert 0.8 < slope < 1.25, slope
