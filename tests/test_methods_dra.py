"""DRA (arXiv 2502.11411) against explicit numpy formulas.

* the whitening equals ``diag(lambda)^{-1/2} V^T (r - mu)`` from ``numpy.linalg.eigh`` of the
  training covariance, and whitens the training set (identity covariance), in both the
  ``n <= d`` (SVD) and ``n > d`` (covariance) branches;
* the neighbour-agreement selection equals a loop written out with numpy, and the scores
  equal the cosine over the selected whitened coordinates;
* ``select=variance`` is truncated PCA whitening; full whitening with ``n <= d`` makes every
  pair of training examples equally similar (why the selection matters);
* the fit uses the training set only; scores are float64, do not depend on the chunking of
  the attribute engine, and the attribute stage writes them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_influence.attribute import AttributeArgs, attribute, read_scores, score_matrix
from llm_influence.features.extract import extract_features
from llm_influence.features.types import Features
from llm_influence.methods import make_method
from llm_influence.methods.dra import whitening
from llm_influence.rundir import RunDir


def _reps(n, d, seed, clusters=3, centre_seed=None):
    """Representations with a shared offset, a few cluster directions (drawn with
    ``centre_seed``, default ``seed``) and noise; returns ``(x, cluster labels)``."""
    centres = np.random.default_rng(seed if centre_seed is None else centre_seed).normal(size=(clusters, d)) * 3.0
    rng = np.random.default_rng(seed + 1000)
    labels = np.arange(n) % clusters
    x = 5.0 + centres[labels] + rng.normal(size=(n, d)) * np.linspace(0.2, 2.0, d)
    return x, labels


def _features(x):
    return Features(ids=[f"x{i}" for i in range(len(x))], reps=torch.tensor(x, dtype=torch.float64))


def np_whiten(x, tol=1e-10):
    mu = x.mean(axis=0)
    cov = (x - mu).T @ (x - mu) / len(x)
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    keep = evals > tol * evals[0]
    return mu, evecs[:, keep] / np.sqrt(evals[keep]), evals[keep]


@pytest.mark.parametrize("n,d", [(12, 30), (40, 6)])
def test_whitening_equals_numpy(n, d):
    x, _ = _reps(n, d, seed=n)
    mu, w, evals = whitening(torch.tensor(x), 1e-10)
    mu_np, w_np, evals_np = np_whiten(x)
    np.testing.assert_allclose(mu.numpy(), mu_np, rtol=1e-12)
    np.testing.assert_allclose(evals.numpy(), evals_np, rtol=1e-8, atol=1e-12)
    assert w.shape == w_np.shape == (d, min(n - 1, d))
    # eigenvectors are unique up to sign: compare per column after aligning signs
    z, z_np = (x - mu_np) @ w.numpy(), (x - mu_np) @ w_np
    signs = np.sign((z * z_np).sum(axis=0))
    np.testing.assert_allclose(z * signs, z_np, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(z.T @ z / n, np.eye(z.shape[1]), atol=1e-8)  # whitened: identity covariance
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-10)


def test_neighbor_selection_and_scores_equal_numpy():
    x, _ = _reps(30, 50, seed=1)
    t, _ = _reps(4, 50, seed=2)
    method = make_method("dra", neighbors=4).fit(_features(x))
    scores = method.score(_features(t))
    assert scores.dtype == torch.float64 and scores.shape == (4, 30)
    # written out: whiten, neighbours by cosine of the centred reps (self excluded), agreement, selection
    mu, w, _ = np_whiten(x)
    z = (x - mu) @ w
    xc = x - mu
    n = len(x)
    agreement = np.zeros(z.shape[1])
    for i in range(n):
        cos = np.array([xc[i] @ xc[k] / (np.linalg.norm(xc[i]) * np.linalg.norm(xc[k])) if k != i else -np.inf
                        for k in range(n)])
        nbrs = np.argsort(-cos, kind="stable")[:4]
        agreement += z[i] * z[nbrs].mean(axis=0)
    agreement /= n
    chosen = np.sort(np.nonzero(agreement >= 0.5 * agreement.max())[0])
    assert 2 <= len(chosen) < z.shape[1]
    assert method.selected.tolist() == chosen.tolist()  # same order of principal directions (eigh vs svd)
    zt, zs = ((t - mu) @ w)[:, chosen], z[:, chosen]
    want = (zt @ zs.T) / np.outer(np.linalg.norm(zt, axis=1), np.linalg.norm(zs, axis=1))
    np.testing.assert_allclose(scores.numpy(), want, rtol=1e-7, atol=1e-9)
    d = method.diagnostics
    assert d["rank"] == 29 and d["dims"] == len(chosen) and d["neighbors"] == 4
    assert abs(d["agreement_max"] - agreement.max()) < 1e-9
    # a fixed number of dimensions keeps the largest agreements
    top3 = make_method("dra", neighbors=4, dims=3).fit(_features(x))
    assert top3.selected.tolist() == sorted(np.argsort(-agreement, kind="stable")[:3].tolist())


def test_variance_selection_is_truncated_pca_whitening():
    x, _ = _reps(25, 40, seed=3)
    t, _ = _reps(3, 40, seed=4)
    scores = make_method("dra", select="variance", dims=5).fit(_features(x)).score(_features(t))
    mu, w, _ = np_whiten(x)
    zt, zs = (t - mu) @ w[:, :5], (x - mu) @ w[:, :5]
    want = (zt @ zs.T) / np.outer(np.linalg.norm(zt, axis=1), np.linalg.norm(zs, axis=1))
    np.testing.assert_allclose(scores.numpy(), want, rtol=1e-7, atol=1e-9)


def test_full_whitening_with_few_examples_erases_training_structure():
    x, _ = _reps(10, 30, seed=5)
    method = make_method("dra", select="variance").fit(_features(x))  # all n-1 directions
    z = method._train_z.numpy()
    gram = z @ z.T
    np.testing.assert_allclose(np.diag(gram), 9.0, rtol=1e-8)               # |z_i|^2 = n - 1
    np.testing.assert_allclose(gram[~np.eye(10, dtype=bool)], -1.0, rtol=1e-7)  # z_i . z_k = -1
    # the neighbour selection keeps fewer directions, so training examples differ again
    picked = make_method("dra").fit(_features(x))
    zp = picked._train_z.numpy()
    assert picked.diagnostics["dims"] < 9 and np.ptp((zp @ zp.T)[~np.eye(10, dtype=bool)]) > 0.5


def test_clusters_are_recovered_and_fit_uses_training_only():
    x, labels = _reps(36, 48, seed=6)
    t, t_labels = _reps(6, 48, seed=7, centre_seed=6)  # the same clusters, other noise
    method = make_method("dra").fit(_features(x))
    before = (method.mu.clone(), method.w.clone(), method.selected.clone())
    scores = method.score(_features(t)).numpy()
    assert all(torch.equal(a, b) for a, b in zip(before, (method.mu, method.w, method.selected)))  # score fits nothing
    top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    assert (labels[top] == t_labels[:, None]).all()  # every test example's top 5 are in its own cluster


def test_chunking_and_the_attribute_stage(tmp_path):
    x, _ = _reps(13, 20, seed=8)
    t, _ = _reps(3, 20, seed=9)
    whole = make_method("dra").fit(_features(x)).score(_features(t))
    torch.testing.assert_close(score_matrix(make_method("dra"), _features(x), _features(t), chunk_size=2), whole,
                               rtol=0, atol=0)
    from llm_influence.config import TrainArgs
    from llm_influence.models import LoraSpec
    from llm_influence.training import finetune
    from test_attribute import _task

    run = tmp_path / "run"
    finetune(run, _task(), model_name="tiny-llama", lora=LoraSpec(r=2, alpha=8, dropout=0.0),
             args=TrainArgs(epochs=1, batch_size=3, lr=5e-3, max_length=48, seed=1))
    attribute(run, AttributeArgs(methods=("dra", "repsim"), chunk_size=4))
    scores, meta = read_scores(run / "scores" / "epoch-1" / "dra.safetensors")
    rd = RunDir(run)
    train = extract_features(rd, "epoch-1", "train", need={"reps"})
    test = extract_features(rd, "epoch-1", "test", need={"reps"})
    torch.testing.assert_close(scores, make_method("dra").fit(train).score(test), rtol=0, atol=0)
    assert meta["diagnostics"]["rank"] == 5 and meta["arguments"]["select"] == "neighbors"


def test_bad_arguments():
    from llm_influence.errors import UserError

    for kwargs in ({"dims": 0}, {"dims": "some"}, {"select": "pca"}, {"neighbors": 0}, {"rank_tol": -1}):
        with pytest.raises(UserError):
            make_method("dra", **kwargs)
