"""Progress bars and status lines go to stderr and end with a summary naming the outputs;
--quiet silences them without changing the results."""

from __future__ import annotations

import pytest
import torch

from llm_influence.attribute import read_scores

from llm_influence.cli import main
from llm_influence.data import Example
from llm_influence.rundir import write_examples


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quiet")
    groups = ["red", "green"]
    write_examples(folder / "train.jsonl", [Example(f"t{i}", f"Question {i}: colour {i % 2}?", f"{groups[i % 2]} {i}",
                                                    groups[i % 2]) for i in range(4)])
    write_examples(folder / "test.jsonl", [Example(f"q{i}", f"Question {9 + i}: colour {i}?", groups[i], groups[i])
                                           for i in range(2)])
    return folder


def _run(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out, captured.err


def test_quiet_silences_stderr_and_results_are_the_same(task_dir, tmp_path, capsys):
    finetune = ["finetune", "--task", f"jsonl:{task_dir}", "--profile", "smoke", "--epochs", "1"]
    _, err = _run(finetune + ["--out", str(tmp_path / "loud")], capsys)
    assert "epoch 1/1" in err  # the training progress bar
    assert err.strip().splitlines()[-1].startswith("fine-tuned tiny-llama") and str(tmp_path / "loud") in err
    _, err = _run(finetune + ["--out", str(tmp_path / "quiet"), "--quiet"], capsys)
    assert err == ""

    _, err = _run(["attribute", "--run", str(tmp_path / "loud"), "--methods", "gradsim,repsim"], capsys)
    assert "train features" in err and err.strip().splitlines()[-1] == f"scores in {tmp_path / 'loud'}/scores/"
    _, err = _run(["attribute", "--run", str(tmp_path / "quiet"), "--methods", "gradsim,repsim", "--quiet"], capsys)
    assert err == ""

    out_loud, _ = _run(["evaluate", "--run", str(tmp_path / "loud"), "--quiet"], capsys)
    out_quiet, err = _run(["evaluate", "--run", str(tmp_path / "quiet"), "--quiet"], capsys)
    def without_seconds(table: str) -> list[list[str]]:  # the seconds column is a wall-clock time
        rows = [line.split("│") for line in table.splitlines()]
        return [r[:-3] + r[-2:] if len(r) >= 6 else r for r in rows]

    out_quiet = out_quiet.replace(str(tmp_path / "quiet"), str(tmp_path / "loud"))
    assert err == "" and without_seconds(out_loud) == without_seconds(out_quiet)
    assert "Acc" in out_loud and "gradsim" in out_loud
    for method in ("gradsim", "repsim"):  # the tensors, bitwise (the metadata holds timings)
        loud, _ = read_scores(tmp_path / "loud" / "scores" / "epoch-1" / f"{method}.safetensors")
        quiet, _ = read_scores(tmp_path / "quiet" / "scores" / "epoch-1" / f"{method}.safetensors")
        assert torch.equal(loud, quiet)
