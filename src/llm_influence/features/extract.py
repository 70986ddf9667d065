"""The feature engine's entry points: cached extraction for a run's checkpoint, and HVPs.

``extract_features(run, "epoch-3", "train", need={"grads", "kfac"})`` returns the
:class:`Features` of the run's training split at that checkpoint, reading them from
``RUN/features/epoch-3/`` when a file made from the same inputs exists and verifies, and
computing (then storing) them otherwise. See :mod:`.store` for the file layout and the
cache key, :mod:`.gradients` and :mod:`.representations` for what is computed, and
:mod:`.rep_grads` for RepT's ``repgrads`` (own pass; layer resolved once per checkpoint by
:func:`resolve_rep_grads_layer`, part of its key).

**Chunks and resuming.** A split is computed in chunks of ``chunk_size`` consecutive
examples (batches are formed inside a chunk, sorted by length). Each finished chunk is
stored atomically with its key and checksum; an interrupted extraction (SIGINT, SIGKILL,
a crash) run again with the same arguments reuses every finished chunk and computes only
the others, and the assembled features are bitwise identical to an uninterrupted run's
(same chunks, same batches, same arithmetic). ``chunk_size`` is not part of the cache key
(like ``batch_size``, it changes only the batch composition, i.e. float rounding).

**Several processes.** Under ``torchrun`` (see :mod:`llm_influence.distributed`) chunk
``i`` of ``C`` is computed by rank ``i * N // C``; after all ranks finish, rank 0 assembles
the component files and every rank opens them. Every rank must call
:func:`extract_features` with the same arguments (it is a collective call then).

**Memory.** The returned tensors are memory-mapped from the component files, so opening
a training set larger than RAM costs no RAM until it is read. Extraction holds one chunk:
``chunk_size x (sum of block sizes)`` numbers, or ``chunk_size x D`` with a projection.

**Compute dtypes.** ``dtype`` float32 / float64: the model runs in that dtype and the
features are stored in it. bfloat16 / float16 (``--extract-dtype bf16`` / ``fp16``): the model is
kept in float32 and its forward runs under ``torch.autocast`` in the half dtype; per-example
gradients are accumulated and stored in float32 (float16 with a static loss scale of
:data:`FP16_LOSS_SCALE`). float16 needs a CUDA GPU; bfloat16 also runs on the CPU
(autocast), where it is mainly useful on CPUs with native bfloat16 instructions; on a CPU
without them (:func:`llm_influence.hardware.cpu_has_native_bf16`) it is emulated and many
times slower than float32, which a warning says once per process (it still runs in bf16).

**Projection** (``projection=ProjectionSpec(D, seed, kind)``): each batch's per-example
gradients are projected (:mod:`.projection`) before they are stored, so the stored grads
are ``[n, 1, k_l]`` per block; part of the grads cache key.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import AbstractSet, Any, Optional

import torch

from .. import distributed
from ..config import TrainArgs
from ..errors import UserError
from ..hardware import warn_if_emulated_bf16
from ..io_utils import write_json
from ..progress import log
from ..rundir import RunDir
from . import store
from .gradients import NonFiniteError, compute_features, lora_modules
from .hvp import make_hvp
from .measure import Measurement
from .optimizer import load_adam_moments
from .projection import GradientProjector, ProjectionSpec
from .rep_grads import POSITIONS as REPGRAD_POSITIONS
from .rep_grads import PROBE_RULE, RepGradSpec, probe_layer, representation_gradients
from .representations import POOLINGS
from .types import HVP, Features

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
HALF_DTYPES = (torch.bfloat16, torch.float16)
CACHED = ("grads", "reps", "kfac", "repgrads")
KNOWN_NEEDS = frozenset({"grads", "reps", "kfac", "hvp", "history", "repgrads", "optimizer"})
#: the RepT probing result of a checkpoint (``RUN/features/epoch-N/rept-layer.json``)
REPT_LAYER_FILE = "rept-layer.json"
KFAC_TOKENS = "non-pad tokens t <= last position whose logit is supervised"
DEFAULT_CHUNK_SIZE = 256
#: static loss scale for float16 extraction (gradients are divided by it again in float32)
FP16_LOSS_SCALE = 1024.0


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise UserError(f"feature dtype must be one of {', '.join(DTYPES)}; got {dtype}")


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype features are stored in (and the model's weights kept in): float32 for the
    half-precision compute dtypes, the dtype itself otherwise."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _device(device: Optional[str | torch.device]) -> torch.device:
    if device is None:
        return distributed.current().device()
    return torch.device(device)


def check_compute_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """A :class:`UserError` for a half dtype the device cannot run."""
    name = _dtype_name(dtype)
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError(f"--extract-dtype {name} needs a CUDA GPU (float16 autocast is not supported on the {device.type}); "
                        "use --extract-dtype bf16 or float32")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--extract-dtype {name}: this GPU has no bfloat16 support; use --extract-dtype fp16 or float32")


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


def _load_model(run: RunDir, name: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    from ..training.load import load_finetuned

    model, formatter, _ = load_finetuned(run, name, trust_remote_code=trust_remote_code)
    model = model.to(device=device, dtype=storage_dtype(dtype))
    model.eval()
    return model, formatter


def cache_keys(run: RunDir, name: str, split: str, *, dtype: torch.dtype, rep_layer: int,
               rep_pooling: str, projection: Optional[ProjectionSpec] = None,
               rep_grads_layer: Optional[int] = None,
               measurement: Optional[Measurement] = None) -> tuple[dict[str, str], dict[str, Any]]:
    """``({component: key}, arguments)`` for the split at checkpoint ``name``.

    Every key covers the model name, the adapter files' contents, the split's example ids
    and texts, the dtype, ``max_length`` and ``loss_on``; the reps key adds ``layer`` and
    ``pooling``, the kfac key the K-FAC flag and token-set definition, the grads key the
    projection (when there is one) and a measurement other than the loss (:mod:`.measure`;
    the default ``loss`` leaves the key as it was); the repgrads key (only with
    ``rep_grads_layer``, a resolved hidden-state index) the layer and the token positions of
    its rows.
    """
    model_name, args = _finetune_config(run)
    examples = _split_examples(run, split)
    common = {"model": model_name, "adapter": store.adapter_digest(run.checkpoints_root / name),
              "examples": store.examples_digest(examples), "n": len(examples), "dtype": _dtype_name(dtype),
              "max_length": args.max_length, "loss_on": args.loss_on}
    grads_specific: dict[str, Any] = {} if projection is None else {"projection": projection.to_dict()}
    if measurement is not None and not measurement.is_default:
        grads_specific["measurement"] = measurement.to_dict()
    keys = {
        "grads": store.component_key(common, "grads", grads_specific or None),
        "reps": store.component_key(common, "reps", {"layer": rep_layer, "pooling": rep_pooling}),
        "kfac": store.component_key(common, "kfac", {"kfac": True, "tokens": KFAC_TOKENS}),
    }
    arguments = {**common, "checkpoint": name, "split": split, "rep_layer": rep_layer,
                 "rep_pooling": rep_pooling, "kfac_tokens": KFAC_TOKENS,
                 "projection": None if projection is None else projection.to_dict()}
    if measurement is not None and not measurement.is_default:
        arguments["measurement"] = measurement.to_dict()
    if rep_grads_layer is not None:
        repgrads_specific: dict[str, Any] = {"layer": rep_grads_layer, "rows": REPGRAD_POSITIONS}
        if measurement is not None and not measurement.is_default:  # RepT's gradient is the measurement's too
            repgrads_specific["measurement"] = measurement.to_dict()
        keys["repgrads"] = store.component_key(common, "repgrads", repgrads_specific)
        arguments["rep_grads_layer"] = rep_grads_layer
    return keys, arguments


def resolve_rep_grads_layer(run: RunDir, name: str, spec: RepGradSpec, *, dtype: torch.dtype,
                            device: torch.device, batch_size: int = 8, force: bool = False,
                            trust_remote_code: bool = False) -> tuple[int, dict[str, Any]]:
    """``(hidden-state index, probe record)`` of RepT's layer at checkpoint ``name``.

    An integer ``spec.layer`` is used as given. ``"auto"`` applies the probing rule
    (:func:`~llm_influence.features.rep_grads.probe_layer`) to the first ``spec.probe_size``
    *training* examples (file order; no test example, no label); the result is stored in
    ``RUN/features/<name>/rept-layer.json`` with a key over the model, adapter, training
    examples, dtype, token settings and probe settings, and reused while the key matches.
    Under ``torchrun`` rank 0 probes and writes, every rank reads the file."""
    if not isinstance(spec.layer, str):
        return int(spec.layer), {"layer": int(spec.layer), "rule": "fixed"}
    keys, arguments = cache_keys(run, name, "train", dtype=dtype, rep_layer=-1, rep_pooling="last-prompt")
    common = {k: arguments[k] for k in ("model", "adapter", "examples", "n", "dtype", "max_length", "loss_on")}
    key = store.component_key(common, "rept-layer", {"probe_size": spec.probe_size, "rule": PROBE_RULE})
    path = run.features_dir(name) / REPT_LAYER_FILE
    world = distributed.current()

    def cached() -> Optional[dict[str, Any]]:
        if force or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return record if record.get("key") == key and isinstance(record.get("layer"), int) else None

    def probe() -> None:
        if not world.is_main or cached() is not None:
            return
        examples = _split_examples(run, "train")[:spec.probe_size]
        if not examples:
            raise UserError(f"{run.path}: no training examples to probe RepT's layer with")
        model, formatter = _load_model(run, name, dtype, device, trust_remote_code)
        encoded = [formatter.encode(ex) for ex in examples]
        layer, cosines = probe_layer(model, encoded, formatter.tokenizer.pad_token_id, batch_size=batch_size)
        write_json(path, {"key": key, "layer": layer, "rule": PROBE_RULE, "probe_size": spec.probe_size,
                          "probe_ids": [ex.id for ex in examples], "cosines": cosines})
        log(f"{path}: RepT layer {layer} by the probing rule on {len(examples)} training prompts")

    distributed.agree(probe, "probing RepT's layer", world)
    distributed.barrier(world)
    record = cached() if not force else json.loads(path.read_text(encoding="utf-8"))
    if record is None or record.get("key") != key:
        raise RuntimeError(f"{path}: the RepT probing result does not load")
    return int(record["layer"]), record


def split_chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """The extraction chunks of a split of ``n`` examples (one empty chunk when ``n == 0``)."""
    return distributed.chunk_ranges(n, chunk_size) or [(0, 0)]


def extract_features(run: RunDir | str | Path, checkpoint: str, split: str, *,
                     need: AbstractSet[str] = frozenset({"grads", "reps", "kfac"}), batch_size: int = 8,
                     dtype: torch.dtype = torch.float32, rep_layer: int = -1,
                     rep_pooling: str = "last-prompt", force: bool = False,
                     device: Optional[str | torch.device] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     projection: Optional[ProjectionSpec] = None, keep_chunks: bool = False,
                     trust_remote_code: bool = False, rep_grads: Optional[RepGradSpec] = None,
                     measurement: Optional[Measurement] = None) -> Features:
    """The :class:`Features` of one split (``"train"`` or ``"test"``) at ``checkpoint``.

    ``need`` selects the fields: ``grads`` (``{block: [n, rows, cols]}`` per-example
    gradients of each example's mean token loss, nats), ``reps`` (``[n, hidden]``, hidden
    state ``rep_layer`` pooled by ``rep_pooling``), ``kfac`` (per-block K-FAC factors of
    this split), ``repgrads`` (RepT's ``[n, 3, hidden]`` signatures at the layer of
    ``rep_grads``, default :class:`RepGradSpec()`, resolved by
    :func:`resolve_rep_grads_layer`; ``Features.repgrads_layer`` is the index used) and
    ``hvp`` (true Hessian-vector products of the *training* loss, see
    :func:`build_hvp`; not cached). ``history`` is accepted and ignored: the caller builds
    TracIn's history from :func:`extract_features` at earlier checkpoints. ``optimizer``
    (training split, with ``grads``) attaches the checkpoint's AdamW moments by block
    (:func:`~llm_influence.features.optimizer.load_adam_moments`; None for ``epoch-0`` or an
    adapter without optimizer state). ``measurement`` (test split only, :mod:`.measure`)
    makes the gradients those of the measurement instead of the loss (part of their key).

    Components are read from ``RUN/features/<checkpoint>/{split}.{component}.safetensors``
    when their key matches (and the file verifies), otherwise computed chunk by chunk
    (``chunk_size`` examples; finished chunks of an interrupted run are reused) with the
    model in eval mode on ``device`` (default: this rank's CUDA device if available, else
    the CPU), and stored. ``dtype``: float32/float64, or bfloat16/float16 autocast with
    float32 features (see the module docstring). ``projection`` projects the gradients
    during extraction. ``force`` recomputes regardless; ``keep_chunks`` keeps the chunk files
    after assembly. ``trust_remote_code`` lets a model loaded by path run its own code (the
    CLI's explicit ``--trust-remote-code``). The tensors returned are on the CPU, memory-mapped from the files.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    unknown = set(need) - KNOWN_NEEDS
    if unknown:
        raise UserError(f"unknown feature(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(KNOWN_NEEDS))}")
    if rep_pooling not in POOLINGS:
        raise UserError(f"rep pooling must be one of {', '.join(POOLINGS)}; got {rep_pooling!r}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise UserError(f"chunk size must be a positive integer, got {chunk_size!r}")
    if measurement is not None and measurement.is_default:
        measurement = None
    if measurement is not None and split != "test":
        raise ValueError("a measurement applies to the test split only (training gradients are the loss's)")
    if "optimizer" in need and "grads" not in need:
        raise ValueError("the optimizer state is assigned to the gradient blocks: ask for grads too")
    world = distributed.current()
    dev = _device(device)
    check_compute_dtype(dtype, dev)
    name = resolve_checkpoint(run, checkpoint)
    examples = _split_examples(run, split)
    ids = [ex.id for ex in examples]
    repgrads_layer = None
    if "repgrads" in need:
        repgrads_layer, _ = resolve_rep_grads_layer(run, name, rep_grads or RepGradSpec(), dtype=dtype, device=dev,
                                                    batch_size=batch_size, force=force and split == "train",
                                                    trust_remote_code=trust_remote_code)
    keys, arguments = cache_keys(run, name, split, dtype=dtype, rep_layer=rep_layer, rep_pooling=rep_pooling,
                                 projection=projection, rep_grads_layer=repgrads_layer, measurement=measurement)
    wanted = [c for c in CACHED if c in need]
    folder = run.features_dir(name)

    loaded: Optional[Features] = None
    missing = set(wanted)
    if wanted and not force:
        loaded, missing = store.load_features(folder, split, {c: keys[c] for c in wanted}, quiet=not world.is_main)
        if loaded is not None and loaded.ids != ids:  # cannot happen with matching keys; be safe
            loaded, missing = None, set(wanted)
    # every rank takes rank 0's view of what is missing, so all take the same branches
    flags = distributed.broadcast_flags([c in missing for c in wanted], world)
    local_missing, missing = missing, {c for c, flag in zip(wanted, flags) if flag}
    for c in sorted(local_missing - missing):  # rank 0 read it, this rank did not: read it again
        comp = store.load_component(folder, split, c, key=keys[c])
        if comp is None or comp.ids != ids:
            raise RuntimeError(f"{store.component_path(folder, split, c)}: unreadable on rank {world.rank}")
        loaded = loaded or Features(ids=ids)
        setattr(loaded, c, comp.payload)

    model = formatter = None
    fresh: Optional[Features] = None
    if missing:
        ranges = split_chunks(len(ids), chunk_size)
        state: dict[str, Any] = {}
        distributed.agree(lambda: state.update(_compute_chunks(
            run, name, split, examples, ids, sorted(missing), keys, folder, ranges, world,
            batch_size=batch_size, dtype=dtype, device=dev, rep_layer=rep_layer, rep_pooling=rep_pooling,
            projection=projection, force=force, trust_remote_code=trust_remote_code,
            repgrads_layer=repgrads_layer, measurement=measurement)),
            f"extracting {split} features", world)
        model, formatter = state.get("model"), state.get("formatter")
        args = {**arguments, "batch_size": batch_size, "chunk_size": chunk_size, "device": str(dev),
                "compute_dtype": _dtype_name(dtype), "world_size": world.size,
                "computed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if world.is_main:
            distributed.agree(lambda: _assemble(folder, split, sorted(missing), keys, ranges, ids, args,
                                                storage_dtype(dtype), keep_chunks), f"assembling {split} features",
                              world)
        else:
            distributed.agree(lambda: None, f"assembling {split} features", world)
        fresh, still = store.load_features(folder, split, {c: keys[c] for c in missing}, verify=world.is_main)
        if still or fresh is None or fresh.ids != ids:
            raise RuntimeError(f"{folder}: the assembled {split} features {sorted(still)} do not load")

    def pick(component: str, empty):
        if component not in need:
            return empty
        source = fresh if component in missing else loaded
        return getattr(source, component)

    features = Features(ids=ids, grads=pick("grads", {}), reps=pick("reps", None), kfac=pick("kfac", None),
                        repgrads=pick("repgrads", None), repgrads_layer=repgrads_layer)
    if "optimizer" in need and split == "train":
        features.optimizer = load_adam_moments(run.checkpoints_root / name, features.blocks)
    if "hvp" in need:
        if model is None or split != "train":
            features.hvp = build_hvp(run, name, batch_size, dtype=dtype, device=dev,
                                     trust_remote_code=trust_remote_code)
        else:
            encoded = [formatter.encode(ex) for ex in examples]
            features.hvp = make_hvp(model, encoded, formatter.tokenizer.pad_token_id, batch_size=batch_size)
    return features


def _compute_chunks(run: RunDir, name: str, split: str, examples, ids: list[str], missing: list[str],
                    keys: dict[str, str], folder: Path, ranges: list[tuple[int, int]], world, *,
                    batch_size: int, dtype: torch.dtype, device: torch.device, rep_layer: int,
                    rep_pooling: str, projection: Optional[ProjectionSpec], force: bool,
                    trust_remote_code: bool = False, repgrads_layer: Optional[int] = None,
                    measurement: Optional[Measurement] = None) -> dict[str, Any]:
    """Compute and store this rank's unfinished chunks of ``missing``; returns the model
    and formatter if it loaded them (for the HVP), else an empty dict. RepT's ``repgrads``
    come from their own pass (no parameter gradient), :func:`_repgrads_chunk`; so do the gradients of a
    ``measurement`` other than the loss (:func:`_measured_grads_chunk`)."""
    todo: list[tuple[int, set[str]]] = []
    for i in distributed.mine(len(ranges), world):
        a, b = ranges[i]
        need = {c for c in missing
                if force or store.load_chunk(folder, split, c, keys[c], a, b, ids[a:b]) is None}
        if need:
            todo.append((i, need))
    done = len(distributed.mine(len(ranges), world)) - len(todo)
    if done:
        log(f"{folder}: {split}: {done} of {len(ranges)} chunk(s) already finished, reusing them")
    if not todo:
        return {}
    model, formatter = _load_model(run, name, dtype, device, trust_remote_code)
    projector = None
    if projection is not None and any("grads" in need for _, need in todo):
        shapes = {b: tuple(m.weight.shape) for b, m in lora_modules(model).items()}
        projector = GradientProjector(projection, shapes)
    autocast = dtype if dtype in HALF_DTYPES else None
    if dtype == torch.bfloat16:
        warn_if_emulated_bf16(device, "--extract-dtype bf16")  # kept (asked for), but said to be slow
    loss_scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0
    for i, need in todo:
        a, b = ranges[i]
        encoded = [formatter.encode(ex) for ex in examples[a:b]]
        if "repgrads" in need:
            _repgrads_chunk(run, name, split, model, formatter,
                            encoded if measurement is None else [measurement.encode(formatter, ex)
                                                                 for ex in examples[a:b]],
                            ids, keys, folder, (a, b),
                            f"{split} RepT signatures ({name})" + (f" chunk {i + 1}/{len(ranges)}" if len(ranges) > 1
                                                                  else ""),
                            layer=repgrads_layer, batch_size=batch_size, autocast=autocast, loss_scale=loss_scale,
                            measure=None if measurement is None else measurement.objective())
            need = need - {"repgrads"}
            if not need:
                continue
        if measurement is not None and "grads" in need:
            _measured_grads_chunk(run, name, split, model, formatter, examples[a:b], ids, keys, folder, (a, b),
                                  f"{split} gradients of {measurement.spec()} ({name})", measurement=measurement,
                                  batch_size=batch_size, transform=projector, autocast=autocast, loss_scale=loss_scale)
            need = need - {"grads"}
            if not need:
                continue
        try:
            res = compute_features(model, encoded, formatter.tokenizer.pad_token_id, grads="grads" in need,
                                   kfac="kfac" in need, reps="reps" in need, rep_layer=rep_layer,
                                   rep_pooling=rep_pooling, batch_size=batch_size,
                                   description=f"{split} features ({name})" + (
                                       f" chunk {i + 1}/{len(ranges)}" if len(ranges) > 1 else ""),
                                   transform=projector, autocast_dtype=autocast, loss_scale=loss_scale)
        except NonFiniteError as exc:
            bad = ", ".join(ids[a + j] for j in exc.indices)
            hint = " (float16 overflow? use --extract-dtype bf16)" if dtype == torch.float16 else ""
            raise UserError(f"{run.checkpoints_root / name}: non-finite loss or gradient for {split} "
                            f"example(s) {bad}{hint}; the adapter may have diverged (lower --lr)") from None
        payloads = {"grads": res.grads, "reps": res.reps, "kfac": (res.kfac_sums, res.kfac_tokens)}
        for c in sorted(need):
            store.save_chunk(folder, split, c, keys[c], a, b, ids[a:b], payloads[c], seconds=res.seconds)
        log(f"{folder}: {split} chunk {i + 1}/{len(ranges)} (examples {a}..{b - 1}) computed "
            f"({', '.join(sorted(need))}) in {res.seconds:.1f} s")
    return {"model": model, "formatter": formatter}


def _measured_grads_chunk(run: RunDir, name: str, split: str, model, formatter, examples, ids: list[str],
                          keys: dict[str, str], folder: Path, span: tuple[int, int], description: str, *,
                          measurement: Measurement, batch_size: int, transform, autocast: Optional[torch.dtype],
                          loss_scale: float) -> None:
    """Compute and store one chunk of test gradients of ``measurement`` (:mod:`.measure`):
    the examples encoded as the measurement reads them, its per-example value differentiated."""
    a, b = span
    encoded = [measurement.encode(formatter, ex) for ex in examples]
    try:
        res = compute_features(model, encoded, formatter.tokenizer.pad_token_id, grads=True, batch_size=batch_size,
                               description=description, transform=transform, autocast_dtype=autocast,
                               loss_scale=loss_scale, measure=measurement.objective())
    except NonFiniteError as exc:
        bad = ", ".join(ids[a + j] for j in exc.indices)
        raise UserError(f"{run.checkpoints_root / name}: non-finite measurement {measurement.spec()!r} or its gradient "
                        f"for {split} example(s) {bad}") from None
    store.save_chunk(folder, split, "grads", keys["grads"], a, b, ids[a:b], res.grads, seconds=res.seconds)
    log(f"{folder}: {split} chunk (examples {a}..{b - 1}) computed (grads of {measurement.spec()}) "
        f"in {res.seconds:.1f} s")


def _repgrads_chunk(run: RunDir, name: str, split: str, model, formatter, encoded, ids: list[str],
                    keys: dict[str, str], folder: Path, span: tuple[int, int], description: str, *,
                    layer: Optional[int], batch_size: int, autocast: Optional[torch.dtype],
                    loss_scale: float, measure=None) -> None:
    """Compute and store one chunk of RepT signatures (:mod:`.rep_grads`); ``measure`` (test
    split, :mod:`.measure`) replaces the loss whose gradient is taken."""
    a, b = span
    if layer is None:
        raise RuntimeError("repgrads requested without a resolved layer")
    try:
        res = representation_gradients(model, encoded, formatter.tokenizer.pad_token_id, layer=layer,
                                       batch_size=batch_size, description=description, autocast_dtype=autocast,
                                       loss_scale=loss_scale, measure=measure)
    except NonFiniteError as exc:
        bad = ", ".join(ids[a + j] for j in exc.indices)
        raise UserError(f"{run.checkpoints_root / name}: non-finite loss or representation gradient for {split} "
                        f"example(s) {bad}; the adapter may have diverged (lower --lr)") from None
    except ValueError as exc:  # an out-of-range layer
        raise UserError(f"RepT layer: {exc}") from None
    store.save_chunk(folder, split, "repgrads", keys["repgrads"], a, b, ids[a:b], res.signatures, seconds=res.seconds)
    log(f"{folder}: {split} chunk (examples {a}..{b - 1}) computed (repgrads, layer {layer}) in {res.seconds:.1f} s")


def _assemble(folder: Path, split: str, missing: list[str], keys: dict[str, str], ranges: list[tuple[int, int]],
              ids: list[str], arguments: dict[str, Any], kfac_dtype: torch.dtype, keep_chunks: bool) -> None:
    """Rank 0: the component files from the chunks, then the summary; chunks removed."""
    summary: dict[str, Any] = {"split": split, "n": len(ids), "arguments": arguments, "components": {}}
    for c in missing:
        path, seconds = store.assemble_component(folder, split, c, keys[c], ranges, ids, arguments=arguments,
                                                 kfac_dtype=kfac_dtype)
        summary["components"][c] = {"file": path.name, "key": keys[c], "seconds": seconds, "arguments": arguments}
        if not keep_chunks:
            store.remove_chunks(folder, split, c, keys[c])
    store.update_summary(folder, split, summary)
    secs = sum(v["seconds"] for v in summary["components"].values()) / max(len(missing), 1)
    log(f"{folder}: {split} {', '.join(missing)} for {len(ids)} examples in {secs:.1f} s")


def build_hvp(run: RunDir | str | Path, checkpoint: str, batch_size: int = 8, *,
              dtype: torch.dtype = torch.float32, device: Optional[str | torch.device] = None,
              trust_remote_code: bool = False) -> HVP:
    """Hessian-vector products of the run's mean training loss at ``checkpoint`` (see
    :func:`llm_influence.features.hvp.make_hvp`); loads the fine-tuned model once, in
    ``dtype`` on ``device`` (float32 for the half dtypes: no autocast), and keeps it for the
    callable's lifetime."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    dev = _device(device)
    check_compute_dtype(dtype, dev)
    name = resolve_checkpoint(run, checkpoint)
    examples = _split_examples(run, "train")
    if not examples:
        raise UserError(f"{run.path}: no training examples for Hessian-vector products")
    model, formatter = _load_model(run, name, dtype, dev, trust_remote_code)
    encoded = [formatter.encode(ex) for ex in examples]
    return make_hvp(model, encoded, formatter.tokenizer.pad_token_id, batch_size=batch_size)
