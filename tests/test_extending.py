"""The README's "add a method" example, run exactly as written: loaded with --plugin, run by
`attribute`, scored by `evaluate` with the Acc/Cover a hand computation gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llm_influence.cli import main
from llm_influence.config import TrainArgs
from llm_influence.data import Example, TaskData
from llm_influence.evaluation.metrics import evaluate_scores
from llm_influence.features.extract import extract_features
from llm_influence.models import LoraSpec
from llm_influence.rundir import RunDir
from llm_influence.training import finetune

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_method_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("**A method.**"):text.index("**A study.**")]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("extend") / "run"
    groups = ["red", "green", "blue"]
    train = [Example(f"t{i}", f"Question {i}: name colour {i % 3}?", f"{groups[i % 3]} thing {i}", groups[i % 3])
             for i in range(9)]
    test = [Example(f"q{i}", f"Question {20 + i}: name colour {i}?", f"{groups[i]} thing", groups[i])
            for i in range(3)]
    finetune(path, TaskData("colours3", train, test), model_name="tiny-llama",
             lora=LoraSpec(r=2, alpha=8, dropout=0.0), args=TrainArgs(epochs=1, batch_size=3, lr=5e-3, max_length=48))
    return path


@pytest.fixture(autouse=True)
def private_registry(monkeypatch):
    """The plugin's method is registered in a copy of the registry, gone after the test."""
    from llm_influence.methods import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


def test_readme_method_runs_through_attribute_and_evaluate(run, tmp_path, capsys):
    plugin = tmp_path / "my_methods.py"
    plugin.write_text(readme_method_example(), encoding="utf-8")
    assert main(["attribute", "--run", str(run), "--plugin", str(plugin), "--methods", "last-block-sim,gradsim",
                 "--quiet"]) == 0
    assert main(["evaluate", "--run", str(run), "--plugin", str(plugin), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "last-block-sim" in out

    metrics = json.loads((run / "metrics.json").read_text())["checkpoints"]["epoch-1"]
    assert set(metrics) == {"last-block-sim", "gradsim"}
    rd = RunDir(run)
    train = extract_features(rd, "epoch-1", "train", need={"grads"})
    test = extract_features(rd, "epoch-1", "test", need={"grads"})
    last = train.blocks[-1]
    by_hand = test.flat(last).double() @ train.flat(last).double().T
    task = rd.load_task()
    relevant = torch.tensor([[a.group == b.group for b in task.train] for a in task.test])
    expected = evaluate_scores(by_hand, relevant)
    assert metrics["last-block-sim"]["acc"] == pytest.approx(expected.acc)
    assert metrics["last-block-sim"]["cover"] == pytest.approx(expected.cover)
    # and it differs from the all-block gradsim on this run unless the rankings agree
    all_blocks = torch.cat([test.flat(b) for b in test.blocks], 1).double() @ \
        torch.cat([train.flat(b) for b in train.blocks], 1).double().T
    assert metrics["gradsim"]["cover"] == pytest.approx(evaluate_scores(all_blocks, relevant).cover)


def test_plugin_errors_are_one_line(run, tmp_path, capsys):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("x = 1\nraise RuntimeError('broken plugin')\n")
    for spec, message in ((str(bad), "bad_plugin.py:2: RuntimeError: broken plugin"),
                          (str(tmp_path / "missing.py"), "missing.py: no such file"),
                          ("no_such_module_xyz", "ModuleNotFoundError")):
        status = main(["evaluate", "--run", str(run), "--plugin", spec])
        err = capsys.readouterr().err.strip()
        assert status == 2 and message in err and len(err.splitlines()) == 1, err
