"""Retraining on subsets of a run's training examples: the counterfactual ground truth.

A *retrainer* answers one question: "had the model been trained on these training examples
only, what would each test example's loss be?" Its interface (:class:`Retrainer`) is shared
by the LLM harness and the convex check, so the LDS / leave-top-k-out code of
:mod:`llm_influence.evaluation.counterfactual` runs unchanged on both:

* ``n_train``, ``n_test``: the sizes of the training and test splits;
* ``retrain(mask, seed=None) -> losses``: ``mask`` is ``[n_train]`` bool over the training
  split (True = kept), ``losses`` is ``[n_test]`` float64, each test example's loss after
  training on the kept examples (nats; for the LLM the mean cross-entropy over the example's
  supervised tokens, :func:`~llm_influence.models.loss.per_example_loss`, evaluated in eval
  mode, no dropout). ``seed`` is the training seed (``None`` = the run's own).

:class:`LoraRetrainer` (LLM runs made by :func:`~llm_influence.training.finetune`)
----------------------------------------------------------------------------------
The model is loaded once; each retrain resets the LoRA weights to the start state, builds a
fresh AdamW and resets the dropout RNG, then runs the run's training loop on the kept rows
with the step function fine-tuning itself uses (:func:`~.finetune.train_step`). Exactly:

* **Start state.** For the run's own seed: the run's initial adapter (checkpoint
  ``epoch-0``, LoRA A from the seed, B = 0) and the torch RNG state saved with it. That RNG
  state is the one fine-tuning's first training step started from (nothing between that
  checkpoint and the first step draws random numbers: evaluation runs without dropout), so
  the dropout masks of the full-mask retrain are those of the run, draw for draw. For
  another seed ``s`` (the noise ceiling's second training seed): what ``finetune --seed s``
  would start from, rebuilt by replaying its start: ``torch.manual_seed(s)``, load the model
  (its RNG state afterwards is the dropout start state), attach a fresh LoRA with seed
  ``s``. So a retrain with seed ``s`` is the ``--seed s`` fine-tune of that training set
  (tested bitwise: the full mask against the run, the replay of the run's seed against
  ``epoch-0``, and a subset with another seed against ``finetune`` on that subset as its own
  training file with that seed). Dropout draws from the CPU generator, the one fine-tuning
  saves: bitwise reproduction is for CPU runs (CUDA dropout draws are not checkpointed).
* **Data order.** With ``rows`` = the kept training indices in training-file order
  (``np.flatnonzero(mask)``), epoch ``e`` visits ``rows[epoch_order(len(rows), seed, e)]`` in
  consecutive batches of the run's ``batch_size`` (the last one shorter). That is
  fine-tuning's own rule applied to the subset as if it were the whole training file; for
  the full mask it is the run's order.
* **Schedule.** ``epochs`` = the epochs the run actually trained (its last checkpoint; equal
  to ``args.epochs`` unless it stopped early); the learning rate at optimiser step ``t`` is
  :func:`~.finetune.lr_at` ``(t, ceil(len(rows) / batch_size) * args.epochs, args)``, the
  run's warm-up/decay rule over the subset's step count.
* **No validation, no early stopping, no checkpoints.** A retrain trains exactly
  ``epochs`` epochs (validation would change nothing the full-mask check needs: it draws no
  random numbers; early stopping on a subset would make the number of epochs depend on the
  mask). Nothing is written to the run directory.

:class:`LoraRetrainer.tail_patch` is the cheap counterfactual: from the run's final adapter,
its final AdamW state (moments and step count, saved in the last checkpoint), and its final
RNG state, one more optimiser step, at the run's last learning rate, on a chosen set of
training examples as one batch (ascending training index; dropout on, as in training).

:class:`ConvexRetrainer` retrains :class:`~llm_influence.linear.SoftmaxRegression` on a mask
(example weights 0/1 with the ``1/n`` normalisation kept), warm-started from the optimum on
all rows, so a single-example mask is exactly :meth:`SoftmaxRegression.leave_one_out`.

:func:`retrain_masks` retrains many masks; under ``torchrun`` the masks are split over the
ranks (contiguous ranges, :func:`llm_influence.distributed.mine`) and combined with an
all-reduce in which every entry comes from exactly one rank. Each retrain starts from a
fixed state (weights, optimiser, RNG), so a mask's losses do not depend on which rank or in
which order it is retrained (given the same torch thread count).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import torch

from .. import distributed
from ..config import TrainArgs
from ..errors import UserError
from ..hardware import resolve_autocast
from ..models.formatting import ChatFormatter, collate
from ..models.lora import LoraSpec, attach_lora
from ..models.registry import load_model
from ..rundir import RunDir
from .finetune import _batch_losses, epoch_order, lr_at, train_step
from .state import OPTIMIZER_FILE, load_trainer_state, read_state_info, verify_checkpoint


class Retrainer(Protocol):
    """Anything that retrains on a subset of its training examples (module docstring)."""

    @property
    def n_train(self) -> int: ...

    @property
    def n_test(self) -> int: ...

    def retrain(self, mask: np.ndarray, seed: Optional[int] = None) -> np.ndarray:
        """``[n_test]`` float64 test losses after training on the rows where ``mask`` is True."""
        ...


def check_mask(mask: Any, n_train: int) -> np.ndarray:
    """``mask`` as a ``[n_train]`` bool array with at least one True (else ``ValueError``)."""
    arr = np.asarray(mask)
    if arr.shape != (n_train,):
        raise ValueError(f"mask must be [{n_train}], got shape {tuple(arr.shape)}")
    if arr.dtype != np.bool_:
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError("mask must hold booleans (or 0/1)")
        arr = arr.astype(bool)
    if not arr.any():
        raise ValueError("mask keeps no training example")
    return arr


def retrain_masks(retrainer: Retrainer, masks: np.ndarray, seed: Optional[int] = None, *,
                  world: Optional[distributed.World] = None) -> np.ndarray:
    """``[M, n_test]`` float64: ``retrainer.retrain(masks[m], seed)`` for every mask ``m``.

    ``masks``: ``[M, n_train]`` bool. Under several ranks each retrains its own contiguous
    range of masks (:func:`distributed.mine`) and the rows are combined exactly (every entry
    is summed with zeros from the other ranks); in one process this is a plain loop.
    """
    world = world or distributed.current()
    out = retrain_owned(retrainer, masks, seed, world)
    if world.active:
        out = distributed.all_reduce_sum(torch.from_numpy(out), world).numpy()
    return out


def retrain_owned(retrainer: Retrainer, masks: np.ndarray, seed: Optional[int], world: distributed.World) -> np.ndarray:
    """``[M, n_test]`` float64: the rows of the masks ``world``'s rank owns retrained, every
    other row 0.0 (what each rank contributes to :func:`retrain_masks`' all-reduce)."""
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.shape[1] != retrainer.n_train:
        raise ValueError(f"masks must be [M, {retrainer.n_train}], got shape {tuple(masks.shape)}")
    out = np.zeros((masks.shape[0], retrainer.n_test), dtype=np.float64)
    for m in distributed.mine(masks.shape[0], world):
        out[m] = retrainer.retrain(masks[m], seed)
    return out


# ---------------------------------------------------------------------------------------
# the convex model


class ConvexRetrainer:
    """:class:`~llm_influence.linear.SoftmaxRegression` retrained on a mask.

    ``model`` is the optimum on all ``n`` training rows ``(X [n, F], y [n])``; a retrain
    copies it and minimises ``(1/n) sum_i mask_i l_i(W) + (l2/2) ||W||^2`` from there
    (``fit_kwargs`` go to :meth:`SoftmaxRegression.fit`, e.g. ``tol``). Losses are the
    cross-entropies (nats) of the test rows ``(X_test, y_test)``. Training is deterministic,
    so ``seed`` has no effect (the noise ceiling of a convex model is 1).
    """

    def __init__(self, model, X: torch.Tensor, y: torch.Tensor, X_test: torch.Tensor, y_test: torch.Tensor,
                 **fit_kwargs: Any) -> None:
        self.model = model
        self.X, self.y = model._check(X, y)
        self.X_test, self.y_test = model._check(X_test, y_test)
        self.fit_kwargs = fit_kwargs

    @property
    def n_train(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.X_test.shape[0])

    def retrained_model(self, mask: Any):
        """The model retrained on the rows of ``mask`` (weights 1.0 / 0.0, float64)."""
        weights = torch.from_numpy(check_mask(mask, self.n_train)).to(torch.float64)
        return self.model.copy().fit(self.X, self.y, weights=weights, **self.fit_kwargs)

    def retrain(self, mask: np.ndarray, seed: Optional[int] = None) -> np.ndarray:
        model = self.retrained_model(mask)
        return model.per_example_losses(self.X_test, self.y_test).numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------
# LoRA fine-tunes


@dataclass
class _Start:
    """Where a retrain starts: LoRA weights (peft state-dict keys) and the torch RNG state."""

    weights: dict[str, torch.Tensor]
    rng: torch.Tensor


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class LoraRetrainer:
    """The retraining harness of a fine-tuned run directory (module docstring).

    Args:
        run_path: a run made by :func:`~llm_influence.training.finetune`, complete (its last
            checkpoint is marked finished) and with its ``epoch-0`` checkpoint.
        trust_remote_code: passed to :func:`load_model` (only for an explicit user flag).

    Attributes:
        args: the run's :class:`TrainArgs`; ``seed`` its training seed; ``epochs`` the
            epochs it trained; ``final_checkpoint`` its last checkpoint name (``epoch-N``).
        retrain_seconds: wall seconds of every :meth:`retrain` call so far (training and
            the test-loss evaluation), in call order.
    """

    def __init__(self, run_path: str | Path, *, trust_remote_code: bool = False) -> None:
        self.run = RunDir(run_path)
        cfg = self.run.config()
        if "finetune" not in cfg:
            raise UserError(f"{self.run.config_path}: no 'finetune' section; fine-tune the run first")
        ft = cfg["finetune"]
        self.model_name: str = ft["model"]
        self.lora = LoraSpec.from_dict(ft["lora"])
        self.args = TrainArgs(**ft["train"])
        self.seed = int(self.args.seed)
        self.trust_remote_code = trust_remote_code
        task = self.run.load_task()
        self.train_ids = [e.id for e in task.train]
        self.test_ids = [e.id for e in task.test]
        if not self.test_ids:
            raise UserError(f"{self.run.path}: the run has no test examples")
        epochs = self.run.epochs()
        if 0 not in epochs:
            raise UserError(f"{self.run.checkpoint(0)}: missing; the retraining harness starts from the run's "
                            "initial adapter (re-run `llm-influence finetune` in a new --out directory)")
        self.final_checkpoint = self.run.resolve_checkpoints("last")[0]
        self._final = self.run.checkpoints_root / self.final_checkpoint
        for folder in (self.run.checkpoint(0), self._final):
            kind, reason = verify_checkpoint(folder)
            if kind is not None:
                raise UserError(f"{folder}: {reason}; re-run `llm-influence finetune` to recompute it")
        info = read_state_info(self._final) or {}
        if not info.get("finished"):
            raise UserError(f"{self.run.path}: the fine-tune is not complete (last checkpoint "
                            f"{self.final_checkpoint}); finish it with `llm-influence finetune` first")
        self.epochs = int(info.get("epoch", int(self.final_checkpoint.split("-")[1])))
        self.final_lr = float(info["lr"]) if info.get("lr") is not None else float(info["param_groups"][0]["lr"])

        with torch.random.fork_rng(devices=[]):  # the caller's RNG is left alone (each retrain sets its own)
            base, tokenizer, _ = load_model(self.model_name, trust_remote_code=trust_remote_code)
        self.model = attach_lora(base, self.lora, seed=self.seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.device = next(self.model.parameters()).device
        self.autocast = resolve_autocast(self.args.autocast, self.device)
        formatter = ChatFormatter(tokenizer, max_length=self.args.max_length, loss_on=self.args.loss_on)
        self.train_enc = [formatter.encode(e) for e in task.train]
        self.test_enc = [formatter.encode(e) for e in task.test]
        self.pad_id = tokenizer.pad_token_id
        self._starts: dict[int, _Start] = {
            self.seed: _Start(_read_tensors(self.run.checkpoint(0) / "adapter_model.safetensors"),
                              _read_tensors(self.run.checkpoint(0) / OPTIMIZER_FILE)["rng.torch"])}
        self._final_weights = _read_tensors(self._final / "adapter_model.safetensors")
        self.retrain_seconds: list[float] = []

    # -- sizes ----------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return len(self.train_enc)

    @property
    def n_test(self) -> int:
        return len(self.test_enc)

    def identity(self) -> dict[str, Any]:
        """What determines a retrain's result besides its mask and seed (the key of
        :class:`~llm_influence.training.retrain_cache.CachedRetrainer`): the run's fine-tuning
        configuration and examples, its initial checkpoint's files, the epochs trained, the
        harness's source digest, the torch version and thread count."""
        from ..io_utils import sha256_file
        from ..methods.base import implementation_digest

        start = self.run.checkpoint(0)
        return {"finetune": self.run.config()["finetune"], "train_ids": self.train_ids, "test_ids": self.test_ids,
                "initial": {name: sha256_file(start / name) for name in ("adapter_model.safetensors", OPTIMIZER_FILE)},
                "final_checkpoint": self.final_checkpoint, "epochs": self.epochs,
                "code": implementation_digest(type(self)), "torch": torch.__version__,
                "threads": torch.get_num_threads()}

    # -- state ----------------------------------------------------------------------------
    def _set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, weights)
        bad = list(getattr(result, "unexpected_keys", [])) + [
            k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if bad:
            raise UserError(f"{self.run.path}: the adapter weights do not fit the model ({bad[0]})")

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The current LoRA weights (peft state-dict keys, as saved in a checkpoint), cloned."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def replayed_start(self, seed: int) -> _Start:
        """The start state ``finetune --seed seed`` would have (module docstring), rebuilt by
        replaying its seeding, model load and LoRA attachment (loads the model once more)."""
        from peft import get_peft_model_state_dict

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base, _, _ = load_model(self.model_name, trust_remote_code=self.trust_remote_code)
            rng = torch.get_rng_state()
        fresh = attach_lora(base, self.lora, seed=seed)
        weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(fresh).items()}
        return _Start(weights, rng)

    def _start(self, seed: int) -> _Start:
        if seed not in self._starts:
            self._starts[seed] = self.replayed_start(seed)
        return self._starts[seed]

    # -- retraining -----------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.params, lr=self.args.lr, weight_decay=self.args.weight_decay)

    def _train(self, rows: list[int], seed: int) -> None:
        args, bs = self.args, self.args.batch_size
        optimizer = self._optimizer()
        steps_per_epoch = math.ceil(len(rows) / bs)
        total_steps = steps_per_epoch * args.epochs
        step = 0
        self.model.train()
        for epoch in range(1, self.epochs + 1):
            order = epoch_order(len(rows), seed, epoch)
            for b in range(steps_per_epoch):
                idx = [rows[i] for i in order[b * bs:(b + 1) * bs]]
                batch = collate([self.train_enc[i] for i in idx], self.pad_id)
                train_step(self.model, optimizer, self.params, batch, lr=lr_at(step, total_steps, args),
                           max_grad_norm=args.max_grad_norm, autocast=self.autocast, device=self.device,
                           where=f"retraining on {len(rows)} of {self.n_train} examples, epoch {epoch} "
                                 f"step {step + 1}", ids=[self.train_ids[i] for i in idx])
                step += 1

    def retrain(self, mask: np.ndarray, seed: Optional[int] = None) -> np.ndarray:
        """``[n_test]`` float64: each test example's loss (nats, eval mode, the run's
        ``eval_batch_size`` batches in test-file order) after retraining on ``mask``
        (``[n_train]`` bool) with training seed ``seed`` (``None`` = the run's). The global
        torch RNG is left as it was; the model keeps the retrained adapter
        (:meth:`adapter_state`) until the next call."""
        rows = np.flatnonzero(check_mask(mask, self.n_train)).tolist()
        seed = self.seed if seed is None else int(seed)
        start = self._start(seed)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            self._set_weights(start.weights)
            torch.set_rng_state(start.rng)
            self._train(rows, seed)
        losses = self.test_losses()
        self.retrain_seconds.append(time.perf_counter() - t0)
        return losses

    # -- evaluation -----------------------------------------------------------------------
    def test_losses(self, indices: Optional[Sequence[int]] = None, batch_size: Optional[int] = None) -> np.ndarray:
        """Test losses of the current adapter, float64: all test examples in the run's
        ``eval_batch_size`` batches (default), or ``indices`` in batches of ``batch_size``."""
        encoded = self.test_enc if indices is None else [self.test_enc[j] for j in indices]
        size = self.args.eval_batch_size if batch_size is None else batch_size
        batches = _batch_losses(self.model, encoded, self.pad_id, size)
        return torch.cat(batches).to(torch.float64).numpy() if batches else np.zeros(0)

    def final_losses(self, indices: Optional[Sequence[int]] = None, batch_size: Optional[int] = None) -> np.ndarray:
        """:meth:`test_losses` of the run's final adapter (the full-mask reference)."""
        self._set_weights(self._final_weights)
        return self.test_losses(indices, batch_size)

    def tail_patch(self, rows: Sequence[int], test_indices: Sequence[int]) -> np.ndarray:
        """``[len(test_indices)]`` float64: losses of those test examples (each evaluated
        alone, batch of 1) after one optimiser step on the training ``rows`` as one batch,
        from the run's final adapter, AdamW state and RNG state, at its last learning rate
        (module docstring). Compare with ``final_losses(test_indices, batch_size=1)``."""
        rows = sorted(set(int(i) for i in rows))
        if not rows or rows[0] < 0 or rows[-1] >= self.n_train:
            raise ValueError(f"tail_patch: rows must be indices in [0, {self.n_train}), got {rows[:5]}")
        with torch.random.fork_rng(devices=[]):
            self._set_weights(self._final_weights)
            optimizer = self._optimizer()
            load_trainer_state(self._final, optimizer)  # AdamW moments and step count, and the RNG
            self.model.train()
            batch = collate([self.train_enc[i] for i in rows], self.pad_id)
            train_step(self.model, optimizer, self.params, batch, lr=self.final_lr,
                       max_grad_norm=self.args.max_grad_norm, autocast=self.autocast, device=self.device,
                       where=f"tail-patch step on {len(rows)} examples", ids=[self.train_ids[i] for i in rows])
        return self.test_losses(test_indices, batch_size=1)
