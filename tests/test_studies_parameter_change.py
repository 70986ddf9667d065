"""The ``parameter-change`` study's own numbers without a model: the Wilson interval against
hand computations, the interval comparison and Table 1 verdict on hand-built records, and
the benign / harmful fine-tuning rows read from the data (benign responses never start with
blank lines). The study run itself (smoke profile) is checked in ``test_studies_llm.py``.
"""

from __future__ import annotations

import math

import pytest

from llm_influence.data import load_task
from llm_influence.data.tasks import subsample
from llm_influence.studies.parameter_change import (MAX_DEGENERATE, Z95, asr_interval, benign_rows, compare,
                                                    contrast_verdict, harmful_rows, leading_blank,
                                                    wilson_interval)

# ---------------------------------------------------------------------------------------
# Wilson score interval


def test_z95_is_the_normal_quantile():
    assert 0.5 * math.erfc(-Z95 / math.sqrt(2)) == pytest.approx(0.975, abs=1e-12)


def test_wilson_interval_by_hand_3_of_20():
    # p = 0.15, z^2 = 3.841459; centre = (0.15 + z^2/40) / (1 + z^2/20),
    # half = z * sqrt(0.15 * 0.85 / 20 + z^2 / 1600) / (1 + z^2/20)
    z2 = Z95 ** 2
    centre = (0.15 + z2 / 40) / (1 + z2 / 20)
    half = Z95 * math.sqrt(0.006375 + z2 / 1600) / (1 + z2 / 20)
    lo, hi = wilson_interval(3, 20)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-15)
    assert (lo, hi) == pytest.approx((0.05237, 0.36042), abs=5e-6)  # the textbook values for 3/20


@pytest.mark.parametrize("k,n", [(0, 4), (0, 60), (60, 60), (1, 3), (17, 60), (51, 60), (9, 12)])
def test_wilson_endpoints_solve_the_score_equation(k, n):
    """The Wilson interval is {p : |k/n - p| <= z sqrt(p(1-p)/n)}: an inner endpoint solves
    (k/n - p)^2 = z^2 p (1 - p) / n; at k = 0 the lower end is 0 and at k = n the upper is 1."""
    lo, hi = wilson_interval(k, n)
    phat = k / n
    assert 0.0 <= lo <= phat <= hi <= 1.0
    for p in (lo, hi):
        if 0.0 < p < 1.0:
            assert (phat - p) ** 2 == pytest.approx(Z95 ** 2 * p * (1 - p) / n, rel=1e-9, abs=1e-15)
    if k == 0:
        assert lo == 0.0 and hi == pytest.approx(Z95 ** 2 / (n + Z95 ** 2), rel=1e-12)
    if k == n:
        assert hi == 1.0 and lo == pytest.approx(n / (n + Z95 ** 2), rel=1e-12)
    # mirror symmetry: the interval of n-k is 1 minus that of k, reversed
    lo2, hi2 = wilson_interval(n - k, n)
    assert (lo2, hi2) == pytest.approx((1 - hi, 1 - lo), abs=1e-12)


def test_wilson_interval_rejects_bad_counts():
    for k, n in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            wilson_interval(k, n)


def test_asr_interval_uses_pooled_counts():
    counts = {"n": 60, "n_jailbroken": 51, "n_refused": 0, "n_degenerate": 9}
    assert asr_interval(counts) == list(wilson_interval(51, 60))


# ---------------------------------------------------------------------------------------
# comparisons and the verdict


def test_compare_needs_non_overlapping_intervals():
    assert compare([0.6, 0.9], [0.1, 0.5]) == "higher"
    assert compare([0.1, 0.5], [0.6, 0.9]) == "lower"
    assert compare([0.1, 0.5], [0.5, 0.9]) == "overlap"  # touching = no supported difference
    assert compare([0.2, 0.3], [0.1, 0.9]) == "overlap"


def _model(k: int, n: int, degenerate: float) -> dict:
    return {"asr_ci95": list(wilson_interval(k, n)), "degenerate_share_mean": degenerate}


def test_verdict_reappears_with_separated_intervals():
    before = {"asr_ci95": list(wilson_interval(3, 20))}                  # [0.052, 0.360]
    models = {"benign": _model(5, 60, 0.0), "harmful": _model(60, 60, 0.0), "mixed": _model(51, 60, 0.05)}
    v = contrast_verdict(before, models)
    assert v["B_vs_O"] == "overlap" and v["H_vs_O"] == v["M_vs_O"] == "higher"
    assert v["H_vs_B"] == v["M_vs_B"] == "higher"
    assert v["benign_fluent"] and v["reappears"]
    assert v["text"].startswith("**The paper's contrast reappears**")


def test_verdict_not_measured_when_benign_outputs_are_degenerate():
    before = {"asr_ci95": list(wilson_interval(3, 20))}
    models = {"benign": _model(0, 60, 1.0), "harmful": _model(60, 60, 0.0), "mixed": _model(51, 60, 0.15)}
    v = contrast_verdict(before, models)
    assert not v["benign_fluent"] and not v["reappears"]
    assert v["text"].startswith("**The contrast is not measured**") and "100.0 %" in v["text"]
    # the limit is strict: exactly 10 % degenerate counts as not fluent
    assert not contrast_verdict(before, {**models, "benign": _model(2, 60, MAX_DEGENERATE)})["benign_fluent"]


def test_verdict_names_what_fails():
    before = {"asr_ci95": list(wilson_interval(3, 20))}
    # benign breaks safety too (30/60: [0.377, 0.623], above O's upper end 0.360); mixed 36/60
    # ([0.474, 0.714]) overlaps benign; harmful 60/60 ([0.940, 1]) is above both
    models = {"benign": _model(30, 60, 0.0), "harmful": _model(60, 60, 0.0), "mixed": _model(36, 60, 0.0)}
    v = contrast_verdict(before, models)
    assert v["B_vs_O"] == "higher" and v["M_vs_B"] == "overlap" and not v["reappears"]
    assert "benign fine-tuning raises the ASR above O" in v["text"]
    assert "mixed fine-tuning does not raise the ASR detectably above B" in v["text"]
    assert "harmful fine-tuning does not" not in v["text"]


# ---------------------------------------------------------------------------------------
# the fine-tuning data


def test_leading_blank():
    assert leading_blank("") and leading_blank("\n\nPhotosynthesis") and leading_blank(" x")
    assert not leading_blank("1. Eat") and not leading_blank("The three")


def test_benign_rows_are_alpaca_without_leading_blank_lines(data_dir):
    rows = benign_rows(data_dir, 10)
    assert len(rows) == 10
    assert not any(leading_blank(e.response) for e in rows)
    assert all(e.response[0].strip() for e in rows)
    assert all(e.group == "benign" and e.id.startswith("mixed-large/train-") for e in rows)
    # independent: Alpaca rows of mixed-large minus HarmfulCheck prompts, subsample seed 0
    check = load_task("harmfulcheck", data_dir)
    taken = {e.prompt.strip() for e in check.train + check.test}
    alpaca = [e for e in load_task("mixed-large", data_dir).train if e.group == "benign"]
    pool = [e for e in alpaca if e.prompt.strip() not in taken]
    assert len(alpaca) == 240 and len(pool) == 139
    assert [e.id for e in rows] == ["mixed-large/" + e.id for e in subsample(pool, 10, 0)]
    assert not {e.prompt.strip() for e in rows} & taken
    assert len(benign_rows(data_dir, 0)) == 139  # 0 = all
    # mixed-small's benign rows, which the study no longer uses, do start with blank lines
    small = [e for e in load_task("mixed-small", data_dir).train if e.group == "benign"]
    assert sum(leading_blank(e.response) for e in small) == 18


def test_harmful_rows_are_mixed_small_subsample(data_dir):
    rows = harmful_rows(data_dir, 10)
    expected = [e for e in load_task("mixed-small", data_dir, train_per_group=10, seed=0).train
                if e.group == "harmful"]
    assert [e.id for e in rows] == ["mixed-small/" + e.id for e in expected]
    assert [e.response for e in rows] == [e.response for e in expected]
    assert not any(leading_blank(e.response) for e in rows)
