"""Every attribution method against an independent computation of its formula.

The references here use explicit loops (numpy) or explicit matrices and
``torch.linalg.solve``; none of them goes through the methods' own helpers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llm_influence.errors import UserError
from llm_influence.features.types import Features, KFACFactors
from llm_influence.methods import block_damping, global_damping, make_method

F64 = torch.float64




def random_features(n: int, shapes: dict[str, tuple[int, int]], seed: int, reps: int | None = None,
                    prefix: str = "x") -> Features:
    gen = torch.Generator().manual_seed(seed)
    grads = {b: torch.randn(n, *s, generator=gen, dtype=F64) * (1.0 + k) for k, (b, s) in enumerate(shapes.items())}
    r = None if reps is None else torch.randn(n, reps, generator=gen, dtype=F64)
    return Features(ids=[f"{prefix}{i}" for i in range(n)], grads=grads, reps=r)


SHAPES = {"layer0.lora_A": (2, 5), "layer0.lora_B": (4, 2)}


def paper_damping(train: Features, ratio: float = 0.1) -> dict[str, float]:
    """lambda_l = ratio * mean over examples of the mean squared entry, written out."""
    out = {}
    for b, g in train.grads.items():
        a = g.numpy().reshape(g.shape[0], -1)
        out[b] = ratio * float(np.mean([np.mean(row ** 2) for row in a]))
    return out


def explicit_block_solution(train: Features, test: Features, lams: dict[str, float]) -> dict[str, np.ndarray]:
    """x_tl = (G_l + lambda_l I)^{-1} v_tl with G_l built as an explicit d x d matrix."""
    out = {}
    for b in train.blocks:
        X = train.flat(b)
        G = X.T @ X / X.shape[0] + lams[b] * torch.eye(X.shape[1], dtype=F64)
        out[b] = torch.linalg.solve(G, test.flat(b).T).T.numpy()
    return out


def scores_from_solution(train: Features, x: dict[str, np.ndarray]) -> np.ndarray:
    return sum(x[b] @ train.flat(b).numpy().T for b in x)


# ----------------------------------------------------------------------------- damping

def test_block_damping_is_ratio_times_mean_squared_entry():
    train = random_features(6, SHAPES, seed=1)
    assert block_damping(train) == pytest.approx(paper_damping(train), rel=1e-12)
    assert block_damping(train, damping_ratio=0.5) == pytest.approx(paper_damping(train, 0.5), rel=1e-12)
    assert block_damping(train, damping=0.25) == {b: 0.25 for b in SHAPES}
    allsq = np.concatenate([train.flat(b).numpy().ravel() ** 2 for b in train.blocks])
    assert global_damping(train) == pytest.approx(0.1 * allsq.mean(), rel=1e-12)
    assert global_damping(train, damping=3.0) == 3.0


# ----------------------------------------------------------------------------- similarity

def test_gradsim_and_cosine_by_hand():
    train = random_features(5, SHAPES, seed=2)
    train.grads["layer0.lora_A"][3] = 0
    train.grads["layer0.lora_B"][3] = 0  # a zero gradient: cosine defined as 0
    test = random_features(3, SHAPES, seed=3)
    dot = np.zeros((3, 5))
    cos = np.zeros((3, 5))
    for t in range(3):
        for i in range(5):
            v = np.concatenate([test.grads[b][t].numpy().ravel() for b in SHAPES])
            g = np.concatenate([train.grads[b][i].numpy().ravel() for b in SHAPES])
            dot[t, i] = sum(v[k] * g[k] for k in range(len(v)))
            nv, ng = math.sqrt(sum(a * a for a in v)), math.sqrt(sum(a * a for a in g))
            cos[t, i] = dot[t, i] / (nv * ng) if nv * ng > 0 else 0.0
    got = make_method("gradsim").fit(train).score(test)
    got_cos = make_method("gradsim-cos").fit(train).score(test)
    assert got.dtype == F64 and got.shape == (3, 5)
    np.testing.assert_allclose(got.numpy(), dot, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_cos.numpy(), cos, rtol=1e-12, atol=1e-14)
    assert np.all(got_cos.numpy()[:, 3] == 0)


def test_repsim_by_hand():
    train = random_features(4, SHAPES, seed=4, reps=6)
    test = random_features(2, SHAPES, seed=5, reps=6)
    want = np.array([[float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) for b in train.reps.numpy()]
                     for a in test.reps.numpy()])
    got = make_method("repsim").fit(train).score(test)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    with pytest.raises(UserError, match="reps"):
        make_method("repsim").fit(random_features(4, SHAPES, seed=4))


def test_tracin_sums_learning_rate_weighted_dots_over_history():
    n, m = 5, 3
    lrs = [0.1, 0.05, 0.01]
    train_cps = [random_features(n, SHAPES, seed=10 + c) for c in range(3)]
    test_cps = [random_features(m, SHAPES, seed=20 + c) for c in range(3)]
    train = random_features(n, SHAPES, seed=30)
    test = random_features(m, SHAPES, seed=31)
    train.history = list(zip(lrs, train_cps))
    test.history = list(zip(lrs, test_cps))
    want = np.zeros((m, n))
    for w, ftr, fte in zip(lrs, train_cps, test_cps):
        for t in range(m):
            for i in range(n):
                want[t, i] += w * sum(float((fte.grads[b][t] * ftr.grads[b][i]).sum()) for b in SHAPES)
    got = make_method("tracin").fit(train).score(test)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)

    # empty history: the current checkpoint alone, weight 1 (= gradsim)
    plain_train, plain_test = random_features(n, SHAPES, seed=30), random_features(m, SHAPES, seed=31)
    np.testing.assert_allclose(make_method("tracin").fit(plain_train).score(plain_test).numpy(),
                               make_method("gradsim").fit(plain_train).score(plain_test).numpy(), rtol=1e-12)

    test.history = [(0.2, f) for _, f in test.history]
    with pytest.raises(UserError, match="weight"):
        make_method("tracin").fit(train).score(test)
    test.history = test.history[:2]
    with pytest.raises(UserError, match="history"):
        make_method("tracin").fit(train).score(test)


# ----------------------------------------------------------------------------- DataInf

def test_datainf_equals_sherman_morrison_average_written_out():
    train = random_features(7, SHAPES, seed=40)
    test = random_features(3, SHAPES, seed=41)
    lams = paper_damping(train)
    n = train.n
    want = np.zeros((test.n, n))
    for t in range(test.n):
        for b in SHAPES:
            v = test.grads[b][t].numpy().ravel()
            lam = lams[b]
            hvp = np.zeros_like(v)
            for j in range(n):
                g = train.grads[b][j].numpy().ravel()
                hvp += v - (np.dot(v, g) / (lam + np.dot(g, g))) * g
            hvp /= n * lam
            for i in range(n):
                want[t, i] += np.dot(hvp, train.grads[b][i].numpy().ravel())
    method = make_method("datainf").fit(train)
    got = method.score(test)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=0)
    assert method.diagnostics["damping"] == pytest.approx(lams, rel=1e-12)
    json.dumps(method.diagnostics)


# ----------------------------------------------------------------------------- exact

@pytest.mark.parametrize("n", [6, 30])
def test_exact_equals_explicit_solve_per_block(n):
    # blocks of d = 24 and d = 4: with n = 6 one block takes the Woodbury path and the
    # other the primal one; with n = 30 both are primal
    shapes = {"q.lora_A": (4, 6), "q.lora_B": (2, 2)}
    train = random_features(n, shapes, seed=50 + n)
    test = random_features(4, shapes, seed=60 + n)
    lams = paper_damping(train)
    x_want = explicit_block_solution(train, test, lams)
    method = make_method("exact").fit(train)
    np.testing.assert_allclose(method.score(test).numpy(), scores_from_solution(train, x_want), rtol=1e-9, atol=1e-9)
    x_got = method.solve(test)
    for b in shapes:
        assert x_got[b].shape == (4, *shapes[b])
        np.testing.assert_allclose(x_got[b].reshape(4, -1).numpy(), x_want[b], rtol=1e-9, atol=1e-11)
    expected_kind = {"q.lora_A": "woodbury" if n < 24 else "primal", "q.lora_B": "primal"}
    assert {b: s.split("/")[0] for b, s in method.diagnostics["solver"].items()} == expected_kind
    assert method.diagnostics["residual_max"] < 1e-10
    json.dumps(method.diagnostics)


def test_zero_gradient_block_is_skipped_and_contributes_nothing():
    train = random_features(5, SHAPES, seed=70)
    test = random_features(2, SHAPES, seed=71)
    train.grads["layer0.lora_B"].zero_()
    only_a_train = Features(ids=train.ids, grads={"layer0.lora_A": train.grads["layer0.lora_A"]})
    only_a_test = Features(ids=test.ids, grads={"layer0.lora_A": test.grads["layer0.lora_A"]})
    for name in ("exact", "datainf", "lissa"):
        m = make_method(name).fit(train)
        np.testing.assert_allclose(m.score(test).numpy(), make_method(name).fit(only_a_train).score(only_a_test).numpy(),
                                   rtol=1e-12)
        assert m.diagnostics["skipped_blocks_zero_gradients"] == ["layer0.lora_B"]


# ----------------------------------------------------------------------------- LiSSA

def test_lissa_converges_to_exact_and_error_falls_with_iterations():
    shapes = {"a": (3, 4), "b": (2, 3)}
    train = random_features(9, shapes, seed=80)
    test = random_features(4, shapes, seed=81)
    exact = make_method("exact", damping=0.5).fit(train)
    s_exact = exact.score(test).numpy()
    x_exact = exact.solve(test)

    lissa = make_method("lissa", damping=0.5, iterations=400).fit(train)
    s = lissa.score(test).numpy()
    assert np.linalg.norm(s - s_exact) / np.linalg.norm(s_exact) < 1e-4
    x = lissa.solve(test)
    for b in shapes:
        assert torch.linalg.norm(x[b] - x_exact[b]) / torch.linalg.norm(x_exact[b]) < 1e-4
    # the automatic scale is 1.05 (lambda_max(G_l) + lambda_l), per block
    for b in shapes:
        X = train.flat(b)
        top = float(torch.linalg.eigvalsh(X.T @ X / X.shape[0])[-1])
        assert lissa.diagnostics["scale"][b] == pytest.approx(1.05 * (top + 0.5), rel=1e-10)
    assert lissa.diagnostics["residual_max"] < 1e-4

    # fixed scale: the truncated Neumann series error shrinks monotonically
    scale = 1.05 * max(lissa.diagnostics["scale"].values())
    errors, score_errors, residuals = [], [], []
    for iterations in (1, 5, 10):
        m = make_method("lissa", damping=0.5, iterations=iterations, scale=scale).fit(train)
        xs = m.solve(test)
        errors.append(math.sqrt(sum(float(torch.sum((xs[b] - x_exact[b]) ** 2)) for b in shapes)))
        score_errors.append(np.linalg.norm(m.score(test).numpy() - s_exact))
        residuals.append(m.diagnostics["residual_max"])
        assert m.diagnostics["iterations"] == iterations
        assert m.diagnostics["scale"] == {b: scale for b in shapes}
    assert errors[0] > errors[1] > errors[2]
    assert score_errors[0] > score_errors[1] > score_errors[2]
    assert residuals[0] > residuals[1] > residuals[2]


def test_lissa_auto_scale_by_power_iteration_for_large_blocks(monkeypatch):
    import llm_influence.methods.lissa as lissa_module

    shapes = {"a": (3, 4), "b": (2, 3)}
    train = random_features(9, shapes, seed=85)
    test = random_features(2, shapes, seed=86)
    monkeypatch.setattr(lissa_module, "EXACT_EIG_MAX_DIM", 0)
    m = make_method("lissa", damping=0.5, iterations=400, power_iterations=200).fit(train)
    for b in shapes:
        X = train.flat(b)
        top = 1.05 * (float(torch.linalg.eigvalsh(X.T @ X / X.shape[0])[-1]) + 0.5)
        assert top * (1 - 1e-3) < m.diagnostics["scale"][b] <= top * (1 + 1e-12)
    want = make_method("exact", damping=0.5).fit(train).score(test).numpy()
    got = m.score(test).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_lissa_with_too_small_a_scale_diverges_visibly():
    shapes = {"a": (3, 4)}
    train = random_features(9, shapes, seed=87)
    test = random_features(2, shapes, seed=88)
    m = make_method("lissa", damping=0.5, scale=0.05, iterations=400).fit(train)
    m.score(test)
    assert m.diagnostics["residual_max"] == float("inf") or m.diagnostics["residual_max"] > 1e6


def test_lissa_matches_the_recursion_written_out():
    """r_{t+1} = v + r_t - (G + lam I) r_t / s, x = r_T / s (not (G - lam I))."""
    shapes = {"a": (2, 3)}
    train = random_features(6, shapes, seed=90)
    test = random_features(2, shapes, seed=91)
    lam, s, T = 0.3, 20.0, 7
    X = train.flat("a").numpy()
    G = X.T @ X / X.shape[0]
    want = np.zeros((2, 6))
    for t in range(2):
        v = test.flat("a")[t].numpy()
        r = v.copy()
        for _ in range(T):
            r = v + r - (G @ r + lam * r) / s
        want[t] = X @ (r / s)
    got = make_method("lissa", damping=lam, scale=s, iterations=T).fit(train).score(test)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_lissa_paper_matches_the_authors_recursion_written_out():
    """The authors' utils.py, per block: r <- v + r - (1/n) sum_j (<g_j, r> g_j - lam r) / 1000,
    written with an explicit loop over training examples; score = <r_T, g_i> (no division)."""
    shapes = {"a": (2, 3), "b": (3, 2)}
    train = random_features(5, shapes, seed=92)
    test = random_features(3, shapes, seed=93)
    T = 10
    lams = paper_damping(train)
    want = np.zeros((3, 5))
    for b in shapes:
        X = train.flat(b).numpy()
        for t in range(3):
            v = test.flat(b)[t].numpy()
            r = v.copy()
            for _ in range(T):
                acc = np.zeros_like(r)
                for g in X:
                    acc += np.dot(g, r) * g - lams[b] * r
                r = v + r - acc / X.shape[0] / 1000.0
            want[t] += X @ r
    m = make_method("lissa-paper")
    got = m.fit(train).score(test)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    # closed form: r_T = sum_k (I - (G - lam I)/s)^k v, and it is not (G + lam I)^{-1} v
    X = train.flat("a")
    A = torch.eye(6, dtype=F64) - (X.T @ X / 5 - lams["a"] * torch.eye(6, dtype=F64)) / 1000.0
    power_sum = sum(torch.linalg.matrix_power(A, k) for k in range(T + 1))
    torch.testing.assert_close(m.solve(test)["a"].reshape(3, -1), test.flat("a") @ power_sum.T, rtol=1e-12, atol=0)
    d = m.diagnostics
    assert d["residual_max"] > 1.0  # far from any inverse of G + lam I ...
    assert 0 <= d["residual_best_scale_mean"] <= d["residual_best_scale_max"] <= 1.0  # ... even up to scale
    assert d["iterations"] == T and d["scale"] == 1000.0


def test_lissa_paper_grows_along_the_null_space_when_n_is_below_d():
    """With n < d, G - lam I has the eigenvalue -lam: the recursion multiplies that part of v
    by sum_k (1 + lam/s)^k instead of converging."""
    shapes = {"a": (3, 4)}
    train = random_features(2, shapes, seed=94)
    X = train.flat("a")
    lam, s, T = 50.0, 1000.0, 30  # |1 - (mu - lam)/s| < 1 + lam/s for G's other eigenvalues mu
    null = torch.linalg.svd(X, full_matrices=True).Vh[-1]  # orthogonal to both training gradients
    test = Features(ids=["t"], grads={"a": null.reshape(1, 3, 4).clone()})
    r = make_method("lissa-paper", damping=lam, scale=s, iterations=T).fit(train).solve(test)["a"].reshape(-1)
    growth = sum((1 + lam / s) ** k for k in range(T + 1))
    torch.testing.assert_close(r, growth * null, rtol=1e-10, atol=1e-12)


def spd_hvp_features(n: int, shapes: dict[str, tuple[int, int]], seed: int) -> tuple[Features, torch.Tensor]:
    """Training features whose ``hvp`` multiplies by an explicit SPD matrix ``A`` ``[D, D]``."""
    train = random_features(n, shapes, seed=seed)
    D = sum(r * c for r, c in shapes.values())
    gen = torch.Generator().manual_seed(seed + 1)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=F64))
    A = Q @ torch.diag(torch.linspace(0.2, 4.0, D, dtype=F64)) @ Q.T
    sizes = [r * c for r, c in shapes.values()]

    def hvp(vectors):
        flat = torch.cat([vectors[b].reshape(-1) for b in shapes])
        out = torch.split(A @ flat, sizes)
        return {b: o.reshape(shapes[b]) for b, o in zip(shapes, out)}

    train.hvp = hvp
    return train, A


def explicit_joint_scores(train: Features, test: Features, M: torch.Tensor) -> np.ndarray:
    V = test.flat_all()
    X = train.flat_all()
    return (torch.linalg.solve(M, V.T).T @ X.T).numpy()


def test_true_hessian_lissa_and_cg_equal_explicit_solve():
    shapes = {"a": (2, 3), "b": (3, 2)}
    train, A = spd_hvp_features(8, shapes, seed=100)
    test = random_features(3, shapes, seed=102)
    lam = 0.3
    want = explicit_joint_scores(train, test, A + lam * torch.eye(A.shape[0], dtype=F64))

    cg = make_method("exact-full", hessian="true", damping=lam, tol=1e-12).fit(train)
    np.testing.assert_allclose(cg.score(test).numpy(), want, rtol=1e-9, atol=1e-10)
    assert cg.diagnostics["converged"] == 3 and cg.diagnostics["not_converged"] == 0
    assert cg.diagnostics["residual_max"] < 1e-10
    assert 0 < cg.diagnostics["iterations_max"] <= A.shape[0] + 1
    json.dumps(cg.diagnostics)

    lissa = make_method("lissa", hessian="true", damping=lam, iterations=500).fit(train)
    assert lissa.required_features() == frozenset({"grads", "hvp"})
    top = float(torch.linalg.eigvalsh(A)[-1]) + lam
    # power iteration approaches lambda_max from below
    assert 1.05 * top * (1 - 1e-3) < lissa.diagnostics["scale"] <= 1.05 * top * (1 + 1e-12)
    got = lissa.score(test).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-8
    assert lissa.diagnostics["residual_max"] < 1e-8
    json.dumps(lissa.diagnostics)

    # the damping from the ratio is one value over all parameters
    m = make_method("exact-full", hessian="true", tol=1e-12).fit(train)
    lam_all = global_damping(train)
    want2 = explicit_joint_scores(train, test, A + lam_all * torch.eye(A.shape[0], dtype=F64))
    np.testing.assert_allclose(m.score(test).numpy(), want2, rtol=1e-9, atol=1e-10)
    assert m.diagnostics["damping"] == pytest.approx(lam_all)


def test_cg_reports_non_convergence():
    shapes = {"a": (2, 3), "b": (3, 2)}
    train, _ = spd_hvp_features(8, shapes, seed=110)
    test = random_features(2, shapes, seed=111)
    m = make_method("exact-full", hessian="true", damping=1e-3, tol=1e-14, max_iterations=2).fit(train)
    with pytest.warns(RuntimeWarning, match="conjugate gradient"):
        m.score(test)
    assert m.diagnostics["not_converged"] == 2 and m.diagnostics["iterations_max"] == 2
    assert m.diagnostics["residual_max"] > 1e-6


@pytest.mark.parametrize("n", [5, 40])
def test_exact_full_gauss_newton_equals_explicit_solve_over_concatenation(n):
    # D = 12 + 6 = 18: n = 5 takes the Woodbury path, n = 40 the primal one
    shapes = {"a": (3, 4), "b": (2, 3)}
    train = random_features(n, shapes, seed=120 + n)
    test = random_features(3, shapes, seed=130 + n)
    lam = global_damping(train)
    X = train.flat_all()
    M = X.T @ X / n + lam * torch.eye(X.shape[1], dtype=F64)
    want = explicit_joint_scores(train, test, M)
    m = make_method("exact-full").fit(train)
    np.testing.assert_allclose(m.score(test).numpy(), want, rtol=1e-9, atol=1e-10)
    assert m.diagnostics["solver"].startswith("woodbury" if n < 18 else "primal")
    assert m.diagnostics["residual_max"] < 1e-10
    x = m.solve(test)
    x_want = torch.linalg.solve(M, test.flat_all().T).T
    np.testing.assert_allclose(torch.cat([x[b].reshape(3, -1) for b in shapes], 1).numpy(), x_want.numpy(),
                               rtol=1e-9, atol=1e-11)
    # with a single block, exact-full is exact
    one_tr = Features(ids=train.ids, grads={"a": train.grads["a"]})
    one_te = Features(ids=test.ids, grads={"a": test.grads["a"]})
    np.testing.assert_allclose(make_method("exact-full").fit(one_tr).score(one_te).numpy(),
                               make_method("exact").fit(one_tr).score(one_te).numpy(), rtol=1e-9)


# ----------------------------------------------------------------------------- EK-FAC

def kfac_features(n: int, shapes: dict[str, tuple[int, int]], seed: int) -> Features:
    f = random_features(n, shapes, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    f.kfac = {}
    for b, (r, c) in shapes.items():
        a = torch.randn(3 * c, c, generator=gen, dtype=F64)
        s = torch.randn(3 * r, r, generator=gen, dtype=F64)
        f.kfac[b] = KFACFactors(input_cov=a.T @ a / (3 * c), grad_cov=s.T @ s / (3 * r), n_tokens=3)
    return f


def test_ekfac_equals_its_formula_with_explicit_kronecker_matrices():
    shapes = {"a": (3, 4), "b": (2, 5)}
    train = kfac_features(7, shapes, seed=140)
    test = random_features(3, shapes, seed=141)
    lams = paper_damping(train)
    want = np.zeros((3, 7))
    for b, (r, c) in shapes.items():
        _, QA = np.linalg.eigh(train.kfac[b].input_cov.numpy())
        _, QS = np.linalg.eigh(train.kfac[b].grad_cov.numpy())
        Q = np.kron(QS, QA)  # row-major vec(M) -> vec(QS^T M QA) is Q^T
        X = train.flat(b).numpy()
        lam_corr = np.mean((X @ Q) ** 2, axis=0)
        M = Q @ np.diag(lam_corr + lams[b]) @ Q.T
        x = np.linalg.solve(M, test.flat(b).numpy().T).T
        want += x @ X.T
    m = make_method("ekfac").fit(train)
    np.testing.assert_allclose(m.score(test).numpy(), want, rtol=1e-9, atol=1e-10)
    assert m.diagnostics["residual_max"] > 1e-3  # an approximation of G + lambda I, reported as such
    json.dumps(m.diagnostics)


def test_ekfac_is_exact_when_gradients_are_kronecker_structured():
    """If the (output-grad, input) pairs form a full product set, G = S (x) A exactly."""
    gen = torch.Generator().manual_seed(150)
    E = torch.randn(5, 3, generator=gen, dtype=F64)
    Xin = torch.randn(6, 4, generator=gen, dtype=F64)
    grads = (E[:, None, :, None] * Xin[None, :, None, :]).reshape(30, 3, 4)
    train = Features(ids=[str(i) for i in range(30)], grads={"w": grads},
                     kfac={"w": KFACFactors(input_cov=Xin.T @ Xin / 6, grad_cov=E.T @ E / 5)})
    test = random_features(4, {"w": (3, 4)}, seed=151)
    ek = make_method("ekfac", damping=1e-3).fit(train)
    np.testing.assert_allclose(ek.score(test).numpy(), make_method("exact", damping=1e-3).fit(train).score(test).numpy(),
                               rtol=1e-8, atol=1e-8)
    assert ek.diagnostics["residual_max"] < 1e-9


def test_ekfac_without_factors_is_an_error():
    train = random_features(5, SHAPES, seed=160)
    with pytest.raises(UserError, match="K-FAC"):
        make_method("ekfac").fit(train)
    train = kfac_features(5, SHAPES, seed=160)
    train.kfac.pop("layer0.lora_B")
    with pytest.raises(UserError, match="lora_B"):
        make_method("ekfac").fit(train)
    train = kfac_features(5, SHAPES, seed=160)
    train.kfac["layer0.lora_A"] = KFACFactors(input_cov=torch.eye(3, dtype=F64), grad_cov=torch.eye(2, dtype=F64))
    with pytest.raises(UserError, match="expected"):
        make_method("ekfac").fit(train)


# ----------------------------------------------------------------------------- diagnostics

@pytest.mark.parametrize("name", ["datainf", "lissa", "exact", "exact-full", "ekfac"])
def test_inverse_methods_report_json_diagnostics_with_the_residual_they_claim(name):
    shapes = {"a": (3, 4), "b": (2, 3)}
    train = kfac_features(6, shapes, seed=170)
    test = random_features(3, shapes, seed=171)
    m = make_method(name).fit(train)
    m.score(test)
    d = json.loads(json.dumps(m.diagnostics))
    assert d["residual_count"] == (3 if name == "exact-full" else 6)
    assert d["residual_max"] >= d["residual_mean"] >= 0
    assert "damping" in d and "residual_reference" in d
    if name == "exact-full":
        return
    # recompute the worst block residual against G_l + lambda_l I independently
    x = m.solve(test)
    worst = 0.0
    for b in shapes:
        X = train.flat(b)
        lam = block_damping(train)[b]
        H = X.T @ X / X.shape[0] + lam * torch.eye(X.shape[1], dtype=F64)
        xb = x[b].reshape(3, -1)
        rel = torch.linalg.norm(xb @ H - test.flat(b), dim=1) / torch.linalg.norm(test.flat(b), dim=1)
        worst = max(worst, float(rel.max()))
        assert m.diagnostics["residual_per_block"][b]["max"] == pytest.approx(float(rel.max()), rel=1e-8, abs=1e-13)
    assert m.diagnostics["residual_max"] == pytest.approx(worst, rel=1e-8, abs=1e-13)
