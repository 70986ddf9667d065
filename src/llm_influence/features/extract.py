"""The feature engine's entry points: cached extraction for a run's checkpoint, and HVPs.

``extract_features(run, "epoch-3", "train", need={"grads", "kfac"})`` returns the
:class:`Features` of the run's training split at that checkpoint, reading them from
``RUN/features/epoch-3/`` when a file made from the same inputs exists and verifies, and
computing (then storing) them otherwise. See :mod:`.store` for the file layout and the
cache key, :mod:`.gradients` and :mod:`.representations` for what is computed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import AbstractSet, Any, Optional

import torch

from ..config import TrainArgs
from ..errors import UserError
from ..progress import log
from ..rundir import RunDir
from . import store
from .gradients import NonFiniteError, compute_features
from .hvp import make_hvp
from .representations import POOLINGS
from .types import HVP, Features

DTYPES = {"float32": torch.float32, "float64": torch.float64}
CACHED = ("grads", "reps", "kfac")
KNOWN_NEEDS = frozenset({"grads", "reps", "kfac", "hvp", "history"})
KFAC_TOKENS = "non-pad tokens t <= last position whose logit is supervised"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise UserError(f"feature dtype must be one of {', '.join(DTYPES)}; got {dtype}")


def _device(device: Optional[str | torch.device]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_checkpoint(run: RunDir, checkpoint: str) -> str:
    """``epoch-N`` for ``checkpoint`` (``epoch-N``, ``epoch-0`` when saved, or ``last``)."""
    if checkpoint == "epoch-0" and 0 in run.epochs():
        return "epoch-0"
    return run.resolve_checkpoints(checkpoint)[0]


def _finetune_config(run: RunDir) -> tuple[str, TrainArgs]:
    cfg = run.config()
    if "finetune" not in cfg:
        raise UserError(f"{run.config_path}: no 'finetune' section; fine-tune the run first")
    return cfg["finetune"]["model"], TrainArgs(**cfg["finetune"]["train"])


def _split_examples(run: RunDir, split: str):
    if split not in store.SPLITS:
        raise UserError(f"split must be 'train' or 'test', got {split!r}")
    task = run.load_task()
    return task.train if split == "train" else task.test


def _load_model(run: RunDir, name: str, dtype: torch.dtype, device: torch.device):
    from ..training.load import load_finetuned

    model, formatter, _ = load_finetuned(run, name)
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, formatter


def cache_keys(run: RunDir, name: str, split: str, *, dtype: torch.dtype, rep_layer: int,
               rep_pooling: str) -> tuple[dict[str, str], dict[str, Any]]:
    """``({component: key}, arguments)`` for the split at checkpoint ``name``.

    Every key covers the model name, the adapter files' contents, the split's example ids
    and texts, the dtype, ``max_length`` and ``loss_on``; the reps key adds ``layer`` and
    ``pooling``, the kfac key the K-FAC flag and token-set definition.
    """
    model_name, args = _finetune_config(run)
    examples = _split_examples(run, split)
    common = {"model": model_name, "adapter": store.adapter_digest(run.checkpoints_root / name),
              "examples": store.examples_digest(examples), "n": len(examples), "dtype": _dtype_name(dtype),
              "max_length": args.max_length, "loss_on": args.loss_on}
    keys = {
        "grads": store.component_key(common, "grads"),
        "reps": store.component_key(common, "reps", {"layer": rep_layer, "pooling": rep_pooling}),
        "kfac": store.component_key(common, "kfac", {"kfac": True, "tokens": KFAC_TOKENS}),
    }
    arguments = {**common, "checkpoint": name, "split": split, "rep_layer": rep_layer,
                 "rep_pooling": rep_pooling, "kfac_tokens": KFAC_TOKENS}
    return keys, arguments


def extract_features(run: RunDir | str | Path, checkpoint: str, split: str, *,
                     need: AbstractSet[str] = frozenset({"grads", "reps", "kfac"}), batch_size: int = 8,
                     dtype: torch.dtype = torch.float32, rep_layer: int = -1,
                     rep_pooling: str = "last-prompt", force: bool = False,
                     device: Optional[str | torch.device] = None) -> Features:
    """The :class:`Features` of one split (``"train"`` or ``"test"``) at ``checkpoint``.

    ``need`` selects the fields: ``grads`` (``{block: [n, rows, cols]}`` per-example
    gradients of each example's mean token loss, nats), ``reps`` (``[n, hidden]``, hidden
    state ``rep_layer`` pooled by ``rep_pooling``), ``kfac`` (per-block K-FAC factors of
    this split) and ``hvp`` (true Hessian-vector products of the *training* loss, see
    :func:`build_hvp`; not cached). ``history`` is accepted and ignored: the caller builds
    TracIn's history from :func:`extract_features` at earlier checkpoints.

    Components are read from ``RUN/features/<checkpoint>/{split}.{component}.safetensors``
    when their key matches (and the file verifies), otherwise computed in one pass with the
    model in eval mode, in ``dtype`` on ``device`` (default: CUDA if available, else CPU),
    and stored. ``force`` recomputes regardless. The tensors returned are on the CPU.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    unknown = set(need) - KNOWN_NEEDS
    if unknown:
        raise UserError(f"unknown feature(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(KNOWN_NEEDS))}")
    if rep_pooling not in POOLINGS:
        raise UserError(f"rep pooling must be one of {', '.join(POOLINGS)}; got {rep_pooling!r}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    _dtype_name(dtype)
    name = resolve_checkpoint(run, checkpoint)
    examples = _split_examples(run, split)
    ids = [ex.id for ex in examples]
    keys, arguments = cache_keys(run, name, split, dtype=dtype, rep_layer=rep_layer, rep_pooling=rep_pooling)
    wanted = [c for c in CACHED if c in need]
    folder = run.features_dir(name)

    loaded: Optional[Features] = None
    missing = set(wanted)
    if wanted and not force:
        loaded, missing = store.load_features(folder, split, {c: keys[c] for c in wanted})
        if loaded is not None and loaded.ids != ids:  # cannot happen with matching keys; be safe
            loaded, missing = None, set(wanted)

    model = formatter = None
    dev = _device(device)
    computed: dict[str, Any] = {}
    if missing:
        model, formatter = _load_model(run, name, dtype, dev)
        encoded = [formatter.encode(ex) for ex in examples]
        try:
            res = compute_features(model, encoded, formatter.tokenizer.pad_token_id, grads="grads" in missing,
                                   kfac="kfac" in missing, reps="reps" in missing, rep_layer=rep_layer,
                                   rep_pooling=rep_pooling, batch_size=batch_size,
                                   description=f"{split} features ({name})")
        except NonFiniteError as exc:
            bad = ", ".join(ids[i] for i in exc.indices)
            raise UserError(f"{run.checkpoints_root / name}: non-finite loss or gradient for {split} "
                            f"example(s) {bad}; the adapter may have diverged (lower --lr)") from None
        if res.kfac is None and "kfac" in missing:
            raise RuntimeError("K-FAC factors were requested but not computed")
        fresh = Features(ids=ids, grads=res.grads if "grads" in missing else {},
                         reps=res.reps if "reps" in missing else None,
                         kfac=res.kfac if "kfac" in missing else None)
        args = {**arguments, "batch_size": batch_size, "device": str(dev),
                "computed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        store.save_features(folder, split, fresh, keys=keys, seconds={c: res.seconds for c in missing},
                            arguments=args)
        log(f"{folder}: {split} {', '.join(sorted(missing))} for {len(ids)} examples in {res.seconds:.1f} s")
        computed = {"grads": fresh.grads, "reps": fresh.reps, "kfac": fresh.kfac}

    def pick(component: str, empty):
        if component not in need:
            return empty
        if component in missing:
            return computed[component]
        return getattr(loaded, component)

    features = Features(ids=ids, grads=pick("grads", {}), reps=pick("reps", None), kfac=pick("kfac", None))
    if "hvp" in need:
        if model is None or split != "train":
            features.hvp = build_hvp(run, name, batch_size, dtype=dtype, device=dev)
        else:
            features.hvp = make_hvp(model, encoded, formatter.tokenizer.pad_token_id, batch_size=batch_size)
    return features


def build_hvp(run: RunDir | str | Path, checkpoint: str, batch_size: int = 8, *,
              dtype: torch.dtype = torch.float32, device: Optional[str | torch.device] = None) -> HVP:
    """Hessian-vector products of the run's mean training loss at ``checkpoint`` (see
    :func:`llm_influence.features.hvp.make_hvp`); loads the fine-tuned model once, in
    ``dtype`` on ``device``, and keeps it for the callable's lifetime."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    _dtype_name(dtype)
    name = resolve_checkpoint(run, checkpoint)
    examples = _split_examples(run, "train")
    if not examples:
        raise UserError(f"{run.path}: no training examples for Hessian-vector products")
    model, formatter = _load_model(run, name, dtype, _device(device))
    encoded = [formatter.encode(ex) for ex in examples]
    return make_hvp(model, encoded, formatter.tokenizer.pad_token_id, batch_size=batch_size)
