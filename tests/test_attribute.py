"""The attribute stage end to end on tiny-llama: scores files, reuse, and scores that do
not depend on the extraction batch size."""

from __future__ import annotations

import json

import pytest
import torch

from llm_influence.attribute import AttributeArgs, _lr_per_epoch, attribute, read_scores
from llm_influence.cli import main
from llm_influence.config import TrainArgs
from llm_influence.data import Example, TaskData
from llm_influence.features.extract import extract_features
from llm_influence.methods import SCORE_CONVENTION, make_method
from llm_influence.models import LoraSpec
from llm_influence.rundir import RunDir
from llm_influence.training import finetune


def _task():
    train = [Example(f"t{i}", f"Question {i}: name colour {i % 2}?", ["red sky", "green grass"][i % 2] + f" {i}",
                     ["red", "green"][i % 2]) for i in range(6)]
    test = [Example(f"q{i}", f"Question {10 + i}: name colour {i}?", ["red sky", "green grass"][i], ["red", "green"][i])
            for i in range(2)]
    return TaskData("colours", train, test)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("attr") / "run"
    finetune(path, _task(), model_name="tiny-llama", lora=LoraSpec(r=2, alpha=8, dropout=0.0),
             args=TrainArgs(epochs=2, batch_size=3, lr=5e-3, max_length=48, seed=1))
    return path


ALL = ("gradsim", "gradsim-cos", "repsim", "datainf", "lissa", "exact", "exact-full", "ekfac", "tracin")


def test_scores_files_with_metadata_and_independent_recomputation(run):
    results = attribute(run, AttributeArgs(methods=ALL, checkpoint="last"))
    assert {r.method for r in results} == set(ALL)
    rd = RunDir(run)
    train = extract_features(rd, "epoch-2", "train", need={"grads", "reps", "kfac"})
    test = extract_features(rd, "epoch-2", "test", need={"grads", "reps"})
    for name in ("gradsim", "datainf", "exact", "repsim"):
        scores, meta = read_scores(run / "scores" / "epoch-2" / f"{name}.safetensors")
        assert scores.shape == (2, 6)
        assert meta["convention"] == SCORE_CONVENTION and meta["method"] == name
        assert meta["train_ids"] == [f"t{i}" for i in range(6)] and meta["test_ids"] == ["q0", "q1"]
        direct = make_method(name).fit(train).score(test)
        assert scores.dtype == torch.float64  # stored as computed: no float32 rounding, no new ties
        torch.testing.assert_close(scores, direct.double(), rtol=1e-12, atol=1e-15)
    # gradsim written out: <v, g_i> over all LoRA blocks
    g = torch.cat([train.flat(b) for b in train.blocks], 1).double()
    v = torch.cat([test.flat(b) for b in test.blocks], 1).double()
    scores, _ = read_scores(run / "scores" / "epoch-2" / "gradsim.safetensors")
    torch.testing.assert_close(scores.double(), v @ g.T, rtol=1e-5, atol=1e-9)
    _, meta = read_scores(run / "scores" / "epoch-2" / "exact.safetensors")
    assert meta["diagnostics"]["residual_max"] < 1e-8


def test_tracin_sums_checkpoints_weighted_by_learning_rate(run):
    attribute(run, AttributeArgs(methods=("tracin",), checkpoint="last"))
    scores, _ = read_scores(run / "scores" / "epoch-2" / "tracin.safetensors")
    rd = RunDir(run)
    lrs = _lr_per_epoch(rd)
    expected = torch.zeros(2, 6, dtype=torch.float64)
    for epoch in (1, 2):
        tr = extract_features(rd, f"epoch-{epoch}", "train", need={"grads"})
        te = extract_features(rd, f"epoch-{epoch}", "test", need={"grads"})
        g = torch.cat([tr.flat(b) for b in tr.blocks], 1).double()
        v = torch.cat([te.flat(b) for b in te.blocks], 1).double()
        expected += lrs[epoch] * (v @ g.T)
    assert lrs[1] > lrs[2] > 0  # linear decay
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-12)


def test_scores_are_reused_and_recomputed_when_arguments_change(run):
    first = attribute(run, AttributeArgs(methods=("datainf",)))
    again = attribute(run, AttributeArgs(methods=("datainf",)))
    assert again[0].reused
    changed = attribute(run, AttributeArgs(methods=("datainf",), method_args={"datainf": {"damping_ratio": 0.5}}))
    assert not changed[0].reused
    s_new, meta = read_scores(first[0].path)
    assert meta["arguments"]["damping_ratio"] == 0.5


def test_scores_do_not_depend_on_extraction_batch_size(tmp_path, run):
    import shutil

    other = tmp_path / "copy"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("features", "scores"))
    a = attribute(run, AttributeArgs(methods=("datainf", "exact", "repsim"), extract_batch_size=1, force=True))
    b = attribute(other, AttributeArgs(methods=("datainf", "exact", "repsim"), extract_batch_size=5, force=True))
    for ra, rb in zip(a, b):
        sa, _ = read_scores(ra.path)
        sb, _ = read_scores(rb.path)
        torch.testing.assert_close(sa, sb, rtol=2e-4, atol=1e-6)


def test_attribute_cli_prints_one_line_per_method(run, capsys):
    assert main(["attribute", "--run", str(run), "--methods", "gradsim,repsim", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split()[0] for l in lines] == ["gradsim", "repsim"]
    assert main(["attribute", "--run", str(run), "--methods", "nope", "--quiet"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["attribute", "--run", str(run), "--checkpoint", "epoch-9", "--quiet"]) == 2
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["attribute"]["methods"] == ["gradsim", "repsim"]
