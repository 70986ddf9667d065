"""LoRA fine-tuning: it learns, it is deterministic, and resume equals no interruption."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llm_influence.config import TrainArgs
from llm_influence.data import Example, TaskData
from llm_influence.errors import UserError
from llm_influence.models import LoraSpec
from llm_influence.training import finetune, lr_at
from llm_influence.training.finetune import _rising


def _task(n=12):
    train = [Example(f"t{i}", f"Say the colour number {i % 3}.", ["red", "green", "blue"][i % 3] + " it is.", str(i % 3))
             for i in range(n)]
    test = [Example(f"v{i}", f"Say the colour number {i}.", ["red", "green", "blue"][i] + " it is.", str(i))
            for i in range(3)]
    val = [Example(f"w{i}", f"Name the colour number {i}.", ["red", "green", "blue"][i] + " it is.", str(i))
           for i in range(3)]
    return TaskData("colours", train, test, val=val)


ARGS = TrainArgs(epochs=3, batch_size=4, lr=3e-3, max_length=64, seed=7, eval_batch_size=8)
LORA = LoraSpec(r=4, alpha=32, dropout=0.1)


def _adapter(run, epoch):
    return load_file(str(run / "checkpoints" / f"epoch-{epoch}" / "adapter_model.safetensors"))


def _epochs(run):
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"]


def test_finetune_lowers_training_loss(tmp_path):
    # tiny-llama is random, so LoRA goes on every linear layer to give it room to learn.
    lora = LoraSpec(r=8, alpha=16, dropout=0.0,
                    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    args = TrainArgs(epochs=6, batch_size=4, lr=1e-2, max_length=64, seed=0, early_stopping=False)
    result = finetune(tmp_path / "run", _task(), model_name="tiny-llama", lora=lora, args=args)
    log = _epochs(tmp_path / "run")
    assert [e["epoch"] for e in log] == list(range(7))
    # epoch 0 is the untrained model's loss; it must fall clearly and steadily.
    train = [e["train_loss"] for e in log]
    assert train[-1] < train[0] - 0.5
    assert all(b < a for a, b in zip(train[1:], train[2:]))
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.5
    assert result.epochs_done == 6
    for e in range(7):
        assert (tmp_path / "run" / "checkpoints" / f"epoch-{e}" / "adapter_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["finetune"]["train"]["lr"] == 1e-2 and cfg["finetune"]["lora"]["r"] == 8
    assert "torch" in cfg["versions"]


def test_same_seed_same_adapter_and_different_seed_differs(tmp_path):
    finetune(tmp_path / "a", _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    finetune(tmp_path / "b", _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    other = TrainArgs(**{**ARGS.__dict__, "seed": 8})
    finetune(tmp_path / "c", _task(), model_name="tiny-llama", lora=LORA, args=other)
    a, b, c = (_adapter(tmp_path / x, 3) for x in "abc")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    finetune(tmp_path / "full", _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    # 12 examples / batch 4 = 3 steps per epoch; stop in the middle of epoch 2 (step 5).
    with pytest.raises(KeyboardInterrupt):
        finetune(tmp_path / "cut", _task(), model_name="tiny-llama", lora=LORA, args=ARGS, stop_after_steps=5)
    assert (tmp_path / "cut" / "checkpoints" / "epoch-1").is_dir()
    assert not (tmp_path / "cut" / "checkpoints" / "epoch-2").exists()
    result = finetune(tmp_path / "cut", _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    assert result.epochs_done == 3
    full, cut = _adapter(tmp_path / "full", 3), _adapter(tmp_path / "cut", 3)
    for key in full:
        assert torch.equal(full[key], cut[key]), key
    # A third call finds the run complete and changes nothing.
    again = finetune(tmp_path / "cut", _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    assert again.seconds == 0.0


def test_run_directory_with_other_configuration_is_refused(tmp_path):
    finetune(tmp_path / "run", _task(), model_name="tiny-llama", lora=LORA,
             args=TrainArgs(**{**ARGS.__dict__, "epochs": 1}))
    with pytest.raises(UserError, match="field 'finetune.train.lr' differs"):
        finetune(tmp_path / "run", _task(), model_name="tiny-llama", lora=LORA,
                 args=TrainArgs(**{**ARGS.__dict__, "epochs": 1, "lr": 1e-4}))


def test_lora_on_chosen_layers_only(tmp_path):
    lora = LoraSpec(r=2, alpha=4, dropout=0.0, targets=("q_proj",), layers=(1,))
    finetune(tmp_path / "run", _task(), model_name="tiny-llama", lora=lora,
             args=TrainArgs(**{**ARGS.__dict__, "epochs": 1}))
    keys = sorted(_adapter(tmp_path / "run", 1))
    assert keys and all(".layers.1.self_attn.q_proj." in k for k in keys)


def test_early_stopping_rule():
    assert not _rising([3.0, 2.0, 2.5, 2.6], patience=3)
    assert _rising([3.0, 2.0, 2.5, 2.6, 2.7], patience=3)
    assert not _rising([3.0, 2.0, 2.5, 2.4, 2.7], patience=3)


def test_early_stopping_ends_training(tmp_path):
    # A huge learning rate makes validation loss rise; training must stop after 3 rises.
    args = TrainArgs(epochs=12, batch_size=4, lr=0.5, max_length=64, seed=0, patience=1, max_grad_norm=0.0)
    result = finetune(tmp_path / "run", _task(), model_name="tiny-llama", lora=LORA, args=args)
    vals = [e["val_loss"] for e in _epochs(tmp_path / "run")]
    assert result.stopped_early
    assert vals[-1] > vals[-2]
    assert result.epochs_done < 12


def test_learning_rate_schedule():
    args = TrainArgs(lr=1.0, warmup_ratio=0.2)
    assert [round(lr_at(s, 10, args), 6) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]


def test_validation_uses_the_held_out_examples_and_never_the_test_split(tmp_path):
    from llm_influence.models import ChatFormatter, attach_lora, load_model
    from llm_influence.training import mean_loss

    task = _task()
    args = TrainArgs(**{**ARGS.__dict__, "epochs": 1})
    finetune(tmp_path / "run", task, model_name="tiny-llama", lora=LORA, args=args)
    val0 = _epochs(tmp_path / "run")[0]["val_loss"]
    model, tok, _ = load_model("tiny-llama")
    model = attach_lora(model, LORA, seed=args.seed)
    fmt = ChatFormatter(tok, max_length=args.max_length)
    expected = mean_loss(model, [fmt.encode(e) for e in task.val], tok.pad_token_id, 8)
    on_test = mean_loss(model, [fmt.encode(e) for e in task.test], tok.pad_token_id, 8)
    assert val0 == pytest.approx(expected, rel=1e-6)
    assert val0 != pytest.approx(on_test, rel=1e-6)
    # the run keeps its validation examples beside train/test, and they are not attributed
    from llm_influence.rundir import RunDir

    saved = RunDir(tmp_path / "run").load_task()
    assert [e.id for e in saved.val] == [e.id for e in task.val]
    assert not {e.id for e in saved.val} & {e.id for e in saved.test}
