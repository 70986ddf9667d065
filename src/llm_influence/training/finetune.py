"""LoRA fine-tuning with per-epoch checkpoints, validation loss, early stopping and resume.

The objective is the mean over the batch of each example's mean token loss (see
:func:`llm_influence.models.loss.per_example_loss`), optimised with AdamW under a linear
warm-up/decay schedule. The data order of epoch ``e`` depends only on ``(seed, e)`` and the
dropout RNG is saved with every checkpoint, so an interrupted run resumed from its last
checkpoint ends with the same adapter as an uninterrupted one.

Reliability (what a rerun of the same command does):

* Resume starts after the last checkpoint that verifies (its files match the SHA-256
  recorded in its ``trainer_state.json``). A truncated or modified checkpoint is reported
  with a warning and retrained, with every later one; ``train_log.jsonl`` is cut back to
  the resumed epoch, so no step or epoch is logged twice.
* A checkpoint made by other inputs (``inputs_sha256``: model, LoRA, arguments, example
  texts) is refused, never used.
* A non-finite loss (training batch, validation, the initial evaluation), gradient norm or
  LoRA weight stops the run with the epoch, step and example ids, before a checkpoint
  holding it is written.
* One process at a time per run directory (an advisory lock, ``RUN/.finetune.lock``).

Precision: ``args.autocast="bf16"`` is a request; the training step runs under bfloat16
autocast only where it is native (:func:`llm_influence.hardware.resolve_autocast`), else in
float32 after one warning. Every training epoch's row of ``train_log.jsonl`` records what
was used (``effective_autocast``: ``"bf16"`` or ``"none"``); the run's inputs digest keeps
the requested value only, so a float32 run's checkpoints and digests are unchanged.
"""

from __future__ import annotations

import fcntl
import json
import math
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..config import TrainArgs
from ..data.example import Example, TaskData
from ..errors import UserError, warn
from ..hardware import resolve_autocast
from ..io_utils import append_jsonl, atomic_path, publish_dir
from ..models.formatting import ChatFormatter, Encoded, collate, model_inputs
from ..models.lora import LoraSpec, attach_lora
from ..models.loss import per_example_loss
from ..models.registry import load_model
from ..progress import log, progress
from ..rundir import RunDir
from .log import read_train_log
from .state import inputs_digest, load_trainer_state, save_trainer_state, verify_checkpoint


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
def _batch_losses(model, encoded: Sequence[Encoded], pad_id: int, batch_size: int) -> list[torch.Tensor]:
    """Per batch, each example's mean token loss in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size], pad_id)
        logits = model(**model_inputs(batch)).logits
        out.append(per_example_loss(logits, batch["labels"]))
    model.train(was_training)
    return out


def _mean(batches: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for losses in batches:
        total += float(losses.sum())
        count += len(losses)
    return total / max(count, 1)


def mean_loss(model, encoded: Sequence[Encoded], pad_id: int, batch_size: int) -> float:
    """Mean per-example loss in eval mode (no dropout)."""
    return _mean(_batch_losses(model, encoded, pad_id, batch_size))


def _checked_mean(model, encoded: Sequence[Encoded], examples: Sequence[Example], pad_id: int, batch_size: int,
                  stage: str) -> float:
    """:func:`mean_loss`, or :class:`UserError` naming ``stage`` and the examples whose
    loss is NaN or infinite."""
    batches = _batch_losses(model, encoded, pad_id, batch_size)
    values = torch.cat(batches).tolist() if batches else []
    bad = [ex.id for ex, value in zip(examples, values) if not math.isfinite(value)]
    if bad:
        raise UserError(f"fine-tuning, {stage}: non-finite loss for example(s) {_ids(bad)}; "
                        "the model or LoRA weights hold NaN/Inf (lower --lr, in a new --out directory)")
    return _mean(batches)


def _ids(ids: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


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
        # peft writes target_modules from a set, in an order that changes with the process's
        # string hash seed; sort it so that the same run gives the same bytes (and digests).
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_trainer_state(tmp, optimizer, info)

    publish_dir(run.checkpoint(epoch), write)


def _load_adapter_weights(model, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))


RUN_ENTRIES = {"config.json", "data", "checkpoints", "train_log.jsonl", "features", "scores", "metrics.json"}
_TMP_CHECKPOINT = re.compile(r"^\.epoch-\d+\.")


def _check_out(run: RunDir) -> None:
    """Refuse a file, or a non-empty folder that is not a run directory (read-only)."""
    path = run.path
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: --out exists and is not a directory")
    if path.is_dir() and not run.exists():
        foreign = sorted(c.name for c in path.iterdir() if c.name not in RUN_ENTRIES and not c.name.startswith("."))
        if foreign:
            raise UserError(f"{path}: --out is not empty and not a run directory (it holds {foreign[0]!r}); "
                            "use a new or empty directory")


def _make_out(run: RunDir) -> None:
    try:
        run.path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{run.path}: cannot create the run directory ({exc.strerror})") from None


@contextmanager
def _run_lock(run: RunDir) -> Iterator[None]:
    """One fine-tuning process per run directory (released when the process ends, even by
    SIGKILL)."""
    with open(run.path / ".finetune.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{run.path}: another llm-influence process is fine-tuning this run "
                            "(wait for it to finish, or stop it)") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _resume_epoch(run: RunDir, inputs_sha256: str) -> Optional[int]:
    """The last epoch whose checkpoint, and every one before it, verifies; None if none.

    Leftover temporary folders of a killed write are removed. A corrupt checkpoint is
    reported and removed with every later one (they are retrained); a stale one (made by
    other inputs) is refused."""
    if run.checkpoints_root.is_dir():
        for child in run.checkpoints_root.iterdir():
            if child.is_dir() and _TMP_CHECKPOINT.match(child.name):
                shutil.rmtree(child, ignore_errors=True)
    epochs = run.epochs()
    last: Optional[int] = None
    for epoch in epochs:
        folder = run.checkpoint(epoch)
        if last is not None and epoch != last + 1:
            warn(f"{run.checkpoint(last + 1)}: missing; retraining from epoch {last}")
            break
        kind, reason = verify_checkpoint(folder, inputs_sha256)
        if kind == "stale":
            raise UserError(f"{folder}: {reason}; use a new --out directory or delete the run")
        if kind == "corrupt":
            warn(f"{folder}: {reason}; discarding it{' and every later checkpoint' if epoch != epochs[-1] else ''}"
                 f" and retraining from {'scratch' if last is None else f'epoch {last}'}")
            break
        last = epoch
    for epoch in epochs:
        if last is None or epoch > last:
            shutil.rmtree(run.checkpoint(epoch))
    return last


def _cut_train_log(run: RunDir, last_epoch: int) -> None:
    """Keep the log rows of epochs up to ``last_epoch`` (what the resumed checkpoint saw);
    drop later rows and any line cut short by a kill, so nothing is logged twice."""
    if not run.train_log.is_file():
        return
    keep = [row for row in read_train_log(run.train_log) if row["epoch"] <= last_epoch]
    with atomic_path(run.train_log) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in keep), encoding="utf-8")


def _check_arguments(args: TrainArgs) -> None:
    args.validate()
    for name in ("lr", "warmup_ratio", "weight_decay", "max_grad_norm"):
        if not math.isfinite(getattr(args, name)):
            raise UserError(f"invalid training argument {name}={getattr(args, name)!r}")


def _grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total gradient L2 norm (before clipping); clips in place when ``max_norm > 0``."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def train_step(model, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], batch: dict, *,
               lr: float, max_grad_norm: float, autocast: str, device: torch.device, where: str,
               ids: Sequence[str]) -> float:
    """One optimiser step of fine-tuning on ``batch`` (a :func:`collate` of the rows ``ids``).

    Sets every parameter group's learning rate to ``lr``, runs the forward pass (under
    bfloat16 autocast when ``autocast == "bf16"``), takes the mean over the batch of each
    example's mean token loss (:func:`per_example_loss`), back-propagates, clips the total
    gradient norm to ``max_grad_norm`` (when > 0) and steps ``optimizer``. Dropout draws
    from the global torch RNG, so the same RNG state, weights, optimizer state and batch
    give the same step bitwise. Returns the batch loss (nats per token, Python float).
    A non-finite loss or gradient norm, or an overflowing step, is a :class:`UserError`
    that starts with ``where`` and names the offending example ``ids``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        logits = model(**model_inputs(batch)).logits
    losses = per_example_loss(logits, batch["labels"])
    loss = losses.mean()
    if not torch.isfinite(loss):
        bad = [ids[i] for i in range(len(losses)) if not torch.isfinite(losses[i])]
        raise UserError(f"{where}: non-finite training loss for example(s) {_ids(bad)}; "
                        "lower --lr (in a new --out directory)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = _grad_norm(params, max_grad_norm)
    if not torch.isfinite(norm):
        raise UserError(f"{where}: non-finite gradient (norm {float(norm)}) for the batch of example(s) "
                        f"{_ids(list(ids))}; lower --lr (in a new --out directory)")
    try:
        optimizer.step()
    except RuntimeError as exc:  # e.g. "value cannot be converted to type float without overflow"
        if "overflow" not in str(exc):
            raise
        raise UserError(f"{where}: the optimizer step overflowed ({str(exc).splitlines()[0]}) at "
                        f"lr {optimizer.param_groups[0]['lr']:g}; lower --lr (in a new --out "
                        "directory)") from None
    return loss.item()


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
    trust_remote_code: bool = False,
) -> FinetuneResult:
    """Fine-tune ``model_name`` with LoRA on ``task.train`` into the run directory.

    If the run directory already holds a fine-tune with the same configuration, training
    resumes after its last intact checkpoint (or returns at once when it is complete). A
    run directory holding a different configuration is an error. ``stop_after_steps``
    (testing aid) raises ``KeyboardInterrupt`` after that many optimiser steps in this call.
    ``trust_remote_code`` is passed to :func:`load_model` (only for an explicit user flag).
    """
    _check_arguments(args)
    lora.validate()
    if not task.train:
        raise UserError(f"task {task.name!r}: no training examples")
    run = RunDir(run_path)
    wanted = {"name": task.name, **(task_config or {}),
              "train_ids": [e.id for e in task.train], "test_ids": [e.id for e in task.test],
              "val_ids": [e.id for e in task.val]}
    finetune_cfg = {"model": model_name, "lora": lora.to_dict(), "train": asdict(args)}
    if run.exists() and run.epochs():  # a run without any checkpoint holds nothing to protect
        cfg = run.config()
        for section, value in (("task", wanted), ("finetune", finetune_cfg)):
            if section in cfg and cfg[section] != value:
                diff = _first_difference(cfg[section], value, section)
                raise UserError(f"{run.config_path}: field '{diff}' differs from this command; "
                                "use a new --out directory or delete the run")
    _check_out(run)
    # The model and LoRA are checked before anything is written to --out.
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_model(model_name, trust_remote_code=trust_remote_code)
    model = attach_lora(model, lora, seed=args.seed)
    _make_out(run)
    with _run_lock(run):
        return _finetune_locked(run, task, wanted, finetune_cfg, model, tokenizer, args=args,
                                stop_after_steps=stop_after_steps, on_step=on_step)


def _finetune_locked(run: RunDir, task: TaskData, wanted: dict, finetune_cfg: dict, model, tokenizer, *,
                     args: TrainArgs, stop_after_steps: Optional[int],
                     on_step: Optional[Callable[[int], None]]) -> FinetuneResult:
    inputs_sha256 = inputs_digest({"task": wanted, "finetune": finetune_cfg}, task.train, task.test, task.val)
    last = _resume_epoch(run, inputs_sha256)
    run.save_task(task)
    run.update_config("task", wanted)
    run.update_config("finetune", finetune_cfg)

    formatter = ChatFormatter(tokenizer, max_length=args.max_length, loss_on=args.loss_on)
    train_enc = [formatter.encode(e) for e in task.train]
    val_examples = list(task.val) if args.validation == "held-out" else []
    if args.validation == "held-out" and args.val_per_group is not None and not val_examples:
        log(f"task {task.name!r}: no validation examples (no test group has a row to spare); "
             "training runs without validation loss or early stopping")
    val_enc = [formatter.encode(e) for e in val_examples]
    pad_id = tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_enc) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    def save_checkpoint(epoch: int, info: dict) -> None:
        bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise UserError(f"fine-tuning, end of epoch {epoch}: non-finite LoRA weights ({bad[0]}); "
                            "not saved (lower --lr, in a new --out directory)")
        _save_checkpoint(run, epoch, model, optimizer, {**info, "inputs_sha256": inputs_sha256})

    start_epoch, step = 1, 0
    val_history: list[float] = []
    state: dict = {}
    if last is not None:
        _load_adapter_weights(model, run.checkpoint(last))
        state = load_trainer_state(run.checkpoint(last), optimizer)
        start_epoch, step = last + 1, int(state["step"])
        val_history = list(state.get("val_history", []))
        _cut_train_log(run, last)
        if state.get("finished"):
            log(f"{run.path}: fine-tune already complete ({last} epochs)")
            return FinetuneResult(run.path, last, bool(state.get("stopped_early")), state.get("train_loss"),
                                  state.get("val_loss"), 0.0)
        log(f"{run.path}: resuming after epoch {last}")
    else:
        if run.train_log.exists():
            run.train_log.unlink()
        val0 = (_checked_mean(model, val_enc, val_examples, pad_id, args.eval_batch_size, "initial validation loss")
                if val_enc else None)
        train0 = _checked_mean(model, train_enc, task.train, pad_id, args.eval_batch_size, "initial training loss")
        if val0 is not None:
            val_history.append(val0)
        append_jsonl(run.train_log, {"kind": "epoch", "epoch": 0, "step": 0, "train_loss": train0,
                                     "val_loss": val0, "lr": 0.0, "seconds": 0.0})
        save_checkpoint(0, {"step": 0, "epoch": 0, "val_history": val_history, "train_loss": train0, "val_loss": val0,
                 "finished": False})

    device = next(model.parameters()).device
    effective_autocast = resolve_autocast(args.autocast, device)  # "bf16" only where it is native
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
                rows = order[b * args.batch_size:(b + 1) * args.batch_size]
                batch = collate([train_enc[i] for i in rows], pad_id)
                epoch_losses.append(train_step(
                    model, optimizer, params, batch, lr=lr_at(step, total_steps, args),
                    max_grad_norm=args.max_grad_norm, autocast=effective_autocast, device=device,
                    where=f"fine-tuning, epoch {epoch} step {step + 1}", ids=[task.train[i].id for i in rows]))
                step += 1
                steps_this_call += 1
                append_jsonl(run.train_log, {"kind": "step", "epoch": epoch, "step": step, "loss": epoch_losses[-1],
                                             "lr": optimizer.param_groups[0]["lr"]})
                advance(info=f"loss {epoch_losses[-1]:.3f}")
                if on_step is not None:
                    on_step(step)
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    raise KeyboardInterrupt(f"stopped after {steps_this_call} steps (stop_after_steps)")
        train_loss = sum(epoch_losses) / len(epoch_losses)
        val_loss = (_checked_mean(model, val_enc, val_examples, pad_id, args.eval_batch_size,
                                  f"validation after epoch {epoch}") if val_enc else None)
        if val_loss is not None:
            val_history.append(val_loss)
        stopped_early = bool(args.early_stopping and val_enc and _rising(val_history, args.patience))
        finished = stopped_early or epoch == args.epochs
        append_jsonl(run.train_log, {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": train_loss,
                                     "val_loss": val_loss, "lr": optimizer.param_groups[0]["lr"],
                                     "seconds": time.time() - t_epoch, "effective_autocast": effective_autocast})
        save_checkpoint(epoch, {"step": step, "epoch": epoch, "val_history": val_history, "train_loss": train_loss,
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
