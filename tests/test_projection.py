"""Random projections of gradients (``--project-dim``) and the ``projected`` method.

References are written independently: explicit projection matrices (block-diagonal),
explicit Gram matrices and ``torch.linalg.solve``.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from llm_influence.errors import UserError
from llm_influence.features.projection import (GradientProjector, ProjectionSpec, allocate, block_seed,
                                               projection_matrix)
from llm_influence.features.types import Features
from llm_influence.methods import make_method
from llm_influence.methods import projected as projected_module

F64 = torch.float64
SHAPES = {"l0.q.lora_A": (2, 9), "l0.q.lora_B": (9, 2), "l1.v.lora_A": (2, 9), "l1.v.lora_B": (6, 2)}


def features(n: int, seed: int, shapes=SHAPES, prefix: str = "x") -> Features:
    gen = torch.Generator().manual_seed(seed)
    grads = {b: torch.randn(n, *s, generator=gen, dtype=F64) * (1 + k) for k, (b, s) in enumerate(shapes.items())}
    return Features(ids=[f"{prefix}{i}" for i in range(n)], grads=grads)


def project(f: Features, projector: GradientProjector) -> Features:
    return Features(ids=f.ids, grads={b: projector(b, g) for b, g in f.grads.items()})


def explicit_P(projector: GradientProjector) -> torch.Tensor:
    """The block-diagonal ``[D, D_full]`` matrix, assembled from the per-block matrices."""
    mats = [projector.matrix(b) for b in projector.shapes]
    return torch.block_diag(*mats)


# ----------------------------------------------------------------------------- allocation

def test_allocation_is_proportional_exact_and_bounded():
    sizes = {"a": 5, "b": 5, "c": 100, "d": 290}
    for dim in (4, 10, 37, 200, 399, 400):
        k = allocate(dim, sizes)
        assert sum(k.values()) == dim and list(k) == list(sizes)
        assert all(1 <= k[b] <= sizes[b] for b in sizes)
        forced = sum(1 for b in sizes if dim * sizes[b] < 400)  # blocks raised to the minimum of 1
        for b in sizes:  # within one of the proportional quota (plus what the minimum took away)
            quota = dim * sizes[b] / 400
            assert k[b] == 1 or abs(k[b] - quota) < 1 + forced, (dim, b, k[b], quota)
    assert allocate(400, sizes) == sizes  # the full dimension keeps every block's size
    with pytest.raises(UserError, match="smaller than the number of LoRA blocks"):
        allocate(3, sizes)
    with pytest.raises(UserError, match="exceeds the number of LoRA parameters"):
        allocate(401, sizes)
    with pytest.raises(UserError, match="project-kind"):
        ProjectionSpec(16, kind="sparse")
    with pytest.raises(UserError, match="project-dim"):
        ProjectionSpec(0)


# ----------------------------------------------------------------------------- JL and determinism

@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "orthogonal"])
def test_inner_products_are_preserved_for_large_dim(kind):
    """Johnson-Lindenstrauss: errors of <Pg, Ph> relative to ||g|| ||h|| shrink like 1/sqrt(D)."""
    shapes = {"a": (8, 500), "b": (500, 8), "c": (4, 250)}  # 9000 parameters
    f = features(12, seed=3, shapes=shapes)
    G = f.flat_all()
    G[6:] += 2.0 * G[:6]  # correlated pairs: large true inner products too
    f = Features(ids=f.ids, grads={b: t.reshape(12, *shapes[b]) for b, t in
                                   zip(shapes, torch.split(G, [4000, 4000, 1000], dim=1))})
    exact = G @ G.T
    norms = G.norm(dim=1)
    errors = {}
    for dim in (90, 4500):
        worst = 0.0
        for seed in range(1 if kind == "orthogonal" else 3):  # QR of a 4000 x 2000 matrix is slow
            p = project(f, GradientProjector(ProjectionSpec(dim, seed=seed, kind=kind), shapes)).flat_all()
            worst = max(worst, float(((p @ p.T - exact).abs() / (norms[:, None] * norms[None, :])).max()))
        errors[dim] = worst
    assert errors[4500] < 0.1, errors
    assert errors[4500] < errors[90] / 3, errors


def test_projection_is_seed_deterministic_and_independent_of_call_order():
    spec = ProjectionSpec(12, seed=7)
    a = GradientProjector(spec, SHAPES)
    b = GradientProjector(spec, SHAPES)
    blocks = list(SHAPES)
    first = {blk: a.matrix(blk).clone() for blk in blocks}
    second = {blk: b.matrix(blk) for blk in reversed(blocks)}  # other order, other instance
    assert all(torch.equal(first[blk], second[blk]) for blk in blocks)
    assert all(torch.equal(a.matrix(blk, torch.float32), first[blk].float()) for blk in blocks)
    other = GradientProjector(ProjectionSpec(12, seed=8), SHAPES)
    assert not torch.equal(other.matrix(blocks[0]), first[blocks[0]])
    assert block_seed(7, blocks[0]) != block_seed(7, blocks[1])
    g = features(3, seed=1).grads[blocks[0]]
    assert a(blocks[0], g).shape == (3, 1, a.dims[blocks[0]])
    torch.testing.assert_close(a(blocks[0], g)[:, 0], g.reshape(3, -1) @ first[blocks[0]].T, rtol=0, atol=0)
    # the matrices' scale: E[P^T P] = I, and the orthogonal kind with k = d is a rotation
    q = projection_matrix("orthogonal", 18, 18, seed=5)
    torch.testing.assert_close(q @ q.T, torch.eye(18, dtype=F64), rtol=0, atol=1e-12)
    r = projection_matrix("rademacher", 4, 10, seed=5)
    assert set(r.abs().flatten().tolist()) == {0.5}


# ----------------------------------------------------------------------------- the projected method

@pytest.mark.parametrize("n", [5, 60])  # Woodbury (n < D = 76) and primal (D <= n)
def test_projected_with_full_orthogonal_projection_equals_exact_full(n):
    train, test = features(n, seed=1), features(4, seed=2, prefix="q")
    full = sum(math.prod(s) for s in SHAPES.values())
    projector = GradientProjector(ProjectionSpec(full, seed=3, kind="orthogonal"), SHAPES)
    method = make_method("projected")
    scores = method.fit(project(train, projector)).score(project(test, projector))
    reference = make_method("exact-full").fit(train).score(test)
    torch.testing.assert_close(scores, reference, rtol=1e-9, atol=1e-12)
    assert method.diagnostics["solver"].startswith("woodbury" if n < full else "primal")
    assert method.diagnostics["residual_max"] < 1e-10
    # the same damping: an orthogonal projection keeps the sum of squares
    assert method.diagnostics["damping"] == pytest.approx(make_method("exact-full").fit(train).diagnostics["damping"],
                                                          rel=1e-12)


@pytest.mark.parametrize("n", [6, 40])
def test_projected_equals_explicit_formula_in_the_projected_space(n):
    """score = v^T P^T (P G P^T + lambda I)^{-1} P g_i, with explicit P, G and solve."""
    train, test = features(n, seed=4), features(3, seed=5, prefix="q")
    projector = GradientProjector(ProjectionSpec(20, seed=1), SHAPES)
    P = explicit_P(projector)
    X, V = train.flat_all(), test.flat_all()  # blocks are in SHAPES order
    PX, PV = X @ P.T, V @ P.T
    lam = 0.1 * float(PX.square().mean())
    A = P @ (X.T @ X / n) @ P.T + lam * torch.eye(20, dtype=F64)
    expected = torch.linalg.solve(A, PV.T).T @ PX.T
    method = make_method("projected")
    scores = method.fit(project(train, projector)).score(project(test, projector))
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)
    assert method.diagnostics["damping"] == pytest.approx(lam, rel=1e-12) and method.diagnostics["dim"] == 20
    # solve(): the preconditioned test gradients, block by block
    xs = make_method("projected").fit(project(train, projector)).solve(project(test, projector))
    x = torch.cat([xs[b].reshape(3, -1) for b in SHAPES], dim=1)
    torch.testing.assert_close(x, torch.linalg.solve(A, PV.T).T, rtol=1e-9, atol=1e-12)
    # explicit damping, and a higher score for the training example equal to the test one
    same = Features(ids=["q0"], grads={b: g[:1] for b, g in train.grads.items()})
    s = make_method("projected", damping=0.5).fit(project(train, projector)).score(project(same, projector))
    assert int(s.argmax()) == 0


def test_projected_streams_in_chunks_with_the_same_result(monkeypatch):
    train, test = features(40, seed=6), features(5, seed=7, prefix="q")
    # primal: row chunks of 3 rows; Woodbury: 1-row chunks and column pieces of 5 columns
    for n, budget in ((40, 8 * 76 * 3), (9, 8 * 9 * 5)):
        sub = train.select(list(range(n)))
        whole = make_method("projected").fit(sub).score(test)
        monkeypatch.setattr(projected_module, "CHUNK_BYTES", budget)
        chunked = make_method("projected").fit(sub).score(test)
        monkeypatch.undo()
        torch.testing.assert_close(chunked, whole, rtol=1e-11, atol=1e-13)
    with pytest.raises(UserError, match="project-dim"):
        make_method("projected", max_dim=10).fit(train)


def test_projected_zero_gradients_give_zero_scores():
    train = Features(ids=["a", "b"], grads={"x": torch.zeros(2, 1, 3, dtype=F64)})
    test = Features(ids=["q"], grads={"x": torch.ones(1, 1, 3, dtype=F64)})
    method = make_method("projected")
    assert torch.equal(method.fit(train).score(test), torch.zeros(1, 2, dtype=F64))
    assert method.solve(test) == {}


# ----------------------------------------------------------------------------- during extraction

def test_extraction_stores_the_projection_of_the_full_gradients(tmp_path, tiny):
    """The stored projected grads are P_l applied to the per-example gradients; two
    extractions with the same seed are bitwise equal, another seed differs."""
    from llm_influence.features.extract import extract_features
    from test_features_store import _make_run

    run = _make_run(tmp_path / "run", tiny)
    full = extract_features(run, "last", "train", need={"grads"}, batch_size=3)
    full = Features(ids=full.ids, grads={b: g.clone() for b, g in full.grads.items()})
    spec = ProjectionSpec(40, seed=11)
    proj = extract_features(run, "last", "train", need={"grads"}, batch_size=3, projection=spec)
    projector = GradientProjector(spec, {b: tuple(g.shape[1:]) for b, g in full.grads.items()})
    assert sum(g.shape[2] for g in proj.grads.values()) == 40
    for b, g in full.grads.items():
        assert proj.grads[b].shape == (4, 1, projector.dims[b])
        torch.testing.assert_close(proj.grads[b], projector(b, g.double()).float(), rtol=1e-5, atol=1e-7)
    kept = {b: g.clone() for b, g in proj.grads.items()}
    shutil.rmtree(run.features_dir("epoch-1"))
    again = extract_features(run, "last", "train", need={"grads"}, batch_size=3, projection=spec)
    assert all(torch.equal(again.grads[b], kept[b]) for b in kept)
    other = extract_features(run, "last", "train", need={"grads"}, batch_size=3,
                             projection=ProjectionSpec(40, seed=12))
    assert not all(torch.equal(other.grads[b], kept[b]) for b in kept)
