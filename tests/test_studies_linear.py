"""The study framework and the two linear studies (``approximation``, ``model-size``).

Numbers are checked against independent computations: the CG influence path against the
inverse of an autograd Hessian and against the explicit-Hessian Cholesky path, influence
against leave-one-out retraining, the reduced EK-FAC against the registered EK-FAC on full
factors. MNIST-dependent tests skip (with the reason shown) when ``LLM_INFLUENCE_DATA`` is
unset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_influence.errors import UserError
from llm_influence.linear import SoftmaxRegression, with_bias
from llm_influence.methods import make_method
from llm_influence.studies import (available_studies, new_figure, register_study, run_study, save_figure,
                                   unregister_study)
from llm_influence.studies import StudyResult
from llm_influence.studies._linear import (cg_solve, explicit_solve, fit_newton_cg, input_span_features,
                                           normalised_distance, random_relu_features)

F64 = torch.float64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"




def problem(n: int = 40, f: int = 6, c: int = 3, m: int = 8, seed: int = 0):
    """A separable-ish synthetic softmax problem: ``(Xtr, ytr, Xte, yte)`` with bias columns."""
    gen = torch.Generator().manual_seed(seed)
    X = with_bias(torch.randn(n + m, f, generator=gen, dtype=F64))
    W_true = 1.5 * torch.randn(c, f + 1, generator=gen, dtype=F64)
    y = torch.multinomial(torch.softmax(X @ W_true.T, dim=1), 1, generator=gen).squeeze(1)
    return X[:n], y[:n], X[n:], y[n:]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width > 100 and height > 100


# ---------------------------------------------------------------------------------------
# linear-model machinery (no MNIST)


def test_newton_cg_reaches_the_optimum_of_the_weighted_objective():
    Xtr, ytr, _, _ = problem(seed=1)
    w = torch.linspace(0.0, 2.0, Xtr.shape[0], dtype=F64)
    model = fit_newton_cg(SoftmaxRegression(Xtr.shape[1], 3, l2=0.05), Xtr, ytr, weights=w)
    assert model.fit_info["converged"] and model.fit_info["grad_max_abs"] <= 1e-10
    reference = SoftmaxRegression(Xtr.shape[1], 3, l2=0.05).fit(Xtr, ytr, weights=w, method="newton", tol=1e-12)
    torch.testing.assert_close(model.weight, reference.weight, rtol=0, atol=1e-9)


@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_cg_influence_equals_explicit_inverse_and_tracks_leave_one_out(damping):
    Xtr, ytr, Xte, yte = problem()
    n, mu = Xtr.shape[0], 0.05
    model = fit_newton_cg(SoftmaxRegression(Xtr.shape[1], 3, l2=mu), Xtr, ytr)
    train_f = model.features(Xtr, ytr, hvp=True)
    test_f = model.features(Xte, yte, kfac=False)
    V = test_f.flat("weight")

    # independent: the autograd Hessian of the regularised objective, inverted explicitly
    def objective(w):
        W = w.reshape(model.weight.shape)
        return torch.nn.functional.cross_entropy(Xtr @ W.T, ytr) + 0.5 * mu * W.square().sum()

    H = torch.autograd.functional.hessian(objective, model.weight.reshape(-1))
    x_inv = V @ torch.linalg.inv(H + damping * torch.eye(H.shape[0], dtype=F64))  # H symmetric
    x_cg, diag = cg_solve(train_f, test_f, mu, damping, tol=1e-10)
    x_chol = explicit_solve(model, Xtr, ytr, V, damping)
    rel = lambda a, b: float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))  # noqa: E731
    assert rel(x_cg, x_inv) < 1e-8
    assert rel(x_chol, x_inv) < 1e-8
    assert diag["residual_max"] <= 1e-10 and diag["not_converged"] == 0

    if damping == 0.0:  # the undamped influence function predicts leave-one-out retraining
        scores = x_cg @ train_f.flat("weight").T  # [m, n], higher = helped more
        base = model.per_example_losses(Xte, yte)
        actual = torch.zeros_like(scores)
        for i in range(n):
            w = torch.ones(n, dtype=F64)
            w[i] = 0.0
            actual[:, i] = fit_newton_cg(model.copy(), Xtr, ytr, weights=w).per_example_losses(Xte, yte) - base
        pearson = np.corrcoef((scores / n).flatten().numpy(), actual.flatten().numpy())[0, 1]
        assert pearson >= 0.95, pearson


def test_ekfac_in_the_span_of_the_training_inputs_equals_full_ekfac():
    Xtr, ytr, Xte, yte = problem(n=8, f=25, c=4, m=5, seed=3)  # F = 26 > n = 8: a real reduction
    model = fit_newton_cg(SoftmaxRegression(Xtr.shape[1], 4, l2=0.1), Xtr, ytr)
    train_f, test_f = model.features(Xtr, ytr), model.features(Xte, yte, kfac=False)
    full = make_method("ekfac").fit(train_f)
    expected = full.score(test_f)
    lam = full.damping_["weight"]
    tr, te = input_span_features(model, Xtr, ytr, Xte, yte)
    assert tr.grads["weight"].shape == (8, 4, 8)
    got = make_method("ekfac", damping=lam).fit(tr).score(te)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


def test_normalised_distance_and_random_features():
    a = torch.tensor([[1.0, 2.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    d = normalised_distance(torch.stack([3 * a[0], -a[1], a[2]]), a)
    torch.testing.assert_close(d, torch.tensor([0.0, 2.0, 0.0], dtype=F64))
    d = normalised_distance(torch.tensor([[0.0, 1.0]], dtype=F64), torch.tensor([[1.0, 0.0]], dtype=F64))
    assert math.isclose(float(d), math.sqrt(2))

    X = torch.rand(50, 30, generator=torch.Generator().manual_seed(0), dtype=F64)
    phi = random_relu_features(X, 4000, seed=7)
    assert phi.shape == (50, 4000) and bool((phi >= 0).all())
    torch.testing.assert_close(phi, random_relu_features(X, 4000, seed=7), rtol=0, atol=0)
    ratio = phi.norm(dim=1) / X.norm(dim=1)  # E||phi||^2 = ||x||^2
    assert float((ratio - 1).abs().max()) < 0.1


# ---------------------------------------------------------------------------------------
# the framework (no MNIST)


def test_registry_run_study_writes_json_markdown_and_png(tmp_path):
    calls = {}

    @register_study("dummy-test-study", "a study for this test")
    def dummy(profile, out_dir, data_dir, options):
        from llm_influence.studies.base import resolve_options
        opts = resolve_options("dummy-test-study", options, {"k": 3, "flag": False, "sizes": (1, 2)})
        calls.update(opts)
        fig, ax = new_figure()
        ax.plot([0, 1], [0, 1])
        png = save_figure(fig, out_dir / "dummy.png")
        return StudyResult("dummy-test-study", {"k": opts["k"], "x": float("nan"), "t": torch.tensor([1.5])},
                           [png], "## Dummy\n\n![dummy](dummy.png)\n")

    try:
        assert "dummy-test-study" in available_studies()
        out = tmp_path / "out"
        result = run_study("dummy-test-study", "smoke", out, k="5", flag="yes", sizes="4, 8")
        assert calls == {"k": 5, "flag": True, "sizes": (4, 8)}
        record = json.loads((out / "dummy-test-study.json").read_text())
        assert set(record) >= {"study", "profile", "options", "wall_seconds", "environment", "figures", "data"}
        assert record["data"] == {"k": 5, "x": None, "t": [1.5]} and record["figures"] == ["dummy.png"]
        assert (out / "dummy-test-study.md").read_text().startswith("## Dummy")
        assert result.json_path == out / "dummy-test-study.json"
        assert_png(out / "dummy.png")
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

        with pytest.raises(UserError, match="unknown option"):
            run_study("dummy-test-study", "smoke", out, nope=1)
        with pytest.raises(UserError, match="not a valid int"):
            run_study("dummy-test-study", "smoke", out, k="many")
        with pytest.raises(UserError, match="unknown profile"):
            run_study("dummy-test-study", "laptop", out)
        with pytest.raises(UserError, match="unknown study"):
            run_study("no-such-study", "smoke", out)
    finally:
        unregister_study("dummy-test-study")
    assert "dummy-test-study" not in available_studies()
    assert {"approximation", "model-size"} <= set(available_studies())


def test_run_study_rejects_markdown_without_its_figure(tmp_path):
    @register_study("dummy-bad-study")
    def bad(profile, out_dir, data_dir, options):
        fig, _ = new_figure()
        return StudyResult("dummy-bad-study", {}, [save_figure(fig, out_dir / "bad.png")], "## no figure here")

    try:
        with pytest.raises(RuntimeError, match="does not reference"):
            run_study("dummy-bad-study", "smoke", tmp_path)
        assert not (tmp_path / "dummy-bad-study.json").exists()
    finally:
        unregister_study("dummy-bad-study")


# ---------------------------------------------------------------------------------------
# the MNIST studies, smoke profile


@pytest.fixture(scope="module")
def approximation_smoke(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("approximation")
    return out, run_study("approximation", "smoke", out, data_dir=data_dir)


def test_approximation_smoke_outputs(approximation_smoke):
    out, result = approximation_smoke
    record = json.loads((out / "approximation.json").read_text())
    data = record["data"]
    assert record["study"] == "approximation" and record["profile"] == "smoke"
    keys = [m["key"] for m in data["methods"]]
    assert keys == ["datainf", "lissa-1", "lissa-5", "lissa-10", "gradsim", "ekfac", "exact-gauss-newton"]
    assert len(data["settings"]) == 3
    assert [s["setting"]["n_train"] for s in data["settings"]] == [10, 10, 20]
    n_test = data["options"]["n_test"]
    for s in data["settings"]:
        assert s["train"]["converged"] and s["damping"] > 0
        assert s["exact"]["cg_converged"] == n_test and s["exact"]["cg_residual_max"] <= 1e-10
        for key in keys:
            m = s["methods"][key]
            assert m["seconds"] >= 0
            for ref in ("exact", "exact-undamped", "exact-gauss-newton"):
                err = m["errors"][ref]
                assert len(err["per_test"]) == n_test
                assert all(0.0 <= e <= 2.0 for e in err["per_test"])
                assert math.isclose(err["mean"], sum(err["per_test"]) / n_test, rel_tol=1e-12)
    # where both fit, the explicit-Hessian and CG exact influence agree
    first = data["settings"][0]["exact"]
    assert first["solver"] == "explicit" and first["explicit_vs_cg"] < 1e-8
    assert data["settings"][1]["exact"]["solver"] == "cg"
    assert data["settings"][0]["methods"]["exact-gauss-newton"]["errors"]["exact-gauss-newton"]["mean"] < 1e-8
    # the damped reference is the undamped influence function to within the tiny damping
    assert all(s["exact"]["undamped_vs_damped"] < 1e-3 for s in data["settings"])
    assert_png(out / "approximation.png")
    md = (out / "approximation.md").read_text()
    assert "](approximation.png)" in md and "normalised to unit length" in md and "0.199" in md
    assert result.figures == [out / "approximation.png"]


def test_lissa_error_falls_with_iterations(approximation_smoke):
    _, result = approximation_smoke
    for s in result.data["settings"]:
        for ref in ("exact", "exact-gauss-newton"):
            errs = [s["methods"][f"lissa-{k}"]["errors"][ref]["mean"] for k in (1, 5, 10)]
            assert errs[0] > errs[1] > errs[2], (s["setting"]["key"], ref, errs)


def test_model_size_smoke_outputs(tmp_path, data_dir):
    result = run_study("model-size", "smoke", tmp_path, data_dir=data_dir, epochs=3)
    record = json.loads((tmp_path / "model-size.json").read_text())
    data = record["data"]
    assert [w["width"] for w in data["widths"]] == list(data["options"]["widths"]) == [4, 8, 16, 32]
    for w in data["widths"]:
        assert len(w["param_change"]) == len(w["test_accuracy"]) == len(w["test_loss"]) == 4  # epochs 0..3
        assert w["param_change"][0] == 0.0 and max(w["param_change_normalised"]) == 1.0
        assert all(0.0 <= a <= 1.0 for a in w["test_accuracy"])
        assert w["test_accuracy"][-1] > w["test_accuracy"][0]  # it learns from the zero-output start
        assert w["pearson"] is None or -1.0 <= w["pearson"] <= 1.0
        h, f = w["width"], data["n_inputs"]
        assert w["n_params"] == h * f + 10 * h + 10
    assert_png(tmp_path / "model-size.png")
    md = (tmp_path / "model-size.md").read_text()
    assert "](model-size.png)" in md and "Pearson" in md
    assert result.figures == [tmp_path / "model-size.png"]
