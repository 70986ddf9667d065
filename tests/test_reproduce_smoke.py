"""``reproduce --profile smoke`` end to end: every task x method gets Acc and Cover in
[0, 1] consistent with its scores file, and the report and figures exist."""

from __future__ import annotations

import json

import pytest

from llm_influence.attribute import read_scores
from llm_influence.cli import main
from llm_influence.evaluation import evaluate_scores
from llm_influence.reproduce import DEFAULT_BENCHMARK_METHODS, PAPER_TASKS_ORDER
from llm_influence.rundir import RunDir


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("smoke")
    assert main(["reproduce", "--profile", "smoke", "--out", str(out), "--quiet", "--data-dir", str(data_dir)]) == 0
    return out


def test_every_task_and_method_has_metrics_in_range(smoke):
    results = json.loads((smoke / "results.json").read_text())
    assert list(results["tasks"]) == list(PAPER_TASKS_ORDER)
    for task, entry in results["tasks"].items():
        assert set(entry["methods"]) == set(DEFAULT_BENCHMARK_METHODS), task
        for method, m in entry["methods"].items():
            assert 0.0 <= m["acc"] <= 1.0 and 0.0 <= m["cover"] <= 1.0, (task, method)
            assert m["n_scored"] == entry["n_test"]


def test_metrics_recomputed_from_scores_files_match(smoke):
    results = json.loads((smoke / "results.json").read_text())
    for task in ("mixed-small", "backdoor-3"):
        entry = results["tasks"][task]
        run = RunDir(entry["run_dir"])
        t = run.load_task()
        relevant = [[te.group == tr.group for tr in t.train] for te in t.test]
        for method, m in entry["methods"].items():
            scores, meta = read_scores(run.scores_dir(entry["checkpoint"]) / f"{method}.safetensors")
            again = evaluate_scores(scores, relevant)
            assert (again.acc, again.cover) == (m["acc"], m["cover"])


def test_report_and_figures_exist(smoke):
    report = (smoke / "report.md").read_text()
    for heading in ("Table 2", "Table 3", "Table 4"):
        assert heading in report
    pngs = sorted((smoke / "figures").glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{png.name}" in report


def test_studies_are_included(smoke):
    results = json.loads((smoke / "results.json").read_text())
    report = (smoke / "report.md").read_text()
    for name in ("approximation", "model-size"):
        assert name in results["studies"]
        study = json.loads((smoke / f"{name}.json").read_text())
        assert study["study"] == name and study["profile"] == "smoke"
        for png in results["studies"][name]["figures"]:
            assert (smoke / png).read_bytes()[:4] == b"\x89PNG" and png in report


def test_the_html_explorer_holds_every_task_and_the_run_metrics(smoke):
    from llm_influence.report.html import extract_payload

    payload = extract_payload((smoke / "report.html").read_text(encoding="utf-8"))
    results = json.loads((smoke / "results.json").read_text())
    assert [t["name"] for t in payload["tasks"]] == list(results["tasks"])
    for task in payload["tasks"]:
        (checkpoint,) = [c for c in task["checkpoints"] if c["name"] == results["tasks"][task["name"]]["checkpoint"]]
        for method in checkpoint["methods"]:
            expected = results["tasks"][task["name"]]["methods"][method["name"]]
            assert method["acc"] == pytest.approx(expected["acc"]) and method["cover"] == pytest.approx(expected["cover"])
