"""Acc / Cover / ranking against hand-computed examples and independent reference loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llm_influence.data.example import Example, TaskData
from llm_influence.evaluation import (
    AttributionMetrics,
    acc,
    cover,
    evaluate_scores,
    evaluate_task,
    rank_training,
    relevance_from_task,
)

# ----------------------------------------------------------------------------- fixtures
# train groups: [a, a, b, b, c]; test groups: [a, b, c]
REL = np.array(
    [
        [1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ],
    dtype=bool,
)
SCORES = np.array(
    [
        [0.9, 0.1, 0.8, 0.2, 0.0],   # order 0,2,3,1,4: top-1 = 0 (hit); top-2 = {0,2}: 1/2
        [0.5, 0.4, 0.3, 0.6, 0.1],   # order 3,0,1,2,4: top-1 = 3 (hit); top-2 = {3,0}: 1/2
        [0.3, 0.2, 0.1, 0.0, 0.25],  # order 0,4,1,2,3: top-1 = 0 (miss); top-1 = {0}: 0/1
    ]
)


def _ex(i: int, group: str, split: str = "train") -> Example:
    return Example(id=f"{split}-{i}", prompt=f"p{i}", response=f"r{i}", group=group)


def _reference(scores: np.ndarray, rel: np.ndarray, rank_by: str = "score", k=None):
    """Independent per-row loop: Python sort with the key (-value, index)."""
    accs, covs = [], []
    n_test, n_train = scores.shape
    for i in range(n_test):
        n_rel = int(rel[i].sum())
        if n_rel == 0:
            continue
        key = [abs(float(v)) if rank_by == "abs" else float(v) for v in scores[i]]
        order = sorted(range(n_train), key=lambda j: (-key[j], j))
        ki = n_rel if k is None else min(int(k), n_train)
        accs.append(1.0 if rel[i, order[0]] else 0.0)
        covs.append(sum(bool(rel[i, j]) for j in order[:ki]) / ki)
    return sum(accs) / len(accs), sum(covs) / len(covs)


# ----------------------------------------------------------------------------- hand-computed

def test_hand_computed_acc_and_cover():
    m = evaluate_scores(SCORES, REL)
    assert isinstance(m, AttributionMetrics)
    assert m.acc == pytest.approx(2 / 3)
    assert m.cover == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert m.n_scored == 3 and m.n_skipped == 0
    assert m.rank_by == "score"
    np.testing.assert_array_equal(m.per_test_hit, [1.0, 1.0, 0.0])
    np.testing.assert_allclose(m.per_test_cover, [0.5, 0.5, 0.0])
    np.testing.assert_array_equal(m.k, [2, 2, 1])
    np.testing.assert_array_equal(m.scored, [True, True, True])
    assert acc(SCORES, REL) == pytest.approx(2 / 3)
    assert cover(SCORES, REL) == pytest.approx(1 / 3)
    assert m.to_dict() == {"acc": m.acc, "cover": m.cover, "n_scored": 3, "n_skipped": 0, "rank_by": "score"}


def test_rank_training_hand_computed():
    np.testing.assert_array_equal(
        rank_training(SCORES),
        [[0, 2, 3, 1, 4], [3, 0, 1, 2, 4], [0, 4, 1, 2, 3]],
    )


def test_ties_are_broken_by_lower_training_index_first():
    s = np.array([[0.0, 5.0, 0.0, 5.0], [1.0, 1.0, 1.0, 1.0], [-0.0, 0.0, -0.0, 0.0]])
    np.testing.assert_array_equal(rank_training(s), [[1, 3, 0, 2], [0, 1, 2, 3], [0, 1, 2, 3]])
    # |-5| ties with |5|: still index order
    np.testing.assert_array_equal(rank_training(np.array([[5.0, -5.0, 1.0]]), rank_by="abs"), [[0, 1, 2]])
    # the tie at the top between train 1 and 3 is decided for train 1
    s1 = s[:1]
    assert acc(s1, np.array([[0, 1, 0, 0]], dtype=bool)) == 1.0
    assert acc(s1, np.array([[0, 0, 0, 1]], dtype=bool)) == 0.0
    # all-equal scores: ranking is the identity, so Cover counts the first k columns
    assert cover(s[1:2], np.array([[1, 0, 0, 1]], dtype=bool)) == pytest.approx(0.5)
    # the same again and again (deterministic)
    for _ in range(3):
        np.testing.assert_array_equal(rank_training(s), rank_training(s.copy()))


def test_k_larger_than_group():
    # k=4: row0 top-4 {0,2,3,1} -> 2/4; row1 {3,0,1,2} -> 2/4; row2 {0,4,1,2} -> 1/4
    m = evaluate_scores(SCORES, REL, k=4)
    np.testing.assert_allclose(m.per_test_cover, [0.5, 0.5, 0.25])
    assert m.cover == pytest.approx(1.25 / 3)
    assert m.acc == pytest.approx(2 / 3)  # Acc does not depend on k
    np.testing.assert_array_equal(m.k, [4, 4, 4])


def test_k_larger_than_n_train_is_clipped():
    # k=100 -> 5 = n_train: every relevant example is in the top 5: 2/5, 2/5, 1/5
    m = evaluate_scores(SCORES, REL, k=100)
    np.testing.assert_array_equal(m.k, [5, 5, 5])
    np.testing.assert_allclose(m.per_test_cover, [0.4, 0.4, 0.2])
    assert cover(SCORES, REL, k=100) == pytest.approx(1 / 3)


def test_per_test_k():
    m = evaluate_scores(SCORES, REL, k=[1, 3, 2])
    # row0 top-1 {0}: 1/1; row1 top-3 {3,0,1}: 1/3; row2 top-2 {0,4}: 1/2
    np.testing.assert_allclose(m.per_test_cover, [1.0, 1 / 3, 0.5])
    assert m.cover == pytest.approx((1 + 1 / 3 + 0.5) / 3)
    assert cover(SCORES, REL, k=np.array([1, 3, 2])) == pytest.approx(m.cover)
    assert cover(SCORES, REL, k=torch.tensor([1, 3, 2])) == pytest.approx(m.cover)


@pytest.mark.parametrize("bad_k", [0, -1, [1, 0, 1], [1, 2], 1.5, True])
def test_bad_k_raises(bad_k):
    with pytest.raises(ValueError, match="k"):
        evaluate_scores(SCORES, REL, k=bad_k)


def test_test_group_absent_from_train_is_skipped():
    scores = np.vstack([SCORES, [[9.0, 8.0, 7.0, 6.0, 5.0]]])
    rel = np.vstack([REL, np.zeros((1, 5), dtype=bool)])  # a test group "d" with no train rows
    m = evaluate_scores(scores, rel)
    assert m.n_scored == 3 and m.n_skipped == 1
    assert m.acc == pytest.approx(2 / 3)
    assert m.cover == pytest.approx(1 / 3)
    np.testing.assert_array_equal(m.scored, [True, True, True, False])
    assert math.isnan(m.per_test_hit[3]) and math.isnan(m.per_test_cover[3])
    assert m.k[3] == 0
    # explicit k: the example is still skipped
    m4 = evaluate_scores(scores, rel, k=4)
    assert m4.n_skipped == 1 and m4.cover == pytest.approx(1.25 / 3)


def test_every_test_example_skipped_raises():
    with pytest.raises(ValueError, match="no test example can be scored"):
        evaluate_scores(SCORES, np.zeros_like(REL))
    with pytest.raises(ValueError, match="no test example can be scored"):
        acc(np.zeros((0, 4)), np.zeros((0, 4), dtype=bool))


def test_rank_by_abs_differs_from_score_with_large_negative_entries():
    scores = np.array(
        [
            [0.5, -3.0, 0.1, 0.2],   # score: 0,3,2,1   abs: 1,0,3,2
            [-0.2, 0.3, -10.0, 0.1],  # score: 1,3,0,2   abs: 2,1,0,3
        ]
    )
    rel = np.array([[1, 0, 0, 1], [0, 1, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(rank_training(scores), [[0, 3, 2, 1], [1, 3, 0, 2]])
    np.testing.assert_array_equal(rank_training(scores, rank_by="abs"), [[1, 0, 3, 2], [2, 1, 0, 3]])
    by_score = evaluate_scores(scores, rel, rank_by="score")
    by_abs = evaluate_scores(scores, rel, rank_by="abs")
    # score: row0 top-2 {0,3} 2/2 hit; row1 top-2 {1,3} 2/2 hit
    assert by_score.acc == 1.0 and by_score.cover == 1.0
    # abs: row0 top-1 = 1 miss, top-2 {1,0} 1/2; row1 top-1 = 2 miss, top-2 {2,1} 1/2
    assert by_abs.acc == 0.0 and by_abs.cover == pytest.approx(0.5)
    assert by_abs.rank_by == "abs"
    assert acc(scores, rel, rank_by="abs") == 0.0
    assert cover(scores, rel, rank_by="abs") == pytest.approx(0.5)


def test_unknown_rank_by_raises():
    with pytest.raises(ValueError, match="rank_by"):
        evaluate_scores(SCORES, REL, rank_by="ascending")
    with pytest.raises(ValueError, match="rank_by"):
        rank_training(SCORES, rank_by="ABS")


def _mixed_task() -> tuple[TaskData, np.ndarray]:
    """Mixed (small): 20 harmful + 20 benign train (harmful first), 40 harmful test.

    Even test rows rank harmful 0..14 first, then benign 20..24 (top-1 harmful, 15 of
    the top 20 harmful); odd rows rank benign 20..29 first, then harmful 0..9 (top-1
    benign, 10 of the top 20 harmful). Acc = 20/40 = 0.5, Cover = (0.75 + 0.5)/2 = 0.625.
    """
    train = [_ex(i, "harmful") for i in range(20)] + [_ex(i, "benign") for i in range(20, 40)]
    test = [_ex(i, "harmful", "test") for i in range(40)]
    scores = np.zeros((40, 40))
    for i in range(40):
        if i % 2 == 0:
            top = list(range(15)) + list(range(20, 25))
        else:
            top = list(range(20, 30)) + list(range(10))
        for rank, j in enumerate(top):
            scores[i, j] = 100.0 - rank
        others = [j for j in range(40) if j not in top]
        for rank, j in enumerate(others):
            scores[i, j] = -1.0 - rank
    return TaskData("mixed-small", train, test), scores


def test_mixed_task_setting_k_is_20():
    task, scores = _mixed_task()
    assert all(task.k(te) == 20 for te in task.test)
    rel = relevance_from_task(task)
    assert rel.shape == (40, 40) and rel.dtype == torch.bool
    assert bool(rel[:, :20].all()) and not bool(rel[:, 20:].any())
    m = evaluate_task(scores, task)
    np.testing.assert_array_equal(m.k, np.full(40, 20))
    assert m.acc == pytest.approx(0.5)
    assert m.cover == pytest.approx(0.625)
    np.testing.assert_allclose(m.per_test_cover, [0.75 if i % 2 == 0 else 0.5 for i in range(40)])
    # k=20 explicitly (the paper's v1 mixed notebook) gives the same
    assert evaluate_scores(scores, rel, k=20).cover == pytest.approx(0.625)
    assert (m.acc, m.cover) == pytest.approx(_reference(scores, rel.numpy()))


def test_relevance_from_task_matches_groups():
    train = [_ex(0, "x"), _ex(1, "y"), _ex(2, "x")]
    test = [_ex(0, "y", "test"), _ex(1, "x", "test"), _ex(2, "z", "test")]
    rel = relevance_from_task(TaskData("t", train, test))
    assert rel.dtype == torch.bool
    assert rel.tolist() == [[False, True, False], [True, False, True], [False, False, False]]
    # custom relation
    custom = TaskData("t", train, test, relevant_fn=lambda te, tr: tr.id == "train-1")
    assert relevance_from_task(custom).tolist() == [[False, True, False]] * 3
    # empty splits keep the 2-D shape
    assert relevance_from_task(TaskData("t", train, [])).shape == (0, 3)
    assert relevance_from_task(TaskData("t", [], test)).shape == (3, 0)


# ----------------------------------------------------------------------------- inputs

def test_torch_inputs_match_numpy():
    m_np = evaluate_scores(SCORES, REL)
    m_t = evaluate_scores(torch.tensor(SCORES, dtype=torch.float32), torch.tensor(REL))
    assert (m_t.acc, m_t.cover) == (m_np.acc, m_np.cover)
    m_bf = evaluate_scores(torch.tensor(SCORES).to(torch.bfloat16), torch.tensor(REL).int())
    assert m_bf.acc == pytest.approx(2 / 3)
    ranked = rank_training(torch.tensor(SCORES))
    assert isinstance(ranked, torch.Tensor) and ranked.dtype == torch.int64
    assert ranked.tolist() == rank_training(SCORES).tolist()
    # 0/1 integer relevance and nested lists
    assert acc(SCORES.tolist(), REL.astype(int).tolist()) == pytest.approx(2 / 3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_raise_with_position(value):
    s = SCORES.copy()
    s[1, 2] = value
    s[2, 4] = value
    with pytest.raises(ValueError, match=r"scores\[1, 2\] \(test 1, train 2\)"):
        evaluate_scores(s, REL)
    with pytest.raises(ValueError, match=r"scores\[1, 2\]"):
        rank_training(torch.tensor(s))


def test_bad_shapes_and_relevance_raise():
    with pytest.raises(ValueError, match="2-D"):
        evaluate_scores(SCORES[0], REL[0])
    with pytest.raises(ValueError, match="shape"):
        evaluate_scores(SCORES, REL[:, :4])
    with pytest.raises(ValueError, match=r"relevant\[0, 0\]"):
        evaluate_scores(SCORES, REL * 2)
    with pytest.raises(ValueError, match="no training columns"):
        rank_training(np.zeros((3, 0)))


# ----------------------------------------------------------------------------- properties

@st.composite
def _problem(draw, unique=False, elements=None):
    n_test = draw(st.integers(1, 6))
    n_train = draw(st.integers(1, 8))
    if elements is None:
        elements = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
    scores = draw(hnp.arrays(np.float64, (n_test, n_train), elements=elements, unique=unique))
    rel = draw(hnp.arrays(np.bool_, (n_test, n_train)))
    assume(rel.any(axis=1).any())
    return scores, rel


@settings(max_examples=200, deadline=None)
@given(_problem(), st.sampled_from(["score", "abs"]), st.one_of(st.none(), st.integers(1, 12)))
def test_property_metrics_in_unit_interval(problem, rank_by, k):
    scores, rel = problem
    m = evaluate_scores(scores, rel, rank_by=rank_by, k=k)
    assert 0.0 <= m.acc <= 1.0 and 0.0 <= m.cover <= 1.0
    assert m.n_scored + m.n_skipped == scores.shape[0]
    assert m.n_scored == int(rel.any(axis=1).sum())
    scored = m.per_test_cover[m.scored]
    assert np.all((scored >= 0) & (scored <= 1))


@settings(max_examples=200, deadline=None)
@given(_problem(elements=st.integers(-3, 3).map(float)), st.sampled_from(["score", "abs"]),
       st.one_of(st.none(), st.integers(1, 12)))
def test_property_matches_reference_loop_with_ties(problem, rank_by, k):
    scores, rel = problem
    m = evaluate_scores(scores, rel, rank_by=rank_by, k=k)
    ref_acc, ref_cover = _reference(scores, rel, rank_by, k)
    assert m.acc == pytest.approx(ref_acc)
    assert m.cover == pytest.approx(ref_cover)
    key = np.abs(scores) if rank_by == "abs" else scores
    for i, row in enumerate(rank_training(scores, rank_by=rank_by)):
        assert list(row) == sorted(range(scores.shape[1]), key=lambda j: (-key[i, j], j))


@settings(max_examples=200, deadline=None)
@given(_problem(elements=st.floats(0.0, 1e-3)))
def test_property_oracle_scores_are_perfect(problem):
    noise, rel = problem
    rel = rel[rel.any(axis=1)]
    noise = noise[: rel.shape[0]]
    oracle = rel.astype(np.float64) + noise
    m = evaluate_scores(oracle, rel)
    assert m.acc == 1.0 and m.cover == 1.0 and m.n_skipped == 0
    assert evaluate_scores(oracle, rel, rank_by="abs").cover == 1.0


@settings(max_examples=200, deadline=None)
@given(_problem(unique=True), st.sampled_from(["score", "abs"]), st.one_of(st.none(), st.integers(1, 12)),
       st.randoms(use_true_random=False))
def test_property_permuting_training_columns_leaves_metrics_unchanged(problem, rank_by, k, rnd):
    scores, rel = problem
    key = np.abs(scores) if rank_by == "abs" else scores
    assume(len(np.unique(key)) == key.size)  # no ties under this ranking
    perm = list(range(scores.shape[1]))
    rnd.shuffle(perm)
    a = evaluate_scores(scores, rel, rank_by=rank_by, k=k)
    b = evaluate_scores(scores[:, perm], rel[:, perm], rank_by=rank_by, k=k)
    assert a.acc == b.acc
    assert a.cover == pytest.approx(b.cover)
    np.testing.assert_array_equal(a.per_test_hit, b.per_test_hit)
    np.testing.assert_allclose(a.per_test_cover, b.per_test_cover)
    # the ranking maps through the permutation
    np.testing.assert_array_equal(np.asarray(perm)[rank_training(scores[:, perm], rank_by)],
                                  rank_training(scores, rank_by))
