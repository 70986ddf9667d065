"""The LLM retraining harness against fine-tuning itself (tiny-llama, LoRA dropout 0.1).

* the full mask reproduces the run's final adapter bitwise (dropout masks included) and its
  test losses equal those of the final checkpoint loaded the ordinary way;
* a subset retrain with another training seed equals ``finetune`` run on that subset as its
  own training file with that seed, bitwise (so the subset's data order, learning-rate
  schedule, LoRA initialisation and dropout stream are fine-tuning's own);
* the dropout RNG matters (another RNG start gives another adapter), retrains do not leak
  state into each other, and the tail-patch step equals one AdamW step written out on the
  final checkpoint loaded the ordinary way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm_influence.config import TrainArgs
from llm_influence.data import Example, TaskData
from llm_influence.models import LoraSpec
from llm_influence.models.formatting import collate, model_inputs
from llm_influence.models.loss import per_example_loss
from llm_influence.rundir import RunDir
from llm_influence.training import finetune
from llm_influence.training.finetune import _batch_losses
from llm_influence.training.load import load_finetuned
from llm_influence.training.retrain import LoraRetrainer, _Start
from llm_influence.training.state import load_trainer_state

ARGS = TrainArgs(epochs=2, batch_size=4, lr=3e-3, warmup_ratio=0.25, max_length=64, seed=7, eval_batch_size=8)
LORA = LoraSpec(r=4, alpha=32, dropout=0.1)


def _task(train_rows=None) -> TaskData:
    colours = ["red", "green", "blue"]
    train = [Example(f"t{i}", f"Say the colour number {i % 3}.", f"{colours[i % 3]} it is.", str(i % 3))
             for i in range(10)]
    if train_rows is not None:
        train = [train[i] for i in train_rows]
    test = [Example(f"v{i}", f"Say the colour number {i}.", f"{colours[i]} it is.", str(i)) for i in range(3)]
    val = [Example(f"w{i}", f"Name the colour number {i}.", f"{colours[i]} it is.", str(i)) for i in range(3)]
    return TaskData("colours", train, test, val=val)


def _adapter(run, epoch=ARGS.epochs) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"epoch-{epoch}" / "adapter_model.safetensors"))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    run = tmp_path_factory.mktemp("cf") / "run"
    finetune(run, _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    return run, LoraRetrainer(run)


def test_full_mask_reproduces_the_run_bitwise(harness):
    run, r = harness
    assert (r.n_train, r.n_test, r.epochs, r.seed) == (10, 3, 2, 7)
    losses = r.retrain(np.ones(10, dtype=bool))
    assert _equal(r.adapter_state(), _adapter(run))
    model, formatter, name = load_finetuned(RunDir(run))
    assert name == "epoch-2"
    encoded = [formatter.encode(e) for e in RunDir(run).load_task().test]
    reference = torch.cat(_batch_losses(model, encoded, formatter.tokenizer.pad_token_id, ARGS.eval_batch_size))
    np.testing.assert_array_equal(losses, reference.double().numpy())
    np.testing.assert_array_equal(r.final_losses(), losses)


def test_start_state_is_the_runs_and_dropout_matters(harness):
    run, r = harness
    start = r._starts[7]
    assert _equal(start.weights, _adapter(run, 0))
    replay = r.replayed_start(7)  # what finetune --seed 7 starts from, rebuilt
    assert torch.equal(replay.rng, start.rng) and _equal(replay.weights, start.weights)
    other = torch.Generator().manual_seed(99).get_state()
    r._starts[123] = _Start(start.weights, other)  # the run's adapter start, another dropout stream
    try:
        r.retrain(np.ones(10, dtype=bool), seed=123)
    finally:
        del r._starts[123]
    assert not _equal(r.adapter_state(), _adapter(run))


def test_subset_retrain_with_another_seed_is_finetune_on_the_subset(harness, tmp_path):
    run, r = harness
    rows = [0, 2, 3, 5, 8, 9]  # 6 of 10: batches of 4 and 2, as a 6-example training file has
    mask = np.zeros(10, dtype=bool)
    mask[rows] = True
    other = np.ones(10, dtype=bool)
    other[[1, 4]] = False
    first = r.retrain(mask, seed=8)
    state = r.adapter_state()
    r.retrain(other)  # nothing carries over from one retrain to the next
    np.testing.assert_array_equal(r.retrain(mask, seed=8), first)
    args8 = TrainArgs(**{**ARGS.__dict__, "seed": 8})
    finetune(tmp_path / "subset", _task(rows), model_name="tiny-llama", lora=LORA, args=args8)
    assert _equal(state, _adapter(tmp_path / "subset"))
    assert not _equal(state, _adapter(run))


def test_tail_patch_is_one_more_adamw_step(harness):
    run, r = harness
    rows, tests = [4, 1, 7], [0, 2]
    after = r.tail_patch(rows, tests)
    before = r.final_losses(tests, batch_size=1)
    assert after.shape == (2,) and not np.array_equal(after, before)

    model, formatter, _ = load_finetuned(RunDir(run), trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ARGS.lr, weight_decay=ARGS.weight_decay)
    folder = run / "checkpoints" / "epoch-2"
    with torch.random.fork_rng(devices=[]):
        info = load_trainer_state(folder, optimizer)  # moments, step count, RNG at the end of training
        task = RunDir(run).load_task()
        batch = collate([formatter.encode(task.train[i]) for i in sorted(rows)], formatter.tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = info["lr"]
        model.train()
        loss = per_example_loss(model(**model_inputs(batch)).logits, batch["labels"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ARGS.max_grad_norm)
        optimizer.step()
    model.eval()
    expected = [float(_batch_losses(model, [formatter.encode(task.test[j])], formatter.tokenizer.pad_token_id, 1)[0])
                for j in tests]
    np.testing.assert_array_equal(after, np.array(expected))
    assert info["lr"] == r.final_lr > 0


RETRAIN_DRIVER = r"""
import sys
import numpy as np
from llm_influence import distributed
from llm_influence.training.retrain import LoraRetrainer, retrain_masks
from llm_influence.training.retrain_cache import CachedRetrainer
world = distributed.current()
assert world.size == 2 and world.backend == "gloo", world
masks = np.load(sys.argv[2])
retrainer = CachedRetrainer(LoraRetrainer(sys.argv[1]), sys.argv[3])
losses = retrain_masks(retrainer, masks, 11)
if world.rank == 0:
    np.save(sys.argv[4], losses)
print("rank", world.rank, "retrained", len(retrainer.retrain_seconds), flush=True)
distributed.shutdown()
"""


def test_two_gloo_processes_split_the_masks_and_equal_one_process(harness, tmp_path, monkeypatch):
    """Under torchrun (2 CPU processes, gloo) each rank retrains its own contiguous share of
    the masks (through the retrain cache) and the all-reduced losses equal this process's
    retrains of the same masks bitwise; each rank's cache holds only its own masks."""
    import os
    import socket
    import subprocess
    import sys

    run, retrainer = harness
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 10), dtype=bool)
    for m in masks:
        m[rng.choice(10, 5, replace=False)] = True
    np.save(tmp_path / "masks.npy", masks)
    (tmp_path / "driver.py").write_text(RETRAIN_DRIVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(tmp_path / "driver.py"), str(run), str(tmp_path / "masks.npy"),
           str(tmp_path / "cache"), str(tmp_path / "two.npy")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0 retrained 2" in proc.stdout and "rank 1 retrained 1" in proc.stdout  # masks 0-1 and 2
    two = np.load(tmp_path / "two.npy")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count (a CPU retrain is bitwise only for the same one)
    try:
        one = np.stack([retrainer.retrain(m, 11) for m in masks])
    finally:
        torch.set_num_threads(threads)
    assert one.tobytes() == two.tobytes()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3
