"""``reproduce`` on a backdoor task (smoke profile, two seeds, one method, no studies): each
seed's results entry carries the backdoor check of its final checkpoint, equal to the
numbers recomputed by hand from that run's ``RUN/backdoor/epoch-N.json``; ``across_seeds``
summarises the seeds; report.md and the HTML explorer show the same numbers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from llm_influence.cli import main
from llm_influence.evaluation.asr import is_jailbroken, load_refusal_strings


@pytest.fixture(scope="module")
def out(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("reproduce_backdoor")
    assert main(["reproduce", "--profile", "smoke", "--tasks", "backdoor-1", "--methods", "gradsim", "--studies", "",
                 "--seeds", "2", "--out", str(out), "--quiet", "--data-dir", str(data_dir)]) == 0
    return out


def _by_hand(run_dir: Path, check: dict, refusals: list[str]) -> dict[str, float]:
    stored = json.loads((run_dir / check["file"]).read_text())
    shares = {}
    for group in ("clean", "trigger"):
        texts = [t for t, g in zip(stored["generations"], stored["groups"]) if g == group]
        shares[group] = sum(is_jailbroken(t, refusals) for t in texts) / len(texts)   # backdoor-1: no prefix
    return shares


def test_every_seed_has_the_check_of_its_final_checkpoint(out, data_dir):
    results = json.loads((out / "results.json").read_text())
    entry = results["tasks"]["backdoor-1"]
    refusals = load_refusal_strings(data_dir)
    assert [s["seed"] for s in entry["seeds"]] == [0, 1]
    assert entry["backdoor"] == entry["seeds"][0]["backdoor"]
    for seed in entry["seeds"]:
        check, run_dir = seed["backdoor"], Path(seed["run_dir"])
        assert check["checkpoint"] == f"epoch-{seed['epochs']}" and check["epochs"] == seed["epochs"]
        assert check["file"] == f"backdoor/{check['checkpoint']}.json" and (run_dir / check["file"]).is_file()
        shares = _by_hand(run_dir, check, refusals)
        assert check["triggered_compliance"] == shares["trigger"] and check["clean_compliance"] == shares["clean"]
        assert check["fires"] == (shares["trigger"] >= 0.8 and shares["clean"] <= 0.2)
        assert check["per_group"]["trigger"]["prefix"] == "" and check["max_new_tokens"] == 32
        assert set(check) == {"triggered_compliance", "triggered_compliance_mean", "clean_compliance", "fires",
                              "thresholds", "per_group", "max_new_tokens", "checkpoint", "epochs", "file"}
    spread = entry["across_seeds"]["backdoor"]
    triggered = [s["backdoor"]["triggered_compliance"] for s in entry["seeds"]]
    assert spread["triggered_compliance"]["mean"] == pytest.approx(statistics.mean(triggered))
    assert spread["triggered_compliance"]["std"] == pytest.approx(statistics.stdev(triggered))
    assert spread["fires"] == [s["backdoor"]["fires"] for s in entry["seeds"]]
    assert "gradsim" in entry["across_seeds"]["methods"]                          # the Acc summary is kept


def test_report_and_explorer_show_the_check(out):
    from llm_influence.evaluation.backdoor import format_share, verdict
    from llm_influence.report.html import extract_payload

    entry = json.loads((out / "results.json").read_text())["tasks"]["backdoor-1"]
    check = entry["backdoor"]
    report = (out / "report.md").read_text()
    section = report.split("## Is the backdoor installed?")[1].split("\n## ")[0]
    assert (f"| backdoor-1 | {check['checkpoint']} ({check['epochs']}) | trigger "
            f"{format_share(check['triggered_compliance'])} (no shared prefix) | "
            f"{format_share(check['triggered_compliance'])} | {format_share(check['clean_compliance'])} | "
            f"{'yes' if check['fires'] else 'no'} |") in section
    assert verdict("backdoor-1", check) in section
    assert "over 2 seeds" in section
    payload = extract_payload((out / "report.html").read_text(encoding="utf-8"))
    task = next(t for t in payload["tasks"] if t["run_dir"] == entry["run_dir"])
    (shown,) = task["backdoor"]
    for key in ("triggered_compliance", "clean_compliance", "fires", "checkpoint", "epochs", "per_group"):
        assert shown[key] == check[key], key
