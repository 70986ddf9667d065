"""LoRA fine-tuning with per-epoch checkpoints, validation loss, early stopping and resume.

The objective is the mean over the batch of each example's mean token loss (see
:func:`llm_influence.models.loss.per_example_loss`), optimised with AdamW under a linear
warm-up/decay schedule. The data order of epoch ``e`` depends only on ``(seed, e)`` and the
dropout RNG is saved with every checkpoint, so an interrupted run resumed from its last
checkpoint ends with the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..config import TrainArgs
from ..data.example import Example, TaskData
from ..data.tasks import subsample
from ..errors import UserError
from ..io_utils import append_jsonl, publish_dir
from ..models.formatting import ChatFormatter, Encoded, collate, model_inputs
from ..models.lora import LoraSpec, attach_lora, lora_parameters
from ..models.loss import per_example_loss
from ..models.registry import load_model
from ..progress import log, progress
from ..rundir import RunDir
from .state import load_trainer_state, save_trainer_state


@dataclass
class FinetuneResult:
    run: Path
    epochs_done: int
    stopped_early: bool
    train_loss: Optional[float]
    val_loss: Optional[float]
    seconds: float


def lr_at(step: int, total_steps: int, args: TrainArgs) -> float:
    """Linear warm-up to ``args.lr`` then linear decay to 0 at ``total_steps``."""
    warmup = int(math.ceil(args.warmup_ratio * total_steps))
    if warmup and step < warmup:
        return args.lr * (step + 1) / warmup
    remaining = max(total_steps - warmup, 1)
    return args.lr * max(0.0, (total_steps - step) / remaining)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


@torch.no_grad()
def mean_loss(model, encoded: Sequence[Encoded], pad_id: int, batch_size: int) -> float:
    """Mean per-example loss in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size], pad_id)
        logits = model(**model_inputs(batch)).logits
        losses = per_example_loss(logits, batch["labels"])
        total += float(losses.sum())
        count += len(losses)
    model.train(was_training)
    return total / max(count, 1)


def _rising(history: list[float], patience: int) -> bool:
    """True when the last ``patience`` evaluations each rose above the one before."""
    if len(history) <= patience:
        return False
    tail = history[-(patience + 1):]
    return all(b > a for a, b in zip(tail, tail[1:]))


def _save_checkpoint(run: RunDir, epoch: int, model, optimizer, info: dict) -> None:
    """Adapter + trainer state, written to a temporary folder and renamed into place."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_trainer_state(tmp, optimizer, info)

    publish_dir(run.checkpoint(epoch), write)


def _load_adapter_weights(model, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))


def finetune(
    run_path: str | Path,
    task: TaskData,
    *,
    model_name: str,
    lora: LoraSpec,
    args: TrainArgs,
    task_config: Optional[dict] = None,
    stop_after_steps: Optional[int] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> FinetuneResult:
    """Fine-tune ``model_name`` with LoRA on ``task.train`` into the run directory.

    If the run directory already holds a fine-tune with the same configuration, training
    resumes after its last checkpoint (or returns at once when it is complete). A run
    directory holding a different configuration is an error. ``stop_after_steps`` (testing
    aid) raises ``KeyboardInterrupt`` after that many optimiser steps in this call.
    """
    args.validate()
    if not task.train:
        raise UserError(f"task {task.name!r}: no training examples")
    run = RunDir(run_path)
    wanted = {"name": task.name, **(task_config or {}),
              "train_ids": [e.id for e in task.train], "test_ids": [e.id for e in task.test]}
    finetune_cfg = {"model": model_name, "lora": lora.to_dict(), "train": asdict(args)}
    if run.exists():
        cfg = run.config()
        for section, value in (("task", wanted), ("finetune", finetune_cfg)):
            if section in cfg and cfg[section] != value:
                diff = _first_difference(cfg[section], value, section)
                raise UserError(f"{run.config_path}: field '{diff}' differs from this command; "
                                "use a new --out directory or delete the run")
    run.path.mkdir(parents=True, exist_ok=True)
    run.save_task(task)
    run.update_config("task", wanted)
    run.update_config("finetune", finetune_cfg)

    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_model(model_name)
    model = attach_lora(model, lora, seed=args.seed)
    formatter = ChatFormatter(tokenizer, max_length=args.max_length, loss_on=args.loss_on)
    train_enc = [formatter.encode(e) for e in task.train]
    val_examples = subsample(task.test, args.val_per_group, args.seed) if args.validation == "test" else []
    val_enc = [formatter.encode(e) for e in val_examples]
    pad_id = tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_enc) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    done = [e for e in run.epochs()]
    start_epoch, step = 1, 0
    val_history: list[float] = []
    state: dict = {}
    if done:
        last = done[-1]
        _load_adapter_weights(model, run.checkpoint(last))
        state = load_trainer_state(run.checkpoint(last), optimizer)
        start_epoch, step = last + 1, int(state["step"])
        val_history = list(state.get("val_history", []))
        if state.get("finished"):
            log(f"{run.path}: fine-tune already complete ({last} epochs)")
            return FinetuneResult(run.path, last, bool(state.get("stopped_early")), state.get("train_loss"),
                                  state.get("val_loss"), 0.0)
        log(f"{run.path}: resuming after epoch {last}")
    else:
        if run.train_log.exists():
            run.train_log.unlink()
        val0 = mean_loss(model, val_enc, pad_id, args.eval_batch_size) if val_enc else None
        train0 = mean_loss(model, train_enc, pad_id, args.eval_batch_size)
        if val0 is not None:
            val_history.append(val0)
        append_jsonl(run.train_log, {"kind": "epoch", "epoch": 0, "step": 0, "train_loss": train0,
                                     "val_loss": val0, "lr": 0.0, "seconds": 0.0})
        _save_checkpoint(run, 0, model, optimizer, {"step": 0, "epoch": 0, "val_history": val_history,
                                                     "train_loss": train0, "val_loss": val0, "finished": False})

    t_start = time.time()
    model.train()
    steps_this_call = 0
    train_loss = val_loss = None
    stopped_early = False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, args.epochs + 1):
        order = epoch_order(len(train_enc), args.seed, epoch)
        epoch_losses: list[float] = []
        t_epoch = time.time()
        with progress(steps_per_epoch, f"epoch {epoch}/{args.epochs}") as advance:
            for b in range(steps_per_epoch):
                batch = collate([train_enc[i] for i in order[b * args.batch_size:(b + 1) * args.batch_size]], pad_id)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total_steps, args)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
                    logits = model(**model_inputs(batch)).logits
                losses = per_example_loss(logits, batch["labels"])
                loss = losses.mean()
                if not torch.isfinite(loss):
                    bad = [task.train[order[b * args.batch_size + i]].id for i in range(len(losses))
                           if not torch.isfinite(losses[i])]
                    raise UserError(f"fine-tuning: non-finite loss at step {step} for example(s) {', '.join(bad)}; "
                                    "lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                step += 1
                steps_this_call += 1
                epoch_losses.append(loss.item())
                append_jsonl(run.train_log, {"kind": "step", "epoch": epoch, "step": step, "loss": epoch_losses[-1],
                                             "lr": optimizer.param_groups[0]["lr"]})
                advance(info=f"loss {epoch_losses[-1]:.3f}")
                if on_step is not None:
                    on_step(step)
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    raise KeyboardInterrupt(f"stopped after {steps_this_call} steps (stop_after_steps)")
        train_loss = sum(epoch_losses) / len(epoch_losses)
        val_loss = mean_loss(model, val_enc, pad_id, args.eval_batch_size) if val_enc else None
        if val_loss is not None:
            val_history.append(val_loss)
        stopped_early = bool(args.early_stopping and val_enc and _rising(val_history, args.patience))
        finished = stopped_early or epoch == args.epochs
        append_jsonl(run.train_log, {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": train_loss,
                                     "val_loss": val_loss, "lr": optimizer.param_groups[0]["lr"],
                                     "seconds": time.time() - t_epoch})
        _save_checkpoint(run, epoch, model, optimizer, {
            "step": step, "epoch": epoch, "val_history": val_history, "train_loss": train_loss,
            "val_loss": val_loss, "finished": finished, "stopped_early": stopped_early,
            "lr": optimizer.param_groups[0]["lr"]})
        vtxt = f", val {val_loss:.4f}" if val_loss is not None else ""
        log(f"epoch {epoch}: train {train_loss:.4f}{vtxt}")
        if stopped_early:
            log(f"early stopping: validation loss rose for {args.patience} consecutive epochs")
            break
    return FinetuneResult(run.path, epoch, stopped_early, train_loss, val_loss, time.time() - t_start)


def _first_difference(old, new, prefix: str) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}.{key}")
    return prefix
