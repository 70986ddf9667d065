"""NaN/Inf is detected where it appears, reported with the stage and example ids, and never
written into a checkpoint, a scores file or a table (issue 8, item 4)."""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from llm_influence.cli import main
from llm_influence.config import TrainArgs
from llm_influence.data import Example, TaskData
from llm_influence.errors import UserError
from llm_influence.models import LoraSpec
from llm_influence.training import finetune
from llm_influence.training.finetune import epoch_order

ft = importlib.import_module("llm_influence.training.finetune")  # the package exports a function of that name
ARGS = TrainArgs(epochs=2, batch_size=4, lr=3e-3, max_length=64, seed=7, eval_batch_size=8)
LORA = LoraSpec(r=4, alpha=32, dropout=0.0)


def _task() -> TaskData:
    colours = ["red", "green", "blue"]
    train = [Example(f"t{i}", f"Say the colour number {i % 3}.", colours[i % 3] + " it is.", colours[i % 3])
             for i in range(12)]
    test = [Example(f"v{i}", f"Name the colour number {i}.", colours[i] + " it is.", colours[i]) for i in range(3)]
    val = [Example(f"w{i}", f"Say the colour number {i}.", colours[i] + " it is.", colours[i]) for i in range(3)]
    return TaskData("colours", train, test, val=val)


def _checkpoints(run: Path) -> list[str]:
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _patch_loss(monkeypatch, poison):
    """Replace the training module's per-example loss by ``poison(losses, logits, call)``."""
    real = ft.per_example_loss
    calls = {"train": 0}

    def patched(logits, labels):
        losses = real(logits, labels)
        if torch.is_grad_enabled():
            calls["train"] += 1
        return poison(losses, logits, calls["train"] if torch.is_grad_enabled() else None)

    monkeypatch.setattr(ft, "per_example_loss", patched)


def test_nan_training_loss_names_epoch_step_and_example(tmp_path, monkeypatch):
    # NaN for the 2nd example of the 2nd batch of epoch 1 (training forward passes only).
    def poison(losses, logits, call):
        if call == 2:
            losses = losses.clone()
            losses[1] = float("nan")
        return losses

    _patch_loss(monkeypatch, poison)
    with pytest.raises(UserError) as info:
        finetune(tmp_path / "run", _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    culprit = _task().train[epoch_order(12, ARGS.seed, 1)[4 + 1]].id
    assert str(info.value) == (f"fine-tuning, epoch 1 step 2: non-finite training loss for example(s) '{culprit}'; "
                               "lower --lr (in a new --out directory)")
    assert _checkpoints(tmp_path / "run") == ["epoch-0"]  # nothing after the NaN is saved


def test_nan_gradient_with_finite_loss_is_caught_before_the_step(tmp_path, monkeypatch):
    # d/dx sqrt(x) at 0 is inf, times 0: the loss stays finite, every gradient is NaN.
    def poison(losses, logits, call):
        return losses + torch.sqrt(logits.sum() * 0.0) if call == 3 else losses

    _patch_loss(monkeypatch, poison)
    with pytest.raises(UserError) as info:
        finetune(tmp_path / "run", _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    order = epoch_order(12, ARGS.seed, 1)
    batch = ", ".join(repr(_task().train[i].id) for i in order[8:12])
    assert str(info.value) == (f"fine-tuning, epoch 1 step 3: non-finite gradient (norm nan) for the batch of "
                               f"example(s) {batch}; lower --lr (in a new --out directory)")
    assert _checkpoints(tmp_path / "run") == ["epoch-0"]


def test_nan_validation_loss_names_the_validation_example(tmp_path, monkeypatch):
    def poison(losses, logits, call):
        if call is None and len(losses) == 3:  # the validation pass (3 test examples)
            losses = losses.clone()
            losses[2] = float("inf")
        return losses

    _patch_loss(monkeypatch, poison)
    with pytest.raises(UserError, match=r"^fine-tuning, initial validation loss: non-finite loss for example\(s\) "
                                        r"'w2'; the model or LoRA weights hold NaN/Inf"):
        finetune(tmp_path / "run", _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    assert _checkpoints(tmp_path / "run") == []


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """The last safety net: weights that became Inf in the last step of an epoch (no
    validation to notice it) stop the run before the checkpoint is written."""
    real_step = torch.optim.AdamW.step
    count = {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == 3:  # the last step of epoch 1
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    args = TrainArgs(**{**ARGS.__dict__, "validation": "none"})
    with pytest.raises(UserError, match=r"^fine-tuning, end of epoch 1: non-finite LoRA weights \(.*lora_A.*\); "
                                        r"not saved"):
        finetune(tmp_path / "run", _task(), model_name="tiny-llama", lora=LORA, args=args)
    assert _checkpoints(tmp_path / "run") == ["epoch-0"]


@pytest.mark.parametrize("lr, message", [
    ("1e37", "fine-tuning, epoch 1 step 2: non-finite training loss for example(s) "),
    ("1e38", "fine-tuning, epoch 1 step 1: the optimizer step overflowed (value cannot be converted to type float "
             "without overflow) at lr 1e+38; lower --lr (in a new --out directory)"),
])
def test_huge_learning_rate_via_the_cli(tmp_path, capsys, lr, message):
    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    task = _task()
    train.write_text("".join(json.dumps(e.__dict__) + "\n" for e in task.train))
    test.write_text("".join(json.dumps(e.__dict__) + "\n" for e in task.test))
    run = tmp_path / "run"
    status = main(["finetune", "--task", f"jsonl:{train},{test}", "--profile", "smoke", "--out", str(run), "--quiet",
                   "--lr", lr, "--max-grad-norm", "0"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("llm-influence: error: " + message)
    assert _checkpoints(run) == ["epoch-0"]
    for folder in (run / "checkpoints").iterdir():
        state = json.loads((folder / "trainer_state.json").read_text())
        assert all(math.isfinite(x) for x in (state["train_loss"], state["val_loss"]) if x is not None)


# --------------------------------------------------------------------------- scores and metrics

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    finetune(run, _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    return run


def test_nan_score_is_reported_and_not_written(trained, tmp_path, capsys, monkeypatch):
    from llm_influence.methods import get_method_class

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cls = get_method_class("gradsim")
    real = cls.score

    def score(self, test):
        out = real(self, test).clone()
        out[1, 5] = float("nan")
        return out

    monkeypatch.setattr(cls, "score", score)
    assert main(["attribute", "--run", str(run), "--methods", "exact,gradsim", "--quiet"]) == 2
    assert capsys.readouterr().err == ("llm-influence: error: gradsim at epoch-2: non-finite score for test 'v1' x "
                                       "train 't5' (1 entries); check the features for NaN/Inf\n")
    assert not (run / "scores" / "epoch-2" / "gradsim.safetensors").exists()


def test_nan_in_gradient_features_is_traced_to_the_training_example(trained, tmp_path, capsys, monkeypatch):
    import llm_influence.attribute as attribute_module

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    real = attribute_module.extract_features

    def extract(run_, checkpoint, split, **kw):
        features = real(run_, checkpoint, split, **kw)
        if split == "train" and features.grads:
            block = next(iter(features.grads))
            features.grads[block] = features.grads[block].clone()
            features.grads[block][7].view(-1)[0] = float("inf")
        return features

    monkeypatch.setattr(attribute_module, "extract_features", extract)
    assert main(["attribute", "--run", str(run), "--methods", "gradsim", "--quiet"]) == 2
    assert capsys.readouterr().err == ("llm-influence: error: gradsim at epoch-2: non-finite score for test 'v0' x "
                                       "train 't7' (3 entries); check the features for NaN/Inf\n")


def test_nan_in_a_scores_file_never_reaches_metrics(trained, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["attribute", "--run", str(run), "--methods", "gradsim,exact", "--quiet"]) == 0
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    before = (run / "metrics.json").read_bytes()
    path = run / "scores" / "epoch-2" / "gradsim.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        scores, meta = fh.get_tensor("scores").clone(), fh.metadata()
    scores[2, 3] = float("-inf")
    save_file({"scores": scores}, str(path), metadata=meta)  # e.g. a file edited or written by another tool
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llm-influence: error: {path}: ") and len(err.splitlines()) == 1
    assert err.endswith(": non-finite score -inf for test 'v2' x train 't3' (1 entries); not evaluated "
                        "(re-run `llm-influence attribute --force`)\n")
    assert (run / "metrics.json").read_bytes() == before  # the old table is kept, nothing non-finite written
