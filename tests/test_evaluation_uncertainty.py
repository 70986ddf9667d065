"""Bootstrap intervals and the across-seed summary, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_influence.evaluation import bootstrap_ci, evaluate_scores, seed_summary


def test_two_values_interval_is_the_resampled_means_range():
    # resampled means of {0, 1} with n = 2: 0 (p 1/4), 1/2 (p 1/2), 1 (p 1/4) -> the 2.5 %
    # and 97.5 % quantiles are 0 and 1
    assert bootstrap_ci([0.0, 1.0], n_resamples=4000, seed=3) == (0.0, 1.0)


def test_interval_width_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    hits = (rng.random(400) < 0.3).astype(float)
    low, high = bootstrap_ci(hits, n_resamples=4000)
    p = hits.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / hits.size)
    assert low == pytest.approx(p - half, abs=0.01) and high == pytest.approx(p + half, abs=0.01)


def test_interval_is_seeded_and_constant_samples_are_exact():
    values = [0.2, 0.9, 0.4, 1.0, 0.0]
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci([0.5] * 9) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, float("nan")])


def test_metrics_intervals_resample_the_per_test_values():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 12))
    rel = np.zeros((30, 12), dtype=bool)
    rel[:, :6] = True
    m = evaluate_scores(scores, rel)
    assert m.acc_ci95 == bootstrap_ci(m.per_test_hit)
    assert m.cover_ci95 == bootstrap_ci(m.per_test_cover)
    assert m.acc_ci95[0] <= m.acc <= m.acc_ci95[1]


def test_seed_summary_uses_the_sample_std():
    s = seed_summary([0.7, 0.8, 0.9])
    assert s["mean"] == pytest.approx(0.8) and s["std"] == pytest.approx(0.1)
    assert s["n_seeds"] == 3 and (s["min"], s["max"]) == (0.7, 0.9)
    assert seed_summary([0.5])["std"] is None
