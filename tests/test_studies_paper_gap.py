"""Study ``paper-gap``: one setting at a time toward the paper's (issue 14, item 5).

Every row is checked against an independent path on the same run: the baseline and factor
(a) against :func:`score_checkpoint` (baseline methods, ``lissa-paper``), factor (b)
against :func:`score_checkpoint` with ``rank_by="abs"`` (a fresh fit of the same methods),
(c)/(d)/(e) against their run's ``config.json`` and :func:`score_checkpoint` on that run, (f)
against the extraction stage's own middle-layer representations (on a copy of the run, so the
shared cache is untouched), and the deltas against factor minus baseline. One smoke study
(tiny-llama, backdoor-1, whose paper row exists) is shared by the module; the data directory
is needed (skipped without ``LLM_INFLUENCE_DATA``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llm_influence.errors import UserError
from llm_influence.studies import available_studies, run_study
from llm_influence.studies.llm_runs import method_spec, score_checkpoint
from llm_influence.studies.paper_gap import (FACTORS, METHODS, _finetune_override, compare, intervals_overlap,
                                             layer_representations, reference_rows)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASK = "backdoor-1"


@pytest.fixture(scope="module")
def study(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("paper-gap")
    result = run_study("paper-gap", "smoke", out, data_dir=data_dir, tasks=TASK)
    record = json.loads(result.json_path.read_text())
    task = record["data"]["tasks"][0]
    return out, result, record, task, {row["key"]: row for row in task["rows"]}


def _same(entry: dict, expected: dict) -> None:
    for key in ("acc", "cover", "acc_ci95", "cover_ci95", "n_scored"):
        assert entry[key] == expected[key], key


def test_registered_and_writes_json_markdown_png(study):
    out, result, record, task, rows = study
    assert "paper-gap" in available_studies()
    assert record["study"] == "paper-gap" and record["profile"] == "smoke"
    assert list(rows) == ["baseline", "a", "b", "c", "d", "e", "f"]
    assert (out / "paper-gap.png").read_bytes()[:8] == PNG_MAGIC
    md = result.markdown_path.read_text()
    assert "paper-gap.png" in md and "ours (baseline)" in md and "paper (published, Table 4)" in md
    for key in "abcdef":  # one computed statement per factor
        assert f"({key}) {rows[key]['setting']}: " in md


def test_baseline_equals_score_checkpoint_on_the_same_run(study):
    _, _, _, task, rows = study
    base = rows["baseline"]
    assert base["run"]["shared"] and Path(base["run"]["run_dir"]).name == TASK  # the run reproduce would make
    from llm_influence.rundir import RunDir

    run = RunDir(base["run"]["run_dir"])
    expected = score_checkpoint(run, "last", [(m, *method_spec(m, 0.1)) for m in METHODS])
    for m in METHODS:
        _same(base["cells"][m], expected[m])


def test_factor_a_equals_lissa_paper_scored_directly(study):
    _, _, _, _, rows = study
    from llm_influence.rundir import RunDir

    run = RunDir(rows["baseline"]["run"]["run_dir"])
    expected = score_checkpoint(run, "last", [("lp", *method_spec("lissa-paper", 0.1))])["lp"]
    a = rows["a"]["cells"]
    assert a["lissa"]["method"] == "lissa-paper" and a["lissa"]["applies"]
    _same(a["lissa"], expected)
    assert all(not a[m]["applies"] and a[m]["same_as"] == "baseline" for m in METHODS if m != "lissa")
    assert rows["a"]["run"] is None and rows["a"]["seconds"].get("finetune") is None  # no new fine-tune


def test_factor_b_equals_the_baseline_ranked_by_abs(study):
    _, _, _, _, rows = study
    from llm_influence.rundir import RunDir

    run = RunDir(rows["baseline"]["run"]["run_dir"])
    expected = score_checkpoint(run, "last", [(m, *method_spec(m, 0.1)) for m in METHODS], rank_by="abs")
    for m in METHODS:
        assert rows["b"]["cells"][m]["rank_by"] == "abs"
        _same(rows["b"]["cells"][m], expected[m])
    assert rows["b"]["run"] is None


@pytest.mark.parametrize("key,field,value",
                         [("c", "loss_on", "all-padded"), ("d", "max_length", 128), ("e", "epochs", 4)])
def test_finetune_factors_really_fine_tuned_with_the_change(study, key, field, value):
    _, _, _, _, rows = study
    from llm_influence.rundir import RunDir

    base_run = RunDir(rows["baseline"]["run"]["run_dir"])
    row = rows[key]
    run = RunDir(row["run"]["run_dir"])
    assert run.path != base_run.path and "paper-gap" in run.path.parts
    train, base_train = run.config()["finetune"]["train"], base_run.config()["finetune"]["train"]
    assert train[field] == value != base_train[field]
    changed = {k for k in train if train[k] != base_train[k]}
    assert changed == ({"epochs", "early_stopping"} if key == "e" else {field})  # one factor (e: no early stop)
    assert run.config()["task"]["test_ids"] == base_run.config()["task"]["test_ids"]
    assert row["run"]["same_test_examples"]
    if key == "e":
        assert row["run"]["epochs_trained"] == 4 and max(run.epochs()) == 4
    expected = score_checkpoint(run, "last", [(m, *method_spec(m, 0.1)) for m in METHODS])
    for m in METHODS:
        _same(row["cells"][m], expected[m])


def test_factor_c_counts_the_padding_it_added(study):
    """(c)'s ``padding`` facts are the pad tokens of the run's own encodings, and the report
    says how many rows had any."""
    from llm_influence.models import ChatFormatter, load_model
    from llm_influence.rundir import RunDir

    _, result, _, _, rows = study
    run = RunDir(rows["c"]["run"]["run_dir"])
    fmt = ChatFormatter(load_model("tiny-llama")[1], max_length=run.config()["finetune"]["train"]["max_length"],
                        loss_on="all-padded")
    task = run.load_task()
    for split, examples in (("train", task.train), ("test", task.test)):
        pads = [fmt.encode(e).n_pad for e in examples]
        facts = rows["c"]["padding"][split]
        assert facts["rows"] == len(pads) and facts["padded_rows"] == sum(n > 0 for n in pads)
        assert facts["mean_pad_tokens"] == pytest.approx(sum(pads) / len(pads))
    padded = rows["c"]["padding"]["train"]["padded_rows"]
    assert f"{padded} of {len(task.train)} training" in result.markdown_path.read_text()


def test_backdoor_check_of_every_fine_tuned_row(study, data_dir):
    """The baseline and each fine-tune factor carry the backdoor check of the checkpoint
    they scored, equal to the stand-alone check (which reuses its stored generations), and
    the run table shows it."""
    from llm_influence.evaluation.backdoor import run_backdoor_check
    from llm_influence.studies.paper_gap import _backdoor_cell

    _, result, _, _, rows = study
    md = result.markdown_path.read_text()
    for key in ("baseline", "c", "d", "e"):
        run = rows[key]["run"]
        entry = run["backdoor"]
        record = run_backdoor_check(run["run_dir"], "last", data_dir=data_dir)
        assert record["reused"] and entry["checkpoint"] == run["checkpoint"] == record["checkpoint"]
        for field in ("triggered_compliance", "clean_compliance", "fires", "epochs"):
            assert entry[field] == record[field], (key, field)
        assert entry["epochs"] == run["epochs_trained"]
        assert _backdoor_cell(entry) in md
    assert all(rows[key]["run"] is None for key in ("a", "b", "f"))


def test_factor_f_equals_the_extraction_stages_middle_layer(study, tmp_path):
    _, _, _, _, rows = study
    import torch

    from llm_influence.evaluation.metrics import evaluate_scores, relevance_from_task
    from llm_influence.features.extract import extract_features
    from llm_influence.methods import make_method
    from llm_influence.rundir import RunDir

    f = rows["f"]
    assert f["representation"]["n_decoder_layers"] == 2 and f["representation"]["rep_layer"] == 1  # tiny-llama
    copy = RunDir(shutil.copytree(rows["baseline"]["run"]["run_dir"], tmp_path / "run"))
    train = extract_features(copy, "last", "train", need={"reps"}, rep_layer=1)
    test = extract_features(copy, "last", "test", need={"reps"}, rep_layer=1)
    mine_train, mine_test, layer, _, _ = layer_representations(copy, "epoch-2", "middle", 8)
    assert layer == 1 and torch.equal(mine_train.reps, train.reps) and torch.equal(mine_test.reps, test.reps)
    method = make_method("repsim")
    method.fit(train)
    m = evaluate_scores(method.score(test).double(), relevance_from_task(copy.load_task()))
    assert f["cells"]["repsim"]["acc"] == m.acc and f["cells"]["repsim"]["cover"] == m.cover
    assert all(not f["cells"][x]["applies"] for x in METHODS if x != "repsim")


def test_deltas_are_factor_minus_baseline_and_overlaps_follow_the_intervals(study):
    _, _, _, task, rows = study
    base = rows["baseline"]["cells"]
    n_checked = 0
    for key in "abcdef":
        for m, c in rows[key]["cells"].items():
            if not c["applies"]:
                assert "acc" not in c
                continue
            for metric in ("acc", "cover"):
                assert c[f"delta_{metric}"] == c[metric] - base[m][metric]
                overlap = intervals_overlap(c[f"{metric}_ci95"], base[m][f"{metric}_ci95"])
                assert c[f"overlap_{metric}"] is overlap and c[f"moved_{metric}"] is (not overlap)
                lo, hi = c[f"delta_{metric}_ci95"]
                assert lo <= c[f"delta_{metric}"] + 1e-12 and c[f"delta_{metric}"] <= hi + 1e-12
                n_checked += 1
    assert n_checked == 2 * (1 + 5 + 5 * 3 + 1)
    moved = {(x["factor"], x["method"], x["metric"]) for x in task["moved"]}
    assert moved == {(k, m, metric) for k in "abcdef" for m, c in rows[k]["cells"].items() if c["applies"]
                     for metric in ("acc", "cover") if c[f"moved_{metric}"]}


def test_reference_rows_are_the_papers_numbers_as_fractions(study):
    _, _, _, task, _ = study
    from llm_influence.report.paper_numbers import paper_value

    ref = task["references"][0]
    assert ref["kind"] == "published"
    assert ref["cells"]["lissa"]["method"] == "lissa-paper"  # the paper's LiSSA is the authors' recursion
    for m in ("datainf", "lissa", "gradsim", "repsim"):
        acc, cover = paper_value(4, "lissa-paper" if m == "lissa" else m, TASK)
        assert ref["cells"][m]["acc"] == pytest.approx(acc / 100)
        assert ref["cells"][m]["cover"] == pytest.approx(cover / 100)
    assert ref["cells"]["exact"] is None
    released = reference_rows("mixed-small", METHODS)  # no published Table 2; the released scores instead
    assert released and all(r["kind"] == "released-scores" for r in released)


def test_compare_and_override_rules():
    base = {"acc": 0.5, "cover": 0.5, "acc_ci95": [0.4, 0.6], "cover_ci95": [0.4, 0.6],
            "per_test_acc": [0.0, 1.0], "per_test_cover": [0.5, 0.5]}
    new = {"acc": 1.0, "cover": 0.6, "acc_ci95": [1.0, 1.0], "cover_ci95": [0.6, 0.6],
           "per_test_acc": [1.0, 1.0], "per_test_cover": [0.6, 0.6]}
    c = compare(base, new, paired=True)
    assert c["delta_acc"] == 0.5 and c["moved_acc"] and not c["overlap_acc"]
    assert c["overlap_cover"] and not c["moved_cover"]  # touching intervals overlap
    assert c["delta_cover_ci95"] == pytest.approx([0.1, 0.1])
    assert compare(base, new, paired=False)["delta_acc_ci95"] is None
    args = {"loss_on": "response", "max_length": 128, "epochs": 15}
    opts = {"paper_max_length": 128, "paper_epochs": 15, "long_early_stopping": False}
    by_key = {f.key: f for f in FACTORS}
    assert _finetune_override(by_key["d"], args, opts)[0] == {}  # already the paper's: not applicable
    assert _finetune_override(by_key["e"], args, opts)[0] == {}
    assert _finetune_override(by_key["c"], args, opts)[0] == {"loss_on": "all-padded"}
    assert _finetune_override(by_key["e"], {**args, "epochs": 5}, opts)[0] == {"epochs": 15, "early_stopping": False}


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(UserError, match="factors"):
        run_study("paper-gap", "smoke", tmp_path, factors="a,z")
    with pytest.raises(UserError, match="rep_layer"):
        run_study("paper-gap", "smoke", tmp_path, rep_layer="top")
