"""The ``attribute`` stage: features -> methods -> ``RUN/scores/epoch-N/METHOD.safetensors``.

For each chosen checkpoint it extracts (or reuses) the features the chosen methods need,
fits each method on the training features, scores the test features and writes the
``[n_test, n_train]`` matrix with its metadata: the score convention, the method's
arguments, its solver diagnostics, the seconds it took and the example ids. A scores file
whose inputs (adapter, examples, feature and method arguments) are unchanged is reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError
from .features import store as feature_store
from .features.extract import DTYPES, extract_features
from .features.types import Features
from .io_utils import atomic_path
from .methods import SCORE_CONVENTION, get_method_class, make_method, method_parameters
from .progress import log
from .rundir import RunDir

DEFAULT_METHODS = ("datainf", "lissa", "gradsim", "repsim", "exact")
SCORES_FORMAT = 1


@dataclass
class AttributeArgs:
    """Arguments of the attribute stage. ``damping=None`` uses the paper's rule: per block,
    ``damping_ratio`` x the mean squared training-gradient entry."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    checkpoint: str = "last"
    damping: Optional[float] = None
    damping_ratio: float = 0.1
    lissa_iters: int = 10
    lissa_scale: Any = "auto"
    hessian: str = "gauss-newton"
    batch_size: int = 8
    dtype: str = "float32"
    rep_layer: int = -1
    rep_pooling: str = "last-prompt"
    force: bool = False


@dataclass
class MethodResult:
    method: str
    checkpoint: str
    path: Path
    shape: tuple[int, int]
    seconds: float
    diagnostics: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


def method_kwargs(name: str, args: AttributeArgs) -> dict[str, Any]:
    """The keyword arguments of method ``name`` that the stage's flags set."""
    offered = {"damping": args.damping, "damping_ratio": args.damping_ratio, "iterations": args.lissa_iters,
               "scale": args.lissa_scale, "hessian": args.hessian}
    accepted = set(method_parameters(name))
    return {k: v for k, v in offered.items() if k in accepted}


def _needs(names: list[str], args: AttributeArgs) -> set[str]:
    needs: set[str] = set()
    for name in names:
        method = make_method(name, **method_kwargs(name, args))
        needs |= set(method.needs)
    return needs


def _lr_per_epoch(run: RunDir) -> dict[int, float]:
    """Mean learning rate of each epoch's optimiser steps (TracIn's checkpoint weights)."""
    sums: dict[int, list[float]] = {}
    if run.train_log.is_file():
        for line in run.train_log.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("kind") == "step":
                sums.setdefault(int(row["epoch"]), []).append(float(row["lr"]))
    return {e: sum(v) / len(v) for e, v in sums.items()}


def _scores_key(run: RunDir, checkpoint: str, name: str, kwargs: dict, args: AttributeArgs,
                examples: dict[str, str]) -> str:
    """Hash of everything a scores file depends on; ``examples`` holds the train/test digests."""
    parts = {
        "format": SCORES_FORMAT, "method": name, "kwargs": kwargs,
        "adapter": feature_store.adapter_digest(run.checkpoints_root / checkpoint), **examples,
        "features": {"dtype": args.dtype, "rep_layer": args.rep_layer, "rep_pooling": args.rep_pooling},
    }
    if name == "tracin":
        parts["history"] = [feature_store.adapter_digest(run.checkpoint(e)) for e in run.epochs() if e > 0
                            and e <= int(checkpoint.split("-")[1])]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_scores(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(scores [n_test, n_train], metadata)`` of a scores file (metadata values decoded)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            scores = fh.get_tensor("scores")
            raw = fh.metadata() or {}
    except Exception as exc:  # safetensors raises several types for truncated files
        raise UserError(f"{path}: unreadable scores file ({type(exc).__name__})") from None
    meta = {k: json.loads(v) for k, v in raw.items()}
    return scores, meta


def _write_scores(path: Path, scores: torch.Tensor, meta: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        save_file({"scores": scores.detach().cpu().contiguous()}, str(tmp),
                  metadata={k: json.dumps(v, default=str) for k, v in meta.items()})


def _reusable(path: Path, key: str) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        _, meta = read_scores(path)
    except UserError:
        return None
    return meta if meta.get("key") == key else None


def attribute(run_path: str | Path, args: AttributeArgs) -> list[MethodResult]:
    """Run every method of ``args`` at every checkpoint of ``args.checkpoint``."""
    run = RunDir(run_path)
    names = list(dict.fromkeys(args.methods))
    for name in names:
        get_method_class(name)
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype!r}: choose one of {', '.join(DTYPES)}")
    task = run.load_task()
    if not task.test:
        raise UserError(f"{run.path}: the run has no test examples to attribute")
    checkpoints = run.resolve_checkpoints(args.checkpoint)
    run.update_config("attribute", asdict(args))
    dtype = DTYPES[args.dtype]
    digests = {"train": feature_store.examples_digest(task.train), "test": feature_store.examples_digest(task.test)}
    results: list[MethodResult] = []
    for checkpoint in checkpoints:
        out_dir = run.scores_dir(checkpoint)
        todo: list[tuple[str, dict, str, Path]] = []
        for name in names:
            kwargs = method_kwargs(name, args)
            key = _scores_key(run, checkpoint, name, kwargs, args, digests)
            path = out_dir / f"{name}.safetensors"
            meta = None if args.force else _reusable(path, key)
            if meta is not None:
                results.append(MethodResult(name, checkpoint, path, tuple(meta["shape"]), float(meta["seconds"]),
                                            meta.get("diagnostics", {}), reused=True))
                continue
            todo.append((name, kwargs, key, path))
        if not todo:
            continue
        needs = _needs([t[0] for t in todo], args)
        feature_needs = needs & {"grads", "reps", "kfac"}
        t0 = time.time()
        train = extract_features(run, checkpoint, "train", need=feature_needs | ({"hvp"} & needs),
                                 batch_size=args.batch_size, dtype=dtype, rep_layer=args.rep_layer,
                                 rep_pooling=args.rep_pooling, force=args.force)
        test = extract_features(run, checkpoint, "test", need=feature_needs - {"kfac"},
                                batch_size=args.batch_size, dtype=dtype, rep_layer=args.rep_layer,
                                rep_pooling=args.rep_pooling, force=args.force)
        feature_seconds = time.time() - t0
        if "history" in needs:
            _attach_history(run, checkpoint, train, test, args, dtype)
        for name, kwargs, key, path in todo:
            method = make_method(name, **kwargs)
            t1 = time.time()
            method.fit(train)
            scores = method.score(test)
            seconds = time.time() - t1
            _check_finite(scores, name, checkpoint, train, test)
            meta = {
                "convention": SCORE_CONVENTION, "method": name, "checkpoint": checkpoint,
                "arguments": method.arguments(), "diagnostics": method.diagnostics, "seconds": seconds,
                "feature_seconds": feature_seconds, "shape": list(scores.shape), "key": key,
                "train_ids": train.ids, "test_ids": test.ids,
            }
            _write_scores(path, scores.float(), meta)
            results.append(MethodResult(name, checkpoint, path, tuple(scores.shape), seconds, method.diagnostics))
    return results


def _attach_history(run: RunDir, checkpoint: str, train: Features, test: Features, args: AttributeArgs,
                    dtype: torch.dtype) -> None:
    """TracIn's checkpoints: every epoch from 1 up to ``checkpoint``, each weighted by the
    mean learning rate of that epoch's steps."""
    last = int(checkpoint.split("-")[1])
    lrs = _lr_per_epoch(run)
    for epoch in [e for e in run.epochs() if 0 < e <= last]:
        name = f"epoch-{epoch}"
        weight = lrs.get(epoch, 0.0)
        if name == checkpoint:
            tr, te = Features(ids=train.ids, grads=train.grads), Features(ids=test.ids, grads=test.grads)
        else:
            tr = extract_features(run, name, "train", need={"grads"}, batch_size=args.batch_size, dtype=dtype)
            te = extract_features(run, name, "test", need={"grads"}, batch_size=args.batch_size, dtype=dtype)
        train.history.append((weight, tr))
        test.history.append((weight, te))


def _check_finite(scores: torch.Tensor, name: str, checkpoint: str, train: Features, test: Features) -> None:
    bad = ~torch.isfinite(scores)
    if bad.any():
        i, j = (int(x) for x in bad.nonzero()[0])
        raise UserError(f"{name} at {checkpoint}: non-finite score for test {test.ids[i]!r} x train "
                        f"{train.ids[j]!r} ({int(bad.sum())} entries); check the features for NaN/Inf")


def summary_line(result: MethodResult) -> str:
    d = result.diagnostics or {}
    parts = [f"{result.method:<11} {result.checkpoint:<9} {result.shape[0]}x{result.shape[1]}",
             f"{result.seconds:8.2f} s" + (" (cached)" if result.reused else "")]
    if d.get("residual_max") is not None:
        parts.append(f"residual max {d['residual_max']:.2e} mean {d['residual_mean']:.2e}")
    if "iterations" in d:
        parts.append(f"iterations {d['iterations']}")
    return "  ".join(parts)
