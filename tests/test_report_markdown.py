"""report.md rendering: the paper's tables with our numbers, bold, dashes, paper columns,
omitted tasks, run facts, residuals; and the paper's numbers module."""

from __future__ import annotations

import math

import pytest

from llm_influence.report.markdown import (DASH, format_float, format_paper_percent, format_percent,
                                           format_seconds, md_escape, method_order, render_report, write_report)
from llm_influence.report.paper_numbers import PAPER_TABLES, paper_table_for_task, paper_value


def _task(methods: dict, **extra) -> dict:
    base = {"n_train": 40, "n_test": 20, "epochs": 6, "stopped_early": False, "train_loss": [2.5, 1.25, 0.5],
            "val_loss": [2.75, 1.5], "finetune_seconds": 300.0, "checkpoint": "epoch-6", "feature_seconds": 12.5}
    base.update(extra)
    base["methods"] = methods
    return base


def _results() -> dict:
    return {
        "profile": "cpu", "model": "smollm2-135m", "machine": "2-core x86_64 CPU, 24 GiB", "wall_seconds": 1234.5,
        "rank_by": "score", "started": "2025-01-02T03:04:05", "versions": {"torch": "2.13"},
        "tasks": {
            # Table 2: only mixed-small; LiSSA and GradSim missing; an extra method (exact) present.
            "mixed-small": _task({
                "datainf": {"acc": 0.9, "cover": 0.6, "seconds": 0.5, "n_scored": 20, "n_skipped": 0,
                            "diagnostics": {"residual_max": 1.2, "residual_mean": 0.4, "residual_count": 80,
                                            "damping": {"a": 1e-5, "b": 3e-4}}},
                "repsim": {"acc": 1.0, "cover": 0.55, "seconds": 0.1},
                "exact": {"acc": 0.9, "cover": 0.7, "seconds": 3.0,
                          "diagnostics": {"residual_max": 1e-12, "residual_mean": 3e-13}},
                "ekfac": {"acc": 0.35, "cover": 0.3, "seconds": 1.0},
            }, stopped_early=True),
            # Table 3: only math.
            "math": _task({"datainf": {"acc": 0.2, "cover": 0.15}, "gradsim": {"acc": 0.2, "cover": 0.1}}),
            # Table 4: backdoor-1 and backdoor-3; backdoor-5 absent.
            "backdoor-1": _task({
                "datainf": {"acc": 0.9, "cover": 0.612},
                "lissa": {"acc": 0.5, "cover": 0.4,
                          "diagnostics": {"residual_max": math.inf, "residual_mean": "Infinity", "iterations": 10}},
                "gradsim": {"acc": 0.7, "cover": 0.55},
                "repsim": {"acc": 1.0, "cover": 0.6},
            }),
            "backdoor-3": _task({"repsim": {"acc": 0.8, "cover": 0.5}}),
        },
    }


def _table(report: str, heading: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first pipe table after ``heading``: header cells and ``{row label: cells}``."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    block = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, rows = block[0], block[2:]
    return header, {row[0]: row for row in rows}


def _cell(report: str, heading: str, row: str, column: str) -> str:
    header, rows = _table(report, heading)
    return rows[row][header.index(column)]


# --------------------------------------------------------------------------- formatting

def test_percent_formatting():
    assert format_percent(0.9) == "90.0"
    assert format_percent(1) == "100.0"
    assert format_percent(0.0) == "0.0"
    assert format_percent(0.12345) == "12.3"
    assert format_percent(0.6789) == "67.9"
    for missing in (None, float("nan"), "n/a", math.inf):
        assert format_percent(missing) == DASH
    assert format_paper_percent(94) == "94.0"
    assert format_paper_percent(99.4) == "99.4"
    assert format_paper_percent(None) == DASH


def test_other_formatting():
    assert format_seconds(12.34) == "12.3 s"
    assert format_seconds(1234.5) == "20 min 34 s"
    assert format_seconds(7300) == "2 h 1 min"
    assert format_seconds(None) == DASH
    assert format_float(math.inf) == "∞"
    assert format_float("Infinity") == "∞"
    assert format_float(0.4) == "0.4"
    assert format_float(3e-13) == "3.00e-13"
    assert md_escape("a|b*c_d\ne") == "a\\|b\\*c\\_d e"


def test_method_order_puts_paper_methods_first():
    assert method_order(["zeta", "tracin", "repsim", "exact"]) == [
        "datainf", "lissa-paper", "lissa", "gradsim", "repsim", "exact", "tracin", "zeta"]


# --------------------------------------------------------------------------- tables

def test_bold_marks_the_best_value_per_column():
    report = render_report(_results(), {})
    h = "## Table 4"
    assert _cell(report, h, "RepSim", "Backdoor (1 trigger) Acc") == "**100.0**"
    assert _cell(report, h, "DataInf", "Backdoor (1 trigger) Acc") == "90.0"
    assert _cell(report, h, "GradSim", "Backdoor (1 trigger) Acc") == "70.0"
    assert _cell(report, h, "DataInf", "Backdoor (1 trigger) Cover") == "**61.2**"
    assert _cell(report, h, "RepSim", "Backdoor (1 trigger) Cover") == "60.0"
    # Table 2: Exact is the best Cover (an extra method competes too); Acc best is RepSim
    assert _cell(report, "## Table 2", "Exact", "Mixed (small) Cover") == "**70.0**"
    assert _cell(report, "## Table 2", "RepSim", "Mixed (small) Acc") == "**100.0**"
    assert _cell(report, "## Table 2", "DataInf", "Mixed (small) Acc") == "90.0"


def test_ties_are_all_bold_and_a_lone_value_is_not():
    report = render_report(_results(), {})
    assert _cell(report, "## Table 3", "DataInf", "MathQA Acc") == "**20.0**"
    assert _cell(report, "## Table 3", "GradSim", "MathQA Acc") == "**20.0**"
    assert _cell(report, "## Table 3", "DataInf", "MathQA Cover") == "**15.0**"
    # backdoor-3 has a single method: nothing to compare, no bold
    assert _cell(report, "## Table 4", "RepSim", "Backdoor (3 triggers) Acc") == "80.0"


def test_missing_methods_show_a_dash():
    report = render_report(_results(), {})
    header, rows = _table(report, "## Table 2")
    assert list(rows) == ["DataInf", "LiSSA (authors' recursion)", "LiSSA", "GradSim", "RepSim", "Exact", "EK-FAC"]
    ours = [i for i, h in enumerate(header) if h in ("Mixed (small) Acc", "Mixed (small) Cover")]
    assert [rows["LiSSA"][i] for i in ours] == [DASH, DASH]
    assert [rows["GradSim"][i] for i in ours] == [DASH, DASH]
    # the authors' released scores have no number for the solver lissa: a dash beside ours
    assert all(cell == DASH for cell in rows["LiSSA"][1:])
    assert _cell(report, "## Table 4", "DataInf", "Backdoor (3 triggers) Acc") == DASH


def test_paper_numbers_sit_next_to_ours_in_table_4():
    report = render_report(_results(), {})
    header, rows = _table(report, "## Table 4")
    acc = header.index("Backdoor (1 trigger) Acc")
    assert header[acc + 1] == "Backdoor (1 trigger) Acc (paper, Llama-2-7b-chat)"
    assert header[acc + 2] == "Backdoor (1 trigger) Cover"
    assert header[acc + 3] == "Backdoor (1 trigger) Cover (paper, Llama-2-7b-chat)"
    assert rows["DataInf"][acc + 1] == "94.0"
    assert rows["DataInf"][acc + 3] == "60.9"
    assert rows["RepSim"][acc + 1] == "100.0"
    assert rows["RepSim"][acc + 3] == "99.4"
    # the paper's LiSSA sits beside the same algorithm (lissa-paper), not beside the solver
    assert rows["LiSSA (authors' recursion)"][header.index("Backdoor (3 triggers) Acc (paper, Llama-2-7b-chat)")] == "31.0"
    assert rows["LiSSA"][header.index("Backdoor (3 triggers) Acc (paper, Llama-2-7b-chat)")] == DASH
    assert rows["GradSim"][header.index("Backdoor (3 triggers) Cover (paper, Llama-2-7b-chat)")] == "35.3"
    # paper columns are never bold, and methods the paper did not run have no paper number
    assert not any(cell.startswith("**") for row in rows.values() for cell in row[acc + 1::2])
    assert "not re-checked" in report


def test_absent_tasks_and_tables_are_omitted():
    report = render_report(_results(), {})
    header4, _ = _table(report, "## Table 4")
    assert not any("5 triggers" in h for h in header4)
    header3, _ = _table(report, "## Table 3")
    # no published numbers known for Table 3: only the authors' released scores, labelled
    assert header3 == ["Method", "MathQA Acc", "MathQA Acc (authors' released scores, Llama-2-7b-chat)",
                       "MathQA Acc (authors' released scores, Mistral-7B-Instruct-v0.3)", "MathQA Cover",
                       "MathQA Cover (authors' released scores, Llama-2-7b-chat)",
                       "MathQA Cover (authors' released scores, Mistral-7B-Instruct-v0.3)"]
    _, rows3 = _table(report, "## Table 3")
    assert rows3["GradSim"][header3.index("MathQA Cover (authors' released scores, Mistral-7B-Instruct-v0.3)")] == "74.9"
    assert rows3["LiSSA (authors' recursion)"][2:4] == ["100.0", DASH]
    header2, _ = _table(report, "## Table 2")
    assert not any("Mixed (large)" in h for h in header2)
    assert "Table 2 are not shown" in report

    only_backdoor = _results()
    only_backdoor["tasks"] = {"backdoor-1": only_backdoor["tasks"]["backdoor-1"]}
    report = render_report(only_backdoor, {})
    assert "## Table 4" in report
    assert "## Table 2" not in report and "## Table 3" not in report and "## Other tasks" not in report
    assert "Mixed (small)" not in report


def test_tasks_outside_the_paper_tables_get_their_own_table():
    results = _results()
    results["tasks"]["emotion"] = _task({"gradsim": {"acc": 0.25, "cover": 0.5}})
    report = render_report(results, {})
    assert _cell(report, "## Other tasks", "GradSim", "Emotion Acc") == "25.0"


# --------------------------------------------------------------------------- other sections

def test_header_run_facts_residuals_and_figures():
    report = render_report(_results(), {"Fig. 2 mixed-small": "figures/heatmap-mixed-small.png"})
    assert report.startswith("# Benchmark report\n")
    assert "- **Profile:** cpu" in report
    assert "- **Model:** smollm2-135m" in report
    assert "- **Machine:** 2-core x86\\_64 CPU, 24 GiB" in report
    assert "- **Wall time:** 20 min 34 s" in report

    header, rows = _table(report, "## Run facts")
    row = rows["Mixed (small)"]
    assert row[header.index("Train")] == "40"
    assert row[header.index("Test")] == "20"
    assert row[header.index("Epochs")] == "6"
    assert row[header.index("Stopped early")] == "yes"
    assert rows["MathQA"][header.index("Stopped early")] == "no"
    assert row[header.index("Train loss (first → last epoch)")] == "2.5 → 0.5"
    assert row[header.index("Val loss (first → last epoch)")] == "2.75 → 1.5"
    assert row[header.index("Fine-tuning")] == "5 min 0 s"
    assert row[header.index("Methods (sum)")] == "4.6 s"

    header, rows = _table(report, "## Method run times")
    assert rows["Exact"][header.index("Mixed (small)")] == "3.0 s"

    # residual rows are keyed by task; check the methods listed and the numbers
    lines = [line for line in report.split("## Inverse-Hessian solver residuals")[1].splitlines()
             if line.startswith("| ") and "Residual mean" not in line]
    methods = [[c.strip() for c in line.strip("|").split("|")][1] for line in lines]
    assert methods == ["DataInf", "Exact", "LiSSA"]  # RepSim/EK-FAC/GradSim have no residuals
    assert "| Mixed (small) | DataInf | 0.4 | 1.2 | 80 | 1.00e-05 … 3.00e-04 (2 blocks) |" in report
    assert "| Backdoor (1 trigger) | LiSSA | ∞ | ∞ |" in report

    assert "![Fig. 2 mixed-small](figures/heatmap-mixed-small.png)" in report
    assert report.endswith("\n")


def test_showcases_section_and_write_report(tmp_path):
    path = write_report(tmp_path / "report.md", _results(), {}, showcases={"Mixed (small), test 0": "| a | b |"})
    text = path.read_text(encoding="utf-8")
    assert text == render_report(_results(), {}, showcases={"Mixed (small), test 0": "| a | b |"})
    assert "## Top-ranked training examples (the paper's Fig. 1)" in text
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary file left


# --------------------------------------------------------------------------- paper numbers

def test_paper_numbers_table_4_and_released_scores():
    assert paper_value(4, "datainf", "backdoor-1") == (94.0, 60.9)
    # the paper's LiSSA is the authors' recursion: keyed lissa-paper, not the solver lissa
    assert paper_value(4, "lissa-paper", "backdoor-5") == (16.3, 16.6)
    assert paper_value(4, "lissa", "backdoor-5") is None
    assert PAPER_TABLES[4].results[0].model == "Llama-2-7b-chat"
    assert paper_value(4, "gradsim", "backdoor-3") == (37.0, 35.3)
    assert paper_value(4, "repsim", "backdoor-5") == (90.3, 40.5)
    assert paper_value(4, "exact", "backdoor-1") is None
    # Tables 2-3: no published number, only the authors' released scores (never paper_value)
    assert paper_value(2, "datainf", "mixed-small") is None
    for number in (2, 3):
        assert all(res.kind == "released-scores" and res.rank_by == "score" for res in PAPER_TABLES[number].results)
        assert "could not be read" in PAPER_TABLES[number].note
    llama = {res.model: res for res in PAPER_TABLES[2].results}["Llama-2-7b-chat"]
    assert llama.values["datainf"]["mixed-small"] == (90.0, 61.4)
    mistral = {res.model: res for res in PAPER_TABLES[3].results}["Mistral-7B-Instruct-v0.3"]
    assert mistral.values["gradsim"]["math"] == (94.0, 74.9) and "lissa-paper" not in mistral.values
    assert "grammars" not in str(PAPER_TABLES[3].results)  # the released grammars data are v2: grammars-rule
    assert paper_table_for_task("harmfulcheck").number == 3
    assert paper_table_for_task("emotion") is None
    # every recorded number is a percentage
    for table in PAPER_TABLES.values():
        for res in table.results:
            for cells in res.values.values():
                for task, (acc, cover) in cells.items():
                    assert task in table.tasks
                    assert 0.0 <= acc <= 100.0 and 0.0 <= cover <= 100.0


@pytest.mark.parametrize("bad", [{"tasks": []}, {"tasks": "x"}])
def test_bad_tasks_raise(bad):
    with pytest.raises(ValueError):
        render_report(bad, {})


def test_both_rankings_are_shown_and_labelled():
    """Each method's other_ranking (|IF| beside -IF) gets its own labelled copy of every table."""
    results = _results()
    assert "The same tables, ranked by" not in render_report(results, {})  # nothing to show without it
    ms = results["tasks"]["mixed-small"]["methods"]
    ms["datainf"]["other_ranking"] = {"rank_by": "abs", "acc": 0.25, "acc_ci95": [0.1, 0.45], "cover": 0.3,
                                      "cover_ci95": [0.2, 0.4]}
    ms["repsim"]["other_ranking"] = {"rank_by": "abs", "acc": 1.0, "acc_ci95": [1.0, 1.0], "cover": 0.55,
                                     "cover_ci95": [0.5, 0.6]}
    report = render_report(results, {})
    assert "## The same tables, ranked by |score| (|IF|, the paper's text and its ICLR-era code)" in report
    assert "The tables above rank training examples by score (−IF, the paper's v2 code)" in report
    heading = "### Table 2: Harmful data identification (ranked by abs)"
    assert _cell(report, heading, "DataInf", "Mixed (small) Acc") == "25.0 [10.0, 45.0]"
    assert _cell(report, heading, "RepSim", "Mixed (small) Cover") == "**55.0 [50.0, 60.0]**"
    # the first table keeps the primary ranking's numbers
    assert _cell(report, "## Table 2", "DataInf", "Mixed (small) Acc").startswith("90.0")
