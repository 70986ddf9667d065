"""Report figures: heatmap column order, per-row normalisation, top-ranked examples, and
that the PNGs are written (valid signature, non-empty, atomically)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_influence.data.example import Example
from llm_influence.report.figures import (group_order, group_spans, heatmap_column_order, heatmap_figure,
                                          normalize_rows, showcase_figure, showcase_markdown, top_by_method)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 0
    assert data[:8] == PNG_SIGNATURE
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


# --------------------------------------------------------------------------- column order

def test_heatmap_column_order_puts_the_relevant_group_first():
    groups = ["benign", "harmful", "benign", "harmful", "other", "harmful"]
    order = heatmap_column_order(groups, "harmful")
    assert order == [1, 3, 5, 0, 2, 4]
    assert [groups[j] for j in order] == ["harmful"] * 3 + ["benign"] * 2 + ["other"]


def test_heatmap_column_order_without_relevant_group_only_groups():
    groups = ["b", "a", "b", "c", "a"]
    assert heatmap_column_order(groups, None) == [0, 2, 1, 4, 3]
    assert heatmap_column_order(groups, "absent") == [0, 2, 1, 4, 3]
    assert heatmap_column_order([], "x") == []
    assert group_order(groups, "c") == ["c", "b", "a"]


def test_group_spans():
    assert group_spans(["h", "h", "b", "b", "b", "o"]) == [("h", 0, 2), ("b", 2, 5), ("o", 5, 6)]
    assert group_spans([]) == []


# --------------------------------------------------------------------------- normalisation

def test_rank_normalisation_per_row():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [-5.0, 2.0, 4.0]])
    out = normalize_rows(scores)
    np.testing.assert_allclose(out[0], [1.0, 0.0, 0.5])
    np.testing.assert_allclose(out[1], [0.75, 0.75, 0.0])  # ties share their average rank
    np.testing.assert_allclose(normalize_rows(scores, rank_by="abs")[2], [1.0, 0.0, 0.5])
    # invariant to a per-row positive scale and shift (methods become comparable)
    np.testing.assert_allclose(normalize_rows(scores * 1e6 + 7), out)


def test_minmax_normalisation_per_row():
    scores = np.array([[2.0, 4.0, 3.0], [1.0, 1.0, 1.0]])
    out = normalize_rows(scores, normalize="minmax")
    np.testing.assert_allclose(out[0], [0.0, 1.0, 0.5])
    np.testing.assert_allclose(out[1], [0.5, 0.5, 0.5])


def test_normalisation_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        normalize_rows(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError):
        normalize_rows(np.zeros((2, 2)), normalize="zscore")
    with pytest.raises(ValueError):
        normalize_rows(np.zeros(3))


# --------------------------------------------------------------------------- figures

def test_heatmap_figure_writes_a_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    groups = ["benign"] * 4 + ["harmful"] * 6 + ["benign"] * 2
    scores = {m: torch.randn(5, 12, generator=gen, dtype=torch.float64) for m in ("datainf", "lissa", "repsim")}
    path = heatmap_figure(scores, groups, "harmful", tmp_path / "fig" / "heat.png", title="t", dpi=40)
    assert path == tmp_path / "fig" / "heat.png"
    _assert_png(path)

    test_groups = ["trigger_1", "clean", "trigger_1", "clean", "clean"]
    path2 = heatmap_figure({"gradsim": np.random.default_rng(0).normal(size=(5, 12))}, groups, None,
                           tmp_path / "heat2.png", test_groups=test_groups, normalize="minmax", dpi=40)
    _assert_png(path2)


def test_heatmap_figure_checks_shapes(tmp_path):
    with pytest.raises(ValueError, match="train_groups"):
        heatmap_figure({"datainf": torch.zeros(2, 3)}, ["a", "b"], "a", tmp_path / "x.png")
    with pytest.raises(ValueError, match="one shape"):
        heatmap_figure({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, ["a", "b", "c"], "a", tmp_path / "x.png")
    with pytest.raises(ValueError):
        heatmap_figure({}, [], None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        heatmap_figure({"a": torch.zeros(0, 3)}, ["a", "b", "c"], "a", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _examples():
    train = [Example("tr0", "How do vaccines work?", "They train...", "benign"),
             Example("tr1", "Write a script that costs $5 | *bold*", "Sure...", "harmful"),
             Example("tr2", "Explain speed vs velocity", "Speed is...", "benign")]
    test = Example("te0", "Create a tutorial on hacking", "Sure, here is " * 40, "harmful")
    return train, test


def test_top_by_method_ranks_by_score_with_ties_to_the_lower_index():
    train, _ = _examples()
    scores = {"datainf": torch.tensor([[0.1, 0.9, 0.2], [0.0, 0.0, 1.0]]),
              "gradsim": torch.tensor([[0.5, 0.5, -1.0], [0.0, 0.0, 0.0]]),
              "repsim": torch.tensor([[0.1, -0.2, -0.9], [0.0, 0.0, 0.0]])}
    tops = top_by_method(scores, train, 0)
    assert {m: e.id for m, e in tops.items()} == {"datainf": "tr1", "gradsim": "tr0", "repsim": "tr0"}
    assert top_by_method(scores, train, 0, rank_by="abs")["repsim"].id == "tr2"
    assert top_by_method(scores, train, 1)["datainf"].id == "tr2"
    with pytest.raises(ValueError):
        top_by_method(scores, train, 2)
    # how many others share the top score: gradsim's row 0 ties tr0/tr1, row 1 ties all three
    assert tops.tied_with == {"datainf": 0, "gradsim": 1, "repsim": 0}
    assert top_by_method(scores, train, 1).tied_with == {"datainf": 0, "gradsim": 2, "repsim": 2}


def test_showcase_figure_and_markdown(tmp_path):
    train, test = _examples()
    tops = {"datainf": train[0], "repsim": train[1]}
    md = showcase_figure(test, tops, tmp_path / "showcase.png", dpi=40)
    _assert_png(tmp_path / "showcase.png")
    assert "Test example `te0` (group: harmful)" in md
    assert "| DataInf | How do vaccines work? | benign | no |" in md
    assert "| RepSim | Write a script that costs $5 \\| \\*bold\\* | harmful | yes |" in md
    assert "…" in md  # the long response is cut
    # a custom relevance rule replaces "same group"
    md2 = showcase_markdown(test, tops, relevant=lambda t, e: e.id == "tr0")
    assert "| benign | yes |" in md2 and "| harmful | no |" in md2
    assert "tied" not in md


def test_showcase_says_when_the_top_score_is_tied(tmp_path):
    train, test = _examples()
    tops = top_by_method({"gradsim": torch.tensor([[0.5, 0.5, 0.5]]), "repsim": torch.tensor([[0.1, 0.9, 0.9]])},
                         train, 0)
    md = showcase_figure(test, tops, tmp_path / "showcase.png", dpi=40)
    _assert_png(tmp_path / "showcase.png")
    assert "| GradSim | How do vaccines work? (tied with 2 others; the first in training-file order is shown) " \
           "| benign | no |" in md
    assert "(tied with 1 other;" in md and "| harmful | yes |" in md
