"""The method registry, argument checking, and invariance of scores to batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_influence.errors import UserError
from llm_influence.features.types import Features, KFACFactors
from llm_influence.methods import (SCORE_CONVENTION, Method, available_methods, make_method, method_parameters,
                                   register)

F64 = torch.float64
ALL = ["datainf", "ekfac", "exact", "exact-full", "gradsim", "gradsim-cos", "lissa", "projected", "repsim", "tracin"]
GLOBAL_FIT = ["datainf", "lissa", "exact", "exact-full", "ekfac"]
SHAPES = {"m.layers.0.q_proj.lora_A": (2, 6), "m.layers.0.q_proj.lora_B": (6, 2), "m.layers.1.v_proj.lora_A": (2, 5)}




def features(n: int, seed: int, history: int = 0, prefix: str = "x") -> Features:
    gen = torch.Generator().manual_seed(seed)
    grads = {b: torch.randn(n, *s, generator=gen, dtype=torch.float32) for b, s in SHAPES.items()}
    kfac = {}
    for b, (r, c) in SHAPES.items():
        a, s = torch.randn(20, c, generator=gen), torch.randn(20, r, generator=gen)
        kfac[b] = KFACFactors(input_cov=a.T @ a / 20, grad_cov=s.T @ s / 20, n_tokens=20)
    f = Features(ids=[f"{prefix}{i}" for i in range(n)], grads=grads,
                 reps=torch.randn(n, 7, generator=gen), kfac=kfac)
    f.history = [(lr, features(n, seed + 100 * (k + 1), prefix=prefix)) for k, lr in enumerate([0.1, 0.03][:history])]
    return f


def test_every_method_is_registered_and_constructible():
    assert available_methods() == ALL
    for name in ALL:
        m = make_method(name)
        assert isinstance(m, Method) and m.name == name
        assert set(m.arguments()) == set(method_parameters(name))
        assert m.needs <= {"grads", "reps", "kfac", "history", "hvp"}
    assert make_method("repsim").needs == {"reps"}
    assert make_method("ekfac").needs == {"grads", "kfac"}
    assert make_method("tracin").needs == {"grads", "history"}
    assert make_method("lissa", hessian="true").needs == {"grads", "hvp"}
    assert "higher" in SCORE_CONVENTION


def test_unknown_method_argument_or_bad_value_is_a_user_error():
    with pytest.raises(UserError, match="unknown method 'nope'"):
        make_method("nope")
    with pytest.raises(UserError, match="unknown argument"):
        make_method("lissa", iteration=3)
    with pytest.raises(UserError, match="unknown argument"):
        make_method("gradsim", damping=0.1)
    bad = [("lissa", {"iterations": 0}), ("lissa", {"scale": -1.0}), ("lissa", {"scale": "big"}),
           ("lissa", {"hessian": "fisher"}), ("exact", {"damping": 0.0}), ("datainf", {"damping_ratio": -0.1}),
           ("exact-full", {"tol": 0}), ("exact-full", {"max_iterations": 1.5}), ("ekfac", {"damping": float("nan")})]
    for name, kwargs in bad:
        with pytest.raises(UserError, match=name):
            make_method(name, **kwargs)
    assert make_method("lissa", iterations="5", scale="12.5").arguments()["iterations"] == 5


def test_registering_a_second_method_under_a_taken_name_fails():
    class Fake(Method):
        name = "gradsim"

        def fit(self, train):
            return self

        def score(self, test):
            return torch.zeros(0)

    with pytest.raises(ValueError, match="already registered"):
        register(Fake)


def test_score_before_fit_and_mismatched_blocks_are_errors():
    with pytest.raises(RuntimeError, match="fit"):
        make_method("exact").score(features(2, 1))
    train = features(4, 1)
    other = Features(ids=["a"], grads={"elsewhere": torch.zeros(1, 2, 2)})
    for name in ["gradsim", "exact", "datainf", "exact-full"]:
        with pytest.raises(UserError, match="blocks"):
            make_method(name).fit(train).score(other)
    reshaped = Features(ids=["a"], grads={b: torch.zeros(1, s[1], s[0]) for b, s in SHAPES.items()})
    with pytest.raises(UserError, match="block"):
        make_method("exact").fit(train).score(reshaped)


@pytest.mark.parametrize("name", ALL)
def test_scores_are_float64_and_shaped_test_by_train(name):
    train, test = features(6, 1, history=2), features(3, 2, history=2, prefix="t")
    s = make_method(name).fit(train).score(test)
    assert s.shape == (3, 6) and s.dtype == F64 and torch.isfinite(s).all()


@pytest.mark.parametrize("name", GLOBAL_FIT)
def test_global_methods_give_the_same_scores_for_any_test_batching(name):
    train, test = features(9, 3), features(7, 4, prefix="t")
    m = make_method(name).fit(train)
    whole = m.score(test)
    batches = [[0, 1, 2], [3], [4, 5, 6]]
    parts = torch.cat([m.score(test.select(b)) for b in batches])
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    # a second, identical method sees identical scores (no hidden state across calls)
    torch.testing.assert_close(make_method(name).fit(train).score(test), whole, rtol=0, atol=0)


@pytest.mark.parametrize("name", GLOBAL_FIT)
def test_global_methods_are_equivariant_to_training_order(name):
    train, test = features(9, 5), features(4, 6, prefix="t")
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    a = make_method(name).fit(train).score(test)
    b = make_method(name).fit(train.select(perm)).score(test)
    torch.testing.assert_close(b, a[:, perm], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["gradsim", "gradsim-cos", "repsim", "tracin"])
def test_local_methods_give_the_same_columns_for_any_training_chunking(name):
    train, test = features(10, 7, history=2), features(3, 8, history=2, prefix="t")
    whole = make_method(name).fit(train).score(test)
    chunks = [[0, 1, 2, 3], [4], [5, 6, 7, 8, 9]]
    parts = torch.cat([make_method(name).fit(train.select(c)).score(test) for c in chunks], dim=1)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    assert np.allclose(make_method(name).fit(train).score(test.select([2, 0])).numpy(), whole[[2, 0]].numpy(),
                       rtol=1e-12, atol=1e-12)
