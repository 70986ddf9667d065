"""The method registry, argument checking, and invariance of scores to batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_influence.errors import UserError
from llm_influence.features.optimizer import AdamMoments
from llm_influence.features.types import Features, KFACFactors
from llm_influence.methods import (SCORE_CONVENTION, Method, Scoring, available_methods, get_method_class,
                                   implementation_digest, make_method, method_fields, method_parameters, register)

F64 = torch.float64
ALL = ["datainf", "dra", "ekfac", "exact", "exact-full", "gradsim", "gradsim-cos", "less", "lissa", "lissa-paper",
       "projected", "repsim", "rept", "tracin", "trackstar"]
GLOBAL_FIT = ["datainf", "lissa", "lissa-paper", "exact", "exact-full", "ekfac"]
SHAPES = {"m.layers.0.q_proj.lora_A": (2, 6), "m.layers.0.q_proj.lora_B": (6, 2), "m.layers.1.v_proj.lora_A": (2, 5)}




def features(n: int, seed: int, history: int = 0, prefix: str = "x") -> Features:
    gen = torch.Generator().manual_seed(seed)
    grads = {b: torch.randn(n, *s, generator=gen, dtype=torch.float32) for b, s in SHAPES.items()}
    kfac = {}
    for b, (r, c) in SHAPES.items():
        a, s = torch.randn(20, c, generator=gen), torch.randn(20, r, generator=gen)
        kfac[b] = KFACFactors(input_cov=a.T @ a / 20, grad_cov=s.T @ s / 20, n_tokens=20)
    f = Features(ids=[f"{prefix}{i}" for i in range(n)], grads=grads,
                 reps=torch.randn(n, 7, generator=gen), kfac=kfac,
                 repgrads=torch.randn(n, 3, 7, generator=gen), repgrads_layer=1,
                 optimizer=AdamMoments(exp_avg={b: torch.randn(*s, generator=gen) for b, s in SHAPES.items()},
                                       exp_avg_sq={b: torch.rand(*s, generator=gen) for b, s in SHAPES.items()},
                                       step=3, betas={b: (0.9, 0.999) for b in SHAPES}, eps={b: 1e-8 for b in SHAPES},
                                       lr={b: 1e-3 for b in SHAPES}))
    f.history = [(lr, features(n, seed + 100 * (k + 1), prefix=prefix)) for k, lr in enumerate([0.1, 0.03][:history])]
    return f


def test_every_method_is_registered_and_constructible():
    assert available_methods() == ALL
    for name in ALL:
        m = make_method(name)
        assert isinstance(m, Method) and m.name == name
        assert set(m.arguments()) == set(method_parameters(name))
        assert m.required_features() <= {"grads", "reps", "kfac", "history", "hvp", "repgrads", "optimizer"}
    assert make_method("repsim").required_features() == {"reps"}
    assert make_method("ekfac").required_features() == {"grads", "kfac"}
    assert make_method("tracin").required_features() == {"grads", "history"}
    assert make_method("lissa", hessian="true").required_features() == {"grads", "hvp"}
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


@pytest.mark.parametrize("name", ["gradsim", "gradsim-cos", "repsim", "tracin", "rept"])
def test_local_methods_give_the_same_columns_for_any_training_chunking(name):
    train, test = features(10, 7, history=2), features(3, 8, history=2, prefix="t")
    whole = make_method(name).fit(train).score(test)
    chunks = [[0, 1, 2, 3], [4], [5, 6, 7, 8, 9]]
    parts = torch.cat([make_method(name).fit(train.select(c)).score(test) for c in chunks], dim=1)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    assert np.allclose(make_method(name).fit(train).score(test.select([2, 0])).numpy(), whole[[2, 0]].numpy(),
                       rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- the declarations

def test_declared_scoring_matches_the_methods():
    """SEPARABLE methods are exactly those whose columns survive chunking (tested above);
    PRECONDITIONED ones score through solve() exactly as through score()."""
    separable = {n for n in ALL if make_method(n).scoring is Scoring.SEPARABLE}
    assert separable == {"gradsim", "gradsim-cos", "repsim", "tracin", "rept", "less"}
    whole = {n for n in ALL if make_method(n).scoring is Scoring.WHOLE}
    assert whole == {"dra", "trackstar"}  # fitted and scored at once (tests/test_methods_dra.py, _trackstar.py)
    train, test = features(9, 11), features(4, 12, prefix="t")
    for name in sorted(set(ALL) - separable - whole):
        m = make_method(name)
        assert m.scoring is Scoring.PRECONDITIONED
        m.fit(train)
        xs = m.solve(test)
        via_solve = sum(x.reshape(test.n, -1) @ train.flat(b).double().T for b, x in xs.items())
        torch.testing.assert_close(via_solve, m.score(test), rtol=1e-10, atol=1e-12)


def test_every_argument_is_declared_with_help_and_recorded():
    for name in ALL:
        cls = get_method_class(name)
        fields = method_fields(name)
        assert all(f.metadata.get("help") for f in fields), name
        assert make_method(name).arguments() == {f.name: f.default for f in fields}
    m = make_method("lissa", iterations="7", scale="2.5", damping="auto")  # text from the command line
    assert (m.args.iterations, m.args.scale, m.args.damping) == (7, 2.5, None)
    assert m.arguments()["iterations"] == 7


def test_registration_checks_the_declarations(monkeypatch):
    from llm_influence.methods import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class NoSolve(Method):
        name = "no-solve"
        scoring = Scoring.PRECONDITIONED

        def fit(self, train):
            return self

        def score(self, test):
            return torch.zeros(test.n, 1)

    with pytest.raises(TypeError, match="does not implement solve"):
        register(NoSolve)

    class NotADataclass(NoSolve):
        name = "bad-args"
        scoring = Scoring.WHOLE
        Arguments = dict

    with pytest.raises(TypeError, match="Arguments must be a dataclass"):
        register(NotADataclass)


def test_attribute_knows_no_method_by_name():
    """attribute.py decides chunking, features and arguments from the declarations only: no
    registered method name appears in its code (its default method list aside)."""
    import ast
    from pathlib import Path

    from llm_influence import attribute

    tree = ast.parse(Path(attribute.__file__).read_text())
    defaults = {id(node) for a in tree.body if isinstance(a, ast.Assign)
                and any(getattr(t, "id", "") == "DEFAULT_METHODS" for t in a.targets) for node in ast.walk(a)}
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    names = set(ALL)
    found = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in names
             and id(node) not in defaults and id(node) not in docstrings]
    assert not found, found


def test_implementation_digest_follows_the_source(tmp_path, monkeypatch):
    """The digest covers the method's module and the package modules it uses; two methods
    sharing every file have one digest, and a class from another file gets its own."""
    from llm_influence.methods import base

    assert implementation_digest(get_method_class("gradsim")) == implementation_digest(get_method_class("gradsim-cos"))
    assert implementation_digest(get_method_class("exact")) != implementation_digest(get_method_class("datainf"))
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    plugin = tmp_path / "digest_plugin.py"
    source = ("from llm_influence.methods import Method, register\n"
              "@register\nclass P(Method):\n    name = 'digest-plugin'\n"
              "    def fit(self, train):\n        return self\n"
              "    def score(self, test):\n        return 1.0\n")
    from llm_influence.cli import load_plugin

    plugin.write_text(source)
    load_plugin(str(plugin))
    first = implementation_digest(get_method_class("digest-plugin"))
    plugin.write_text(source.replace("return 1.0", "return 2.0"))
    assert implementation_digest(get_method_class("digest-plugin")) != first
