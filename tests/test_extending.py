"""The README's "add a method" example, run exactly as written: loaded with --plugin, run by
`attribute`, scored by `evaluate` with the Acc/Cover a hand computation gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llm_influence.attribute import read_scores
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


def _block_sims(test, train, blocks):
    return sum(test.flat(b).double() @ train.flat(b).double().T for b in blocks)


def test_readme_method_runs_through_attribute_and_evaluate(run, tmp_path, capsys):
    plugin = tmp_path / "my_methods.py"
    plugin.write_text(readme_method_example(), encoding="utf-8")
    assert main(["attribute", "--run", str(run), "--plugin", str(plugin), "--methods", "last-block-sim,gradsim",
                 "--method-arg", "last-block-sim.blocks=2", "--quiet"]) == 0
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0  # scores files carry everything
    out = capsys.readouterr().out
    assert "last-block-sim" in out

    metrics = json.loads((run / "metrics.json").read_text())["checkpoints"]["epoch-1"]
    assert set(metrics) == {"last-block-sim", "gradsim"}
    rd = RunDir(run)
    train = extract_features(rd, "epoch-1", "train", need={"grads"})
    test = extract_features(rd, "epoch-1", "test", need={"grads"})
    by_hand = _block_sims(test, train, train.blocks[-2:])
    task = rd.load_task()
    relevant = torch.tensor([[a.group == b.group for b in task.train] for a in task.test])
    expected = evaluate_scores(by_hand, relevant)
    assert metrics["last-block-sim"]["acc"] == pytest.approx(expected.acc)
    assert metrics["last-block-sim"]["cover"] == pytest.approx(expected.cover)
    scores, meta = read_scores(rd.scores_dir("epoch-1") / "last-block-sim.safetensors")
    torch.testing.assert_close(scores, by_hand, rtol=1e-12, atol=0)
    assert meta["arguments"] == {"blocks": 2}  # the --method-arg value, recorded
    all_blocks = _block_sims(test, train, train.blocks)
    assert metrics["gradsim"]["cover"] == pytest.approx(evaluate_scores(all_blocks, relevant).cover)


def test_method_arguments_and_source_are_part_of_the_cache_key(run, tmp_path):
    """Same arguments and code: reused. Another argument value, or an edited plugin file:
    recomputed (never the old scores)."""
    plugin = tmp_path / "my_methods.py"
    plugin.write_text(readme_method_example(), encoding="utf-8")
    path = RunDir(run).scores_dir("epoch-1") / "last-block-sim.safetensors"
    base = ["attribute", "--run", str(run), "--plugin", str(plugin), "--methods", "last-block-sim", "--quiet"]
    assert main(base + ["--method-arg", "last-block-sim.blocks=1"]) == 0
    one, meta_one = read_scores(path)
    assert main(base + ["--method-arg", "last-block-sim.blocks=1"]) == 0
    assert read_scores(path)[1]["key"] == meta_one["key"]  # reused
    assert main(base) == 0  # the default is 1 too: the same resolved arguments, reused
    assert read_scores(path)[1]["key"] == meta_one["key"]
    assert main(base + ["--method-arg", "last-block-sim.blocks=3"]) == 0
    assert read_scores(path)[1]["arguments"] == {"blocks": 3}
    # edit the plugin: same arguments, new code -> new scores
    edited = readme_method_example().replace("return out", "return 2 * out")
    assert edited != readme_method_example()
    plugin.write_text(edited, encoding="utf-8")
    assert main(base + ["--method-arg", "last-block-sim.blocks=1"]) == 0
    doubled, meta = read_scores(path)
    assert meta["key"] != meta_one["key"]
    torch.testing.assert_close(doubled, 2 * one, rtol=0, atol=0)


def test_method_arg_errors_name_the_flag(run, tmp_path, capsys):
    plugin = tmp_path / "my_methods.py"
    plugin.write_text(readme_method_example(), encoding="utf-8")
    base = ["attribute", "--run", str(run), "--plugin", str(plugin), "--methods", "last-block-sim,gradsim"]
    cases = [(["--method-arg", "last-block-sim.blocks=0"], "last-block-sim: blocks must be a positive integer"),
             (["--method-arg", "last-block-sim.block=2"], "last-block-sim has no argument 'block'"),
             (["--method-arg", "datainf.damping=0.1"], "datainf is not among the chosen methods"),
             (["--method-arg", "blocks=2"], "expected NAME.FIELD=VALUE"),
             (["--damping", "0.1"], "--damping: none of the chosen methods")]
    for extra, message in cases:
        status = main(base + extra)
        err = capsys.readouterr().err.strip()
        assert status == 2 and message in err and len(err.splitlines()) == 1, (extra, err)


def test_plugin_methods_appear_in_help(tmp_path, capsys):
    plugin = tmp_path / "my_methods.py"
    plugin.write_text(readme_method_example(), encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["attribute", "--plugin", str(plugin), "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "last-block-sim.blocks: how many of the last LoRA blocks to compare (default 1)" in out


def test_plugin_errors_are_one_line(run, tmp_path, capsys):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("x = 1\nraise RuntimeError('broken plugin')\n")
    for spec, message in ((str(bad), "bad_plugin.py:2: RuntimeError: broken plugin"),
                          (str(tmp_path / "missing.py"), "missing.py: no such file"),
                          ("no_such_module_xyz", "ModuleNotFoundError")):
        status = main(["attribute", "--run", str(run), "--plugin", spec])
        err = capsys.readouterr().err.strip()
        assert status == 2 and message in err and len(err.splitlines()) == 1, err


def test_evaluate_takes_no_plugin(run, capsys):
    """evaluate reads scores files only: --plugin would have no effect, so it is refused."""
    assert main(["evaluate", "--run", str(run), "--plugin", "x.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unrecognized arguments: --plugin x.py" in err and len(err.splitlines()) == 1
