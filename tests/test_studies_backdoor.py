"""Study ``backdoor-learning``: backdoor compliance and Acc/Cover at every checkpoint.

The trend rule (:func:`learning_trend`, :func:`pearson`, :func:`trend_sentence`) on
hand-made numbers; then the study under the ``smoke`` profile (tiny-llama on backdoor-1):
its compliance at the last checkpoint equals the ``reproduce`` check on the same run and an
independent generation counted by hand, its Acc/Cover equal
:func:`~llm_influence.studies.llm_runs.score_checkpoint`'s at every checkpoint, and its text
says what the numbers say.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llm_influence.studies import available_studies, run_study
from llm_influence.studies.backdoor_learning import METHODS, NAME, learning_trend, pearson, trend_sentence

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _epochs(compliance, acc, ci=None):
    return [{"epoch": i + 1, "backdoor": {"triggered_compliance": c},
             "methods": {"repsim": {"acc": a, "acc_ci95": (ci[i] if ci else None)}}}
            for i, (c, a) in enumerate(zip(compliance, acc))]


def test_pearson_by_hand():
    # x = [0, .5, 1], y = [.25, .5, 1]: sxy = .375, sxx = .5, syy = .291667 -> r = .375 / sqrt(.5 * .291667)
    assert pearson([0, 0.5, 1], [0.25, 0.5, 1.0]) == pytest.approx(0.375 / np.sqrt(0.5 * 0.2916666667), rel=1e-9)
    assert pearson([0, 0.5, 1], [0.25, 0.5, 1.0]) == pytest.approx(np.corrcoef([0, 0.5, 1], [0.25, 0.5, 1.0])[0, 1])
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2], [1, 2]) is None                      # fewer than 3 points
    assert pearson([1, 1, 1], [1, 2, 3]) is None                # constant
    with pytest.raises(ValueError):
        pearson([1, 2, 3], [1, 2])


def test_learning_trend_and_its_sentence():
    rises = learning_trend(_epochs([0.1, 0.5, 0.9], [0.2, 0.4, 0.9], [(0.0, 0.4), (0.2, 0.6), (0.7, 1.0)]), "repsim")
    assert rises == {"first_epoch": 1, "last_epoch": 3, "compliance_first": 0.1, "compliance_last": 0.9,
                     "trigger_learned": True, "acc_first": 0.2, "acc_last": 0.9, "direction": "rises",
                     "intervals_overlap": False, "correlation": pytest.approx(np.corrcoef([0.1, 0.5, 0.9],
                                                                                          [0.2, 0.4, 0.9])[0, 1])}
    text = trend_sentence("backdoor-1", rises, "RepSim")
    assert text.startswith("On backdoor-1 RepSim rises as the trigger gets learned: the weakest trigger's "
                           "compliance goes from 0.10 at epoch 1 to 0.90 at epoch 3, and RepSim's Acc goes from "
                           "0.200 at epoch 1 to 0.900 at epoch 3 (the 95 % intervals of the two checkpoints do not "
                           "overlap); over the checkpoints the correlation")
    falls = learning_trend(_epochs([0.2, 0.9], [0.8, 0.5], [(0.6, 1.0), (0.3, 0.7)]), "repsim")
    assert (falls["direction"], falls["trigger_learned"], falls["intervals_overlap"], falls["correlation"]) == \
        ("falls", True, True, None)
    assert "does not rise as the trigger gets learned: it falls" in trend_sentence("t", falls, "RepSim")
    assert "within bootstrap noise" in trend_sentence("t", falls, "RepSim")
    flat = learning_trend(_epochs([0.2, 0.9], [0.5, 0.5]), "repsim")
    assert flat["direction"] == "unchanged" and flat["intervals_overlap"] is None
    assert "its Acc is unchanged" in trend_sentence("t", flat, "RepSim")
    unlearned = learning_trend(_epochs([0.5, 0.5], [0.2, 0.9]), "repsim")
    assert not unlearned["trigger_learned"] and unlearned["direction"] == "rises"
    assert "the trigger is not being learned" in trend_sentence("t", unlearned, "RepSim")
    single = learning_trend(_epochs([0.5], [0.2]), "repsim")
    assert "single checkpoint" in trend_sentence("t", single, "RepSim")


# ---------------------------------------------------------------------------------------
# the study under the smoke profile


@pytest.fixture(scope="module")
def study(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("backdoor_learning")
    run_study(NAME, "smoke", out, data_dir=data_dir)
    return out, json.loads((out / f"{NAME}.json").read_text())


def test_registered_and_written(study):
    out, record = study
    assert NAME in available_studies()
    assert record["study"] == NAME and record["profile"] == "smoke" and record["figures"] == [f"{NAME}.png"]
    assert (out / f"{NAME}.png").read_bytes()[:8] == PNG_MAGIC
    assert f"]({NAME}.png)" in (out / f"{NAME}.md").read_text()
    json.dumps(record, allow_nan=False)


def test_every_checkpoint_has_compliance_and_every_method(study):
    _, record = study
    (task,) = record["data"]["tasks"]
    assert task["task"] == "backdoor-1" and task["epochs"] == [1, 2]          # smoke trains 2 epochs
    for p in task["per_epoch"]:
        b = p["backdoor"]
        assert b["checkpoint"] == p["checkpoint"] == f"epoch-{p['epoch']}" and b["epochs"] == p["epoch"]
        assert set(b["per_group"]) == {"clean", "trigger"}
        assert b["triggered_compliance"] == b["per_group"]["trigger"]["compliance"]
        assert b["clean_compliance"] == b["per_group"]["clean"]["compliance"]
        assert b["fires"] == (b["triggered_compliance"] >= 0.8 and b["clean_compliance"] <= 0.2)
        assert set(p["methods"]) == set(METHODS)
        for m in p["methods"].values():
            assert 0 <= m["acc"] <= 1 and 0 <= m["cover"] <= 1
            assert m["acc_ci95"][0] <= m["acc"] <= m["acc_ci95"][1]


def test_last_checkpoint_compliance_equals_the_reproduce_check_and_a_hand_count(study, data_dir):
    import torch

    from llm_influence.evaluation.asr import is_jailbroken, load_refusal_strings
    from llm_influence.models.formatting import ChatFormatter
    from llm_influence.models.generation import generate
    from llm_influence.reproduce import backdoor_entry
    from llm_influence.rundir import RunDir
    from llm_influence.training.load import load_finetuned

    _, record = study
    (task,) = record["data"]["tasks"]
    last = task["per_epoch"][-1]["backdoor"]
    run = RunDir(task["run_dir"])
    assert backdoor_entry(run, "epoch-2", str(data_dir)) == last
    # independent: generate with the last adapter, count compliance by hand
    data = run.load_task()
    held = [e for e in data.test if e.group in ("clean", "trigger")]
    common = os.path.commonprefix([e.response for e in data.train if e.group == "trigger"])
    prefix = common[:common.rfind(" ") + 1].strip() if " " in common else ""
    model, formatter, _ = load_finetuned(run, "epoch-2")
    with torch.no_grad():
        texts = generate(model, ChatFormatter(formatter.tokenizer, max_length=512), [e.prompt for e in held],
                         max_new_tokens=record["data"]["options"]["max_new_tokens"])
    refusals = load_refusal_strings(data_dir)
    flags = [bool(prefix and t.lstrip().startswith(prefix)) or is_jailbroken(t, refusals) for t in texts]
    share = {g: np.mean([f for f, e in zip(flags, held) if e.group == g]) for g in ("clean", "trigger")}
    assert last["triggered_compliance"] == pytest.approx(share["trigger"], abs=0)
    assert last["clean_compliance"] == pytest.approx(share["clean"], abs=0)
    stored = json.loads((run.path / last["file"]).read_text())
    assert stored["generations"] == texts and stored["complied"] == flags


def test_acc_equals_score_checkpoint(study):
    from llm_influence.rundir import RunDir
    from llm_influence.studies.llm_runs import method_spec, score_checkpoint

    _, record = study
    (task,) = record["data"]["tasks"]
    opts = record["data"]["options"]
    specs = [(m, *method_spec(m, opts["damping_ratio"])) for m in METHODS]
    for p in task["per_epoch"]:
        scored = score_checkpoint(RunDir(task["run_dir"]), p["checkpoint"], specs, rank_by=opts["rank_by"])
        for m in METHODS:
            for key in ("acc", "cover", "acc_ci95", "cover_ci95"):
                assert p["methods"][m][key] == scored[m][key], (p["checkpoint"], m, key)


def test_the_text_says_what_the_numbers_say(study):
    out, record = study
    (task,) = record["data"]["tasks"]
    md = (out / f"{NAME}.md").read_text()
    c = [p["backdoor"]["triggered_compliance"] for p in task["per_epoch"]]
    acc = [p["methods"]["repsim"]["acc"] for p in task["per_epoch"]]
    trend = task["trends"]["repsim"]
    assert (trend["compliance_first"], trend["compliance_last"], trend["acc_first"], trend["acc_last"]) == \
        (c[0], c[-1], acc[0], acc[-1])
    if c[-1] <= c[0]:
        assert "the trigger is not being learned" in md and not trend["trigger_learned"]
    elif acc[-1] > acc[0]:
        assert "RepSim rises as the trigger gets learned" in md
    else:
        assert "RepSim does not rise as the trigger gets learned" in md
    assert f"{acc[0]:.3f} at epoch 1 to {acc[-1]:.3f} at epoch 2" in md
    assert task["verdict_last"] in md
    rows = [line for line in md.splitlines() if line.startswith("| backdoor-1 |")]
    assert len(rows) == 2
    for row, p in zip(rows, task["per_epoch"]):
        cells = [x.strip() for x in row.strip("|").split("|")]
        assert cells[1] == str(p["epoch"]) and float(cells[2]) == pytest.approx(c[p["epoch"] - 1], abs=5e-4)
        assert cells[5].startswith(f"{p['methods']['repsim']['acc']:.3f} [")
