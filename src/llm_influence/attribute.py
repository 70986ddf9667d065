"""The ``attribute`` stage: features -> methods -> ``RUN/scores/epoch-N/METHOD.safetensors``.

For each chosen checkpoint it extracts (or reuses) the features the chosen methods need,
fits each method on the training features, scores the test features and writes the
``[n_test, n_train]`` matrix with its metadata: the score convention, the method's
arguments, its solver diagnostics, the seconds it took and the example ids. A scores file
whose inputs (adapter, examples, feature and method arguments) are unchanged is reused.

**Scoring in chunks** (:func:`score_matrix`). The training set is scored in the feature
chunks (``chunk_size`` consecutive examples) and the columns are concatenated, so the
memory-mapped training gradients are never materialised for scoring:

how is the method's own declaration (:class:`~llm_influence.methods.Scoring`); this module
knows no method by name:

* ``SEPARABLE`` methods (gradsim, gradsim-cos, repsim, tracin) need no global fit: each
  chunk is fitted and scored on its own (the columns are those of the whole set);
* ``PRECONDITIONED`` methods (datainf, lissa, exact, exact-full, ekfac, projected) fit on the
  whole training set and precondition the test gradients once,
  ``x_t = (H + lambda I)^{-1} v_t`` (``solve``); then ``score[:, chunk] = sum_l x_l g_l[chunk]^T``;
* ``WHOLE`` methods are fitted and scored whole (rank 0).

**Method arguments** come from each method's ``Arguments`` declaration:
``AttributeArgs.method_args = {method: {field: value}}`` (the command line's
``--method-arg NAME.FIELD=VALUE`` and the shared ``--damping`` / ``--damping-ratio``); the
resolved values are recorded in the scores metadata. The scores cache key holds the
resolved arguments and the digest of the method's source files
(:func:`~llm_influence.methods.implementation_digest`), so changed code never reuses old
scores.

Peak memory of scoring: the solutions ``x`` (``n_test x D`` float64), the scores
(``n_test x n_train`` float64), one training chunk in float64, plus what the method's fit
and solve hold: one training block in float64 (``n_train x d_l``) for the block-wise
methods and ``exact-full``; for ``projected`` a ``min(n, D)^2`` matrix and 256 MiB chunks.

**Several processes** (``torchrun``, :mod:`llm_influence.distributed`): extraction is
sharded by chunk; every rank fits and solves on the whole (memory-mapped) training set, so
the global statistics (damping, Gram matrices, eigenvalues, K-FAC factors assembled from
chunk sums) are the single-process ones by construction; the score columns are sharded by
training chunk and combined exactly. Chunk shapes do not depend on the number of ranks, so
the scores equal a single process's bitwise (``projected`` with ``D <= n`` all-reduces a
float64 sum: equal to rounding). Rank 0 writes the files.
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

from . import distributed
from .errors import UserError
from .features import store as feature_store
from .features.extract import DEFAULT_CHUNK_SIZE, DTYPES, check_compute_dtype, extract_features
from .features.measure import DEFAULT_MEASURE, Measurement, parse_measure
from .features.projection import PROJECTION_KINDS, ProjectionSpec
from .features.types import Features
from .io_utils import atomic_path
from .methods import SCORE_CONVENTION, Method, Scoring, get_method_class, implementation_digest, make_method
from .progress import log
from .rundir import RunDir

DEFAULT_METHODS = ("datainf", "lissa-paper", "lissa", "gradsim", "repsim", "exact")
#: 2: scores stored as float64 (format 1 stored float32, which created ties); old files still read
SCORES_FORMAT = 2


@dataclass
class AttributeArgs:
    """Arguments of the attribute stage.

    ``method_args``: ``{method: {argument: value}}`` for the chosen methods (each method's
    ``Arguments`` declare the names, defaults and checks; unset arguments keep their
    defaults, e.g. the paper's damping rule ``damping_ratio`` 0.1). ``extract_batch_size``:
    examples per forward/backward pass of feature extraction. ``dtype``: ``float32``/``float64`` (model and features), or ``bf16``/``fp16`` (autocast
    forward/backward, float32 features; fp16 needs a GPU). ``chunk_size``: examples per
    feature chunk (resumable extraction, chunked scoring, the unit of work of a rank).
    ``project_dim``: total dimension of a seeded random projection of the gradients
    (``project_seed``, ``project_kind``), applied during extraction; None keeps the full
    gradients. ``measure``: what the test gradients are the gradient of (``loss``,
    ``logprob:TEXT`` or a plugin's name; :mod:`~llm_influence.features.measure`)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoint: str = "last"
    extract_batch_size: int = 8
    dtype: str = "float32"
    rep_layer: int = -1
    rep_pooling: str = "last-prompt"
    force: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    project_dim: Optional[int] = None
    project_seed: int = 0
    project_kind: str = "gaussian"
    trust_remote_code: bool = False
    measure: str = DEFAULT_MEASURE

    def projection(self) -> Optional[ProjectionSpec]:
        """The :class:`ProjectionSpec` of ``project_*`` (None without ``project_dim``)."""
        if self.project_dim is None:
            return None
        return ProjectionSpec(dim=self.project_dim, seed=self.project_seed, kind=self.project_kind)

    def measurement(self) -> Measurement:
        """The parsed ``measure`` (a :class:`UserError` when invalid)."""
        return parse_measure(self.measure)


@dataclass
class MethodResult:
    method: str
    checkpoint: str
    path: Path
    shape: tuple[int, int]
    seconds: float
    diagnostics: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


def build_methods(names: list[str], args: AttributeArgs) -> dict[str, Method]:
    """``{name: Method}`` of the chosen methods with their ``method_args`` (unknown method
    names, arguments for a method that is not chosen, and invalid values are UserErrors)."""
    for name in names:
        get_method_class(name)
    stray = sorted(set(args.method_args) - set(names))
    if stray:
        raise UserError(f"method arguments for {', '.join(stray)}, which is not among the chosen methods "
                        f"({', '.join(names)})")
    return {name: make_method(name, **dict(args.method_args.get(name, {}))) for name in names}


def _needs(methods: list[Method]) -> set[str]:
    needs: set[str] = set()
    for method in methods:
        needs |= set(method.required_features())
    return needs


def _feature_options(methods: list[Method]) -> dict[str, Any]:
    """The extraction options the methods declare (:meth:`Method.feature_options`, e.g.
    RepT's layer); two methods asking for different values of one option is a UserError."""
    out: dict[str, Any] = {}
    for method in methods:
        for key, value in method.feature_options().items():
            if key in out and out[key] != value:
                raise UserError(f"{method.name}: feature option {key}={value!r} conflicts with another "
                                f"chosen method's {out[key]!r}")
            out[key] = value
    return out


def features_for(run: RunDir, checkpoint: str, methods: list[Method], args: AttributeArgs) -> tuple[Features, Features]:
    """The training and test features ``methods`` need at ``checkpoint`` under ``args``'s
    extraction settings (batch size, dtype, representation layer and pooling, chunking,
    projection, measurement, plus the methods' own :meth:`Method.feature_options`), from the
    run's feature cache or extracted into it; with the per-checkpoint history (TracIn) when a
    method needs it. The one place the attribute stage and the studies get features from."""
    needs = _needs(methods)
    feature_needs = needs & {"grads", "reps", "kfac", "repgrads"}
    dtype = DTYPES[args.dtype]
    common = dict(batch_size=args.extract_batch_size, dtype=dtype, rep_layer=args.rep_layer,
                  rep_pooling=args.rep_pooling, force=args.force, chunk_size=args.chunk_size,
                  projection=args.projection(), trust_remote_code=args.trust_remote_code,
                  **_feature_options(methods))
    train = extract_features(run, checkpoint, "train", need=feature_needs | ({"hvp", "optimizer"} & needs), **common)
    test = extract_features(run, checkpoint, "test", need=feature_needs - {"kfac"}, measurement=args.measurement(),
                            **common)
    if "history" in needs:
        _attach_history(run, checkpoint, train, test, args, dtype, optimizer="optimizer" in needs)
    return train, test


def _lr_per_epoch(run: RunDir) -> dict[int, float]:
    """Mean learning rate of each epoch's optimiser steps (TracIn's checkpoint weights)."""
    from .training.log import read_train_log

    sums: dict[int, list[float]] = {}
    for row in read_train_log(run.train_log):  # a line cut short by a killed finetune is skipped
        if row.get("kind") == "step":
            sums.setdefault(int(row["epoch"]), []).append(float(row["lr"]))
    return {e: sum(v) / len(v) for e, v in sums.items()}


def _scores_key(run: RunDir, checkpoint: str, method: Method, args: AttributeArgs,
                examples: dict[str, str]) -> str:
    """Hash of everything a scores file depends on: the method's resolved arguments and
    source digest, the adapter, the examples (``examples``: train/test digests), the
    feature settings and, for methods that use the training history, every earlier
    checkpoint's adapter."""
    name = method.name
    features: dict[str, Any] = {"dtype": args.dtype, "rep_layer": args.rep_layer, "rep_pooling": args.rep_pooling}
    projection = args.projection()
    if projection is not None:  # absent otherwise, so earlier scores files stay valid
        features["projection"] = projection.to_dict()
    measurement = args.measurement()
    if not measurement.is_default:  # likewise: the default loss adds nothing
        features["measure"] = measurement.to_dict()
    parts = {
        "format": SCORES_FORMAT, "method": name, "arguments": method.arguments(),
        "implementation": implementation_digest(type(method)),
        "adapter": feature_store.adapter_digest(run.checkpoints_root / checkpoint), **examples,
        "features": features,
    }
    if "history" in method.required_features():
        parts["history"] = [feature_store.adapter_digest(run.checkpoint(e)) for e in run.epochs() if e > 0
                            and e <= int(checkpoint.split("-")[1])]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_scores(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(scores [n_test, n_train] float64, metadata)`` of a scores file (metadata values
    decoded). Files written before format 2 hold float32 scores; they are read and widened
    exactly (their ranking is that of the stored float32 values)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            scores = fh.get_tensor("scores")
            raw = fh.metadata() or {}
    except Exception as exc:  # safetensors raises several types for truncated files
        raise UserError(f"{path}: unreadable scores file ({type(exc).__name__})") from None
    meta = {k: json.loads(v) for k, v in raw.items()}
    return scores.to(torch.float64), meta


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


def _check_args(methods: list[Method], args: AttributeArgs) -> None:
    if args.dtype not in DTYPES:
        raise UserError(f"--extract-dtype {args.dtype!r}: choose one of {', '.join(DTYPES)}")
    if isinstance(args.chunk_size, bool) or not isinstance(args.chunk_size, int) or args.chunk_size < 1:
        raise UserError(f"--chunk-size must be a positive integer, got {args.chunk_size!r}")
    if args.project_kind not in PROJECTION_KINDS:
        raise UserError(f"--project-kind must be one of {', '.join(PROJECTION_KINDS)}, got {args.project_kind!r}")
    args.measurement()  # an invalid --measure is a UserError before anything is computed
    projection = args.projection()
    if projection is not None:
        for method in methods:
            needs = method.required_features()
            if "optimizer" in needs:
                raise UserError(f"--project-dim: {method.name} rescales each gradient entry by the optimizer state "
                                f"before projecting, which stored projected gradients no longer allow; drop "
                                f"--project-dim and use --method-arg {method.name}.project_dim=D (projects inside "
                                "the method, after the rescaling)")
            if "kfac" in needs:
                raise UserError(f"--project-dim: {method.name} needs the full gradients' Kronecker structure "
                                "(kfac); drop it or --project-dim")
            if "hvp" in needs:
                raise UserError(f"--project-dim: {method.name} with these arguments needs Hessian-vector "
                                "products in the full parameter space (hvp); drop --project-dim")


def attribute(run_path: str | Path, args: AttributeArgs) -> list[MethodResult]:
    """Run every method of ``args`` at every checkpoint of ``args.checkpoint``.

    Under ``torchrun`` every rank calls this with the same arguments (see the module
    docstring); each returns the same results, and rank 0 writes the files."""
    run = RunDir(run_path)
    names = list(dict.fromkeys(args.methods))
    if not names:
        raise UserError("no methods chosen")
    chosen = build_methods(names, args)
    _check_args(list(chosen.values()), args)
    world = distributed.current()
    if world.active:
        log(f"attribute: {world.size} processes ({world.backend}); chunks of {args.chunk_size} examples")
    dtype = DTYPES[args.dtype]
    check_compute_dtype(dtype, world.device())
    projection = args.projection()
    measurement = args.measurement()
    task = run.load_task()
    if not task.test:
        raise UserError(f"{run.path}: the run has no test examples to attribute")
    checkpoints = run.resolve_checkpoints(args.checkpoint)
    if world.is_main:
        run.update_config("attribute", asdict(args))
    digests = {"train": feature_store.examples_digest(task.train), "test": feature_store.examples_digest(task.test)}
    results: list[MethodResult] = []
    for checkpoint in checkpoints:
        out_dir = run.scores_dir(checkpoint)
        candidates = []
        for name in names:
            key = _scores_key(run, checkpoint, chosen[name], args, digests)
            path = out_dir / f"{name}.safetensors"
            candidates.append((name, key, path, None if args.force else _reusable(path, key)))
        # rank 0 decides what is reused, so every rank runs the same methods
        reuse = distributed.broadcast_flags([meta is not None for *_, meta in candidates], world)
        todo: list[tuple[str, str, Path]] = []
        for (name, key, path, meta), reused in zip(candidates, reuse):
            if reused:
                meta = meta if meta is not None else _reusable(path, key)
                results.append(MethodResult(name, checkpoint, path, tuple(meta["shape"]), float(meta["seconds"]),
                                            meta.get("diagnostics", {}), reused=True))
            else:
                todo.append((name, key, path))
        if not todo:
            continue
        t0 = time.time()
        train, test = features_for(run, checkpoint, [chosen[t[0]] for t in todo], args)
        feature_seconds = time.time() - t0
        for name, key, path in todo:
            method = make_method(name, **dict(args.method_args.get(name, {})))  # a fresh instance per checkpoint
            log(f"{name} ({checkpoint}): fitting on {train.n} training examples, scoring {test.n} test examples")
            t1 = time.time()
            scores = score_matrix(method, train, test, chunk_size=args.chunk_size, world=world)
            seconds = time.time() - t1
            _check_finite(scores, name, checkpoint, train, test)
            meta = {
                "convention": SCORE_CONVENTION, "method": name, "checkpoint": checkpoint,
                "arguments": method.arguments(), "diagnostics": method.diagnostics, "seconds": seconds,
                "feature_seconds": feature_seconds, "shape": list(scores.shape), "key": key,
                "train_ids": train.ids, "test_ids": test.ids,
            }
            if projection is not None:
                meta["projection"] = projection.to_dict()
            meta["measure"] = measurement.to_dict()
            if world.is_main:
                _write_scores(path, scores.to(torch.float64), meta)
            distributed.barrier(world)
            results.append(MethodResult(name, checkpoint, path, tuple(scores.shape), seconds, method.diagnostics))
    return results


def score_matrix(method, train: Features, test: Features, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 world: Optional[distributed.World] = None) -> torch.Tensor:
    """``[n_test, n_train]`` float64 scores of ``method`` (not yet fitted), training columns
    in chunks of ``chunk_size`` (see the module docstring); ``method.diagnostics`` are set
    as by ``fit`` + ``score``. Under several ranks each computes the chunks it owns and the
    result (identical on every rank) is combined exactly."""
    world = world or distributed.current()
    ranges = distributed.chunk_ranges(train.n, chunk_size)
    owned = [ranges[i] for i in distributed.mine(len(ranges), world)]
    out = torch.zeros(test.n, train.n, dtype=torch.float64)
    if method.scoring is Scoring.SEPARABLE:
        for a, b in owned:
            out[:, a:b] = method.fit(train.select(list(range(a, b)))).score(test).cpu()
    elif method.scoring is Scoring.PRECONDITIONED:
        method.fit(train)
        xs = method.solve(test)  # {block: [n_test, rows, cols]} float64, every test row
        for a, b in owned:
            part = torch.zeros(test.n, b - a, dtype=torch.float64, device=next(iter(xs.values())).device
                               if xs else torch.device("cpu"))
            for block, x in xs.items():
                g = train.grads[block][a:b]
                part += x.reshape(test.n, -1) @ g.reshape(b - a, -1).to(device=x.device, dtype=torch.float64).T
            out[:, a:b] = part.cpu()
    elif world.is_main:
        out = method.fit(train).score(test).to(device="cpu", dtype=torch.float64)
    if not world.active:
        return out
    return distributed.all_reduce_sum(out, world)


def _attach_history(run: RunDir, checkpoint: str, train: Features, test: Features, args: AttributeArgs,
                    dtype: torch.dtype, optimizer: bool = False) -> None:
    """TracIn's checkpoints: every epoch from 1 up to ``checkpoint``, each weighted by the
    mean learning rate of that epoch's steps. The test gradients are those of
    ``args.measure``; ``optimizer`` attaches each checkpoint's AdamW moments to its
    training features."""
    last = int(checkpoint.split("-")[1])
    lrs = _lr_per_epoch(run)
    for epoch in [e for e in run.epochs() if 0 < e <= last]:
        name = f"epoch-{epoch}"
        weight = lrs.get(epoch, 0.0)
        if name == checkpoint:
            tr = Features(ids=train.ids, grads=train.grads, optimizer=train.optimizer)
            te = Features(ids=test.ids, grads=test.grads)
        else:
            common = dict(batch_size=args.extract_batch_size, dtype=dtype, chunk_size=args.chunk_size,
                          projection=args.projection(), trust_remote_code=args.trust_remote_code)
            tr = extract_features(run, name, "train", need={"grads", "optimizer"} if optimizer else {"grads"}, **common)
            te = extract_features(run, name, "test", need={"grads"}, measurement=args.measurement(), **common)
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
