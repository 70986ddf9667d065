"""Acc / Cover / ranking against hand-computed examples and independent reference loops."""

from __future__ import annotations

import itertools
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
    TIE_RULE,
    rank_training,
    relevance_from_task,
    tie_ranks,
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


def _reference_stable(scores: np.ndarray, rel: np.ndarray, rank_by: str = "score", k=None):
    """Acc/Cover per row of one concrete order: Python sort with the key (-value, index)."""
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
    return accs, covs


def _reference(scores: np.ndarray, rel: np.ndarray, rank_by: str = "score", k=None):
    """Expected Acc/Cover over a uniformly random order of ties, by brute force: the mean of
    the stable-order metrics over every permutation of the training columns (each tie order
    is produced equally often). Without ties there is one order and no enumeration."""
    n_train = scores.shape[1]
    key = np.abs(scores) if rank_by == "abs" else scores
    if all(len(np.unique(row)) == n_train for row in key):
        accs, covs = _reference_stable(scores, rel, rank_by, k)
        return sum(accs) / len(accs), sum(covs) / len(covs)
    assert n_train <= 7, "brute force over tie orders is for small cases"
    acc_sum = cover_sum = 0.0
    perms = list(itertools.permutations(range(n_train)))
    for perm in perms:
        accs, covs = _reference_stable(scores[:, perm], rel[:, perm], rank_by, k)
        acc_sum += sum(accs) / len(accs)
        cover_sum += sum(covs) / len(covs)
    return acc_sum / len(perms), cover_sum / len(perms)


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
    d = m.to_dict()
    assert {k: d[k] for k in ("acc", "cover", "n_scored", "n_skipped", "rank_by")} == {
        "acc": m.acc, "cover": m.cover, "n_scored": 3, "n_skipped": 0, "rank_by": "score"}
    assert d["ties"] == TIE_RULE
    assert d["acc_ci95"][0] <= m.acc <= d["acc_ci95"][1]
    assert d["cover_ci95"][0] <= m.cover <= d["cover_ci95"][1]


def test_rank_training_hand_computed():
    np.testing.assert_array_equal(
        rank_training(SCORES),
        [[0, 2, 3, 1, 4], [3, 0, 1, 2, 4], [0, 4, 1, 2, 3]],
    )


def test_rank_training_breaks_ties_toward_the_lower_index_and_tie_ranks_mark_them():
    s = np.array([[0.0, 5.0, 0.0, 5.0], [1.0, 1.0, 1.0, 1.0], [-0.0, 0.0, -0.0, 0.0]])
    np.testing.assert_array_equal(rank_training(s), [[1, 3, 0, 2], [0, 1, 2, 3], [0, 1, 2, 3]])
    np.testing.assert_array_equal(tie_ranks(s), [[1, 1, 3, 3], [1, 1, 1, 1], [1, 1, 1, 1]])
    # |-5| ties with |5|: still index order
    np.testing.assert_array_equal(rank_training(np.array([[5.0, -5.0, 1.0]]), rank_by="abs"), [[0, 1, 2]])
    np.testing.assert_array_equal(tie_ranks(np.array([[5.0, -5.0, 1.0]]), rank_by="abs"), [[1, 1, 3]])
    for _ in range(3):
        np.testing.assert_array_equal(rank_training(s), rank_training(s.copy()))


def test_ties_count_as_the_expected_value_over_their_order():
    s = np.array([[0.0, 5.0, 0.0, 5.0]])
    # the top run {1, 3} holds one relevant example: the hit is 1/2 whichever index it has
    assert acc(s, np.array([[0, 1, 0, 0]], dtype=bool)) == 0.5
    assert acc(s, np.array([[0, 0, 0, 1]], dtype=bool)) == 0.5
    # k = 3 cuts into the run {0, 2} (one more to take, 1 of 2 relevant): (1 + 1/2) / 3
    m = evaluate_scores(s, np.array([[1, 1, 0, 0]], dtype=bool), k=3)
    assert m.per_test_cover[0] == pytest.approx(1.5 / 3)
    # hand case: scores 3 > 1 = 1 = 1 > 0, relevant {1, 4}, k = 2: train 0 (miss) then one
    # of the three tied (1 relevant of 3): hit 0, cover (0 + 1/3) / 2
    m = evaluate_scores(np.array([[3.0, 1.0, 1.0, 1.0, 0.0]]), np.array([[0, 1, 0, 0, 1]], dtype=bool))
    assert m.acc == 0.0
    assert m.cover == pytest.approx(1 / 6)


def test_all_equal_scores_give_the_fraction_of_relevant_rows_in_either_file_order():
    # the mixed-small layout: 20 harmful rows first, then 20 benign; all 40 test rows harmful
    rel = np.zeros((40, 40), dtype=bool)
    rel[:, :20] = True
    for layout in (rel, rel[:, ::-1].copy()):
        m = evaluate_scores(np.zeros((40, 40)), layout)
        assert m.acc == 0.5 and m.cover == 0.5
        assert m.acc_ci95 == (0.5, 0.5)
    # 3 relevant of 10: both metrics are 0.3
    rel10 = np.zeros((2, 10), dtype=bool)
    rel10[:, [2, 5, 9]] = True
    m = evaluate_scores(np.full((2, 10), 7.0), rel10)
    assert m.acc == pytest.approx(0.3) and m.cover == pytest.approx(0.3)


def test_float32_scores_rank_like_their_float64_values():
    # a float32 cast of nearby float64 scores would create a tie; evaluating the float64
    # values keeps them apart (the attribute stage stores float64 for this reason)
    s64 = np.array([[1.0 + 1e-12, 1.0]])
    rel = np.array([[False, True]])
    assert evaluate_scores(s64, rel).acc == 0.0
    assert evaluate_scores(s64.astype(np.float32), rel).acc == 0.5


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
def _problem(draw, unique=False, elements=None, max_train=8):
    n_test = draw(st.integers(1, 6))
    n_train = draw(st.integers(1, max_train))
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
@given(_problem(elements=st.integers(-3, 3).map(float), max_train=6), st.sampled_from(["score", "abs"]),
       st.one_of(st.none(), st.integers(1, 12)))
def test_property_matches_brute_force_over_tie_orders(problem, rank_by, k):
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
    assume(len(np.unique(key)) == key.size)  # no ties under this ranking (ties: the next test)
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


@settings(max_examples=300, deadline=None)
@given(_problem(elements=st.sampled_from([-1.0, 0.0, 0.5, 1.0])), st.sampled_from(["score", "abs"]),
       st.one_of(st.none(), st.integers(1, 12)), st.randoms(use_true_random=False))
def test_property_permutation_invariance_with_many_ties(problem, rank_by, k, rnd):
    scores, rel = problem
    perm = list(range(scores.shape[1]))
    rnd.shuffle(perm)
    a = evaluate_scores(scores, rel, rank_by=rank_by, k=k)
    b = evaluate_scores(scores[:, perm], rel[:, perm], rank_by=rank_by, k=k)
    assert a.acc == pytest.approx(b.acc, abs=1e-12)
    assert a.cover == pytest.approx(b.cover, abs=1e-12)
    np.testing.assert_allclose(a.per_test_hit, b.per_test_hit, atol=1e-12)
    np.testing.assert_allclose(a.per_test_cover, b.per_test_cover, atol=1e-12)
    # tie ranks are a property of the scores, not of the column order
    np.testing.assert_array_equal(np.sort(tie_ranks(scores, rank_by), axis=1),
                                  np.sort(tie_ranks(scores[:, perm], rank_by), axis=1))
