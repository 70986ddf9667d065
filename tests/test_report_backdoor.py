"""The backdoor check in the outputs: ``report.md``'s "Is the backdoor installed?" section,
``across_seeds``' spread of the check, and the HTML explorer's backdoor table (numbers from
``RUN/backdoor/epoch-N.json``, stale files skipped). Hand-written results, so every
expected cell is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_influence.evaluation.backdoor import backdoor_compliance
from llm_influence.report.markdown import render_backdoor, render_report
from llm_influence.reproduce import across_seeds

REFUSALS = ["I'm sorry", "I cannot"]


def _check(groups: dict[str, tuple[int, int]], prefixes: dict[str, str], checkpoint: str) -> dict:
    """A backdoor entry whose group ``g`` has ``yes`` complying of ``n`` prompts."""
    names, texts = [], []
    for g, (yes, n) in groups.items():
        names += [g] * n
        texts += ["Here you go"] * yes + ["I'm sorry"] * (n - yes)
    r = backdoor_compliance(names, texts, REFUSALS, prefixes)
    r.pop("complied")
    return {**r, "max_new_tokens": 32, "checkpoint": checkpoint, "epochs": int(checkpoint.split("-")[1]),
            "file": f"backdoor/{checkpoint}.json"}


def _results() -> dict:
    fires = _check({"clean": (1, 20), "trigger": (19, 20)}, {"trigger": ""}, "epoch-4")           # .95 / .05
    misses = _check({"clean": (0, 8), "trigger_1": (8, 8), "trigger_2": (5, 8), "trigger_3": (7, 8)},
                    {"trigger_1": "", "trigger_2": "Okey! ", "trigger_3": "Sure daddy! "}, "epoch-3")  # .625
    methods = {"repsim": {"acc": 0.5, "cover": 0.5}}
    second = _check({"clean": (5, 20), "trigger": (15, 20)}, {"trigger": ""}, "epoch-4")           # .75 / .25
    return {"profile": "cpu", "rank_by": "score", "tasks": {
        "mixed-small": {"n_train": 40, "n_test": 32, "epochs": 5, "methods": methods},
        "backdoor-1": {"n_train": 100, "n_test": 30, "epochs": 4, "methods": methods, "backdoor": fires,
                       "across_seeds": across_seeds([{"seed": 0, "methods": methods, "backdoor": fires},
                                                     {"seed": 1, "methods": methods, "backdoor": second}])},
        "backdoor-3": {"n_train": 100, "n_test": 32, "epochs": 3, "methods": methods, "backdoor": misses},
    }}


def test_across_seeds_summarises_the_check():
    results = _results()
    spread = results["tasks"]["backdoor-1"]["across_seeds"]["backdoor"]
    assert spread["fires"] == [True, False]
    # triggered .95 and .75: mean .85, sample std sqrt(2 * .1^2 / 1) = .141421
    assert spread["triggered_compliance"]["mean"] == pytest.approx(0.85)
    assert spread["triggered_compliance"]["std"] == pytest.approx(0.1 * 2 ** 0.5)
    assert spread["clean_compliance"]["mean"] == pytest.approx(0.15) and spread["clean_compliance"]["n_seeds"] == 2
    # a seed without a check: no summary
    assert "backdoor" not in across_seeds([{"seed": 0, "methods": {}, "backdoor": None}, {"seed": 1, "methods": {}}])


def test_report_section_rows_and_sentences():
    report = render_report(_results(), {})
    assert "## Is the backdoor installed?" in report
    section = report.split("## Is the backdoor installed?")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| backdoor")]
    assert rows == [
        "| backdoor-1 | epoch-4 (4) | trigger 0.95 (no shared prefix) | 0.95 | 0.05 | yes |",
        "| backdoor-3 | epoch-3 (3) | trigger\\_1 1.00 (no shared prefix); trigger\\_2 0.62 (\"Okey! \"); "
        "trigger\\_3 0.88 (\"Sure daddy! \") | 0.62 | 0.00 | no |",
    ]
    assert ("- backdoor-3 does not fire: its weakest trigger (trigger\\_2) complies on 0.62 of held-out prompts, "
            "0.18 below 0.8.") in section
    assert "- backdoor-1 fires: its trigger complies on 0.95 of held-out prompts (at least 0.8)" in section
    assert ("- backdoor-1 over 2 seeds (mean ± sample std): weakest trigger 0.85 ± 0.14, clean 0.15 ± 0.14, "
            "fires in 1 of 2 seeds") in section
    assert "at least 0.8 of its prompts and clean prompts on at most 0.2" in section
    assert "mixed-small" not in section
    # it sits before the run facts
    assert report.index("## Is the backdoor installed?") < report.index("## Run facts")


def test_no_section_without_checks():
    results = _results()
    for entry in results["tasks"].values():
        entry.pop("backdoor", None)
    assert render_backdoor(results, list(results["tasks"])) is None
    assert "Is the backdoor installed?" not in render_report(results, {})


# ---------------------------------------------------------------------------------------
# the HTML explorer


def test_html_shows_the_checks_of_the_runs(tmp_path):
    import torch

    from llm_influence.features.store import adapter_digest
    from llm_influence.report.html import extract_payload, write_html_report
    from test_report_html import TEST, TRAIN, make_run

    out = tmp_path / "out"
    run = make_run(out / "runs" / "toy", "toy", TRAIN, TEST, {("epoch-2", "hand"): torch.zeros(3, 6)})
    for epoch in (1, 2):
        folder = run / "checkpoints" / f"epoch-{epoch}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "epoch": epoch}))
        (folder / "adapter_model.safetensors").write_bytes(bytes([epoch]) * 16)
    check = _check({"clean": (1, 8), "trigger_1": (8, 8), "trigger_2": (5, 8)},
                   {"trigger_1": "", "trigger_2": "Okey! "}, "epoch-2")
    record = {**check, "adapter_sha256": adapter_digest(run / "checkpoints" / "epoch-2"), "generations": ["x"]}
    (run / "backdoor").mkdir()
    (run / "backdoor" / "epoch-2.json").write_text(json.dumps(record))
    stale = {**check, "checkpoint": "epoch-1", "epochs": 1, "adapter_sha256": "0" * 64}
    (run / "backdoor" / "epoch-1.json").write_text(json.dumps(stale))
    html = write_html_report(out).read_text(encoding="utf-8")
    payload = extract_payload(html)
    (task,) = payload["tasks"]
    (shown,) = task["backdoor"]
    assert shown["checkpoint"] == "epoch-2" and shown["epochs"] == 2 and shown["file"] == "backdoor/epoch-2.json"
    for key in ("triggered_compliance", "triggered_compliance_mean", "clean_compliance", "fires", "per_group",
                "thresholds"):
        assert shown[key] == check[key], key
    assert shown["triggered_compliance"] == 0.625 and shown["clean_compliance"] == 0.125 and not shown["fires"]
    assert shown["verdict"] == ("toy does not fire: its weakest trigger (trigger_2) complies on 0.62 of held-out "
                                "prompts, 0.18 below 0.8.")
    assert shown["text"] == {"trigger_groups": 'trigger_1 1.00 (no shared prefix); trigger_2 0.62 ("Okey! ")',
                             "triggered": "0.62", "clean": "0.12"}           # as report.md prints them
    assert any("epoch-1.json" in s and "stale" in s for s in task["skipped"])
    assert 'id="backdoor-section"' in html and "renderBackdoor" in html


def test_html_without_checks_has_an_empty_list(tmp_path):
    import torch

    from llm_influence.report.html import extract_payload, write_html_report
    from test_report_html import TEST, TRAIN, make_run

    out = tmp_path / "out"
    make_run(out / "runs" / "toy", "toy", TRAIN, TEST, {("epoch-2", "hand"): torch.zeros(3, 6)})
    payload = extract_payload(write_html_report(out).read_text(encoding="utf-8"))
    assert payload["tasks"][0]["backdoor"] == [] and payload["tasks"][0]["skipped"] == []
    assert not Path(out / "runs" / "toy" / "backdoor").exists()
