"""The on-disk feature store: ``RUN/features/epoch-N/{split}.{component}.safetensors``.

One self-contained safetensors file per split (``train`` / ``test``) and component:

* ``{split}.grads.safetensors``: tensors ``grads/<block>`` ``[n, rows, cols]``;
* ``{split}.reps.safetensors``: tensor ``reps`` ``[n, hidden]``;
* ``{split}.kfac.safetensors``: tensors ``kfac/<block>/input_cov`` and ``.../grad_cov``.

Each file's safetensors metadata holds the cache ``key``, the example ``ids`` and block
order (JSON), the extraction ``arguments`` and ``seconds``, and a SHA-256 ``checksum`` of
all its tensor bytes. ``{split}.json`` next to them is a human-readable summary (the
arguments and, per component, its file, key and extraction seconds); it is informational,
the safetensors files are authoritative. Its top-level ``arguments`` are those of the
latest extraction; each component entry keeps the arguments it was made with.

The key is a SHA-256 over the inputs that determine a component (see :func:`component_key`):
model name, adapter file contents, the split's example ids and texts, and the extraction
arguments. A file is reused only when its key matches and its contents verify; a missing,
stale, truncated or corrupted file reads as absent (:func:`load_component` returns None),
so the caller recomputes it. Every file is written to a temporary name and renamed into
place, so an interrupted write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from ..data.example import Example
from ..io_utils import atomic_path, write_json
from ..progress import log
from .types import Features, KFACFactors

FORMAT = "llm-influence-features"
FORMAT_VERSION = 1
COMPONENTS = ("grads", "reps", "kfac")
SPLITS = ("train", "test")


# ---------------------------------------------------------------------------------------
# digests and keys


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def adapter_digest(folder: str | Path) -> str:
    """SHA-256 over a peft adapter folder's ``adapter_config.json`` and weight file(s)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir()
                   if p.name == "adapter_config.json" or (p.name.startswith("adapter_model") and p.is_file()))
    if not files:
        raise FileNotFoundError(f"{folder}: no adapter files")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\0")
    return h.hexdigest()


def examples_digest(examples: Iterable[Example]) -> str:
    """SHA-256 over the examples' ids, prompts and responses, in order (groups excluded:
    they do not change the features)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.id, ex.prompt, ex.response], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def component_key(common: dict[str, Any], component: str, specific: Optional[dict[str, Any]] = None) -> str:
    """SHA-256 of the canonical JSON of ``common`` (model, adapter digest, examples digest,
    dtype, max_length, loss_on, ...), the component name, its own arguments and the format
    version."""
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "component": component,
               "common": common, "specific": specific or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# component files


def component_path(folder: str | Path, split: str, component: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    return Path(folder) / f"{split}.{component}.safetensors"


def summary_path(folder: str | Path, split: str) -> Path:
    return Path(folder) / f"{split}.json"


@dataclass
class Component:
    """One loaded component: ``payload`` is ``{block: [n, rows, cols]}`` (grads), a
    ``[n, hidden]`` tensor (reps) or ``{block: KFACFactors}`` (kfac)."""

    component: str
    ids: list[str]
    payload: Any
    key: str
    seconds: float
    arguments: dict[str, Any] = field(default_factory=dict)


def _pack(component: str, payload: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if component == "grads":
        tensors = {f"grads/{b}": g.detach().cpu().contiguous() for b, g in payload.items()}
        return tensors, {"blocks": json.dumps(list(payload))}
    if component == "reps":
        return {"reps": payload.detach().cpu().contiguous()}, {}
    if component == "kfac":
        tensors: dict[str, torch.Tensor] = {}
        n_tokens = {}
        for b, f in payload.items():
            tensors[f"kfac/{b}/input_cov"] = f.input_cov.detach().cpu().contiguous()
            tensors[f"kfac/{b}/grad_cov"] = f.grad_cov.detach().cpu().contiguous()
            n_tokens[b] = int(f.n_tokens)
        return tensors, {"blocks": json.dumps(list(payload)), "n_tokens": json.dumps(n_tokens)}
    raise ValueError(f"unknown component {component!r}")


def _unpack(component: str, tensors: dict[str, torch.Tensor], meta: dict[str, str], n: int) -> Any:
    if component == "grads":
        blocks = json.loads(meta["blocks"])
        grads = {b: tensors[f"grads/{b}"] for b in blocks}
        if set(tensors) != {f"grads/{b}" for b in blocks}:
            raise ValueError("tensor names do not match the block list")
        for b, g in grads.items():
            if g.dim() != 3 or g.shape[0] != n:
                raise ValueError(f"grads/{b} shaped {tuple(g.shape)}, expected [{n}, rows, cols]")
        return grads
    if component == "reps":
        reps = tensors["reps"]
        if reps.dim() != 2 or reps.shape[0] != n:
            raise ValueError(f"reps shaped {tuple(reps.shape)}, expected [{n}, hidden]")
        return reps
    blocks = json.loads(meta["blocks"])
    n_tokens = json.loads(meta["n_tokens"])
    return {b: KFACFactors(input_cov=tensors[f"kfac/{b}/input_cov"], grad_cov=tensors[f"kfac/{b}/grad_cov"],
                           n_tokens=int(n_tokens[b])) for b in blocks}


def save_component(folder: str | Path, split: str, component: str, ids: list[str], payload: Any, *,
                   key: str, seconds: float = 0.0, arguments: Optional[dict[str, Any]] = None) -> Path:
    """Write one component atomically; returns its path."""
    from safetensors.torch import save_file

    path = component_path(folder, split, component)
    tensors, extra = _pack(component, payload)
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "component": component, "split": split,
            "key": key, "ids": json.dumps(list(ids), ensure_ascii=False), "seconds": repr(float(seconds)),
            "arguments": json.dumps(arguments or {}, sort_keys=True, default=str),
            "checksum": tensors_checksum(tensors), **extra}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_component(folder: str | Path, split: str, component: str, *, key: Optional[str] = None,
                   quiet: bool = False) -> Optional[Component]:
    """The stored component, or None when it is missing, was made for another ``key``
    (None = accept any), or fails verification (unreadable, truncated, checksum
    mismatch, inconsistent shapes). The reason is logged unless ``quiet``."""
    from safetensors import safe_open

    path = component_path(folder, split, component)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("version") != str(FORMAT_VERSION) \
                    or meta.get("component") != component:
                reason = "not a feature file of this version"
                tensors = None
            elif key is not None and meta.get("key") != key:
                reason = "stale (made with other inputs or arguments)"
                tensors = None
            else:
                reason = ""
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        if tensors is None:
            if not quiet:
                log(f"{path}: {reason}; recomputing")
            return None
        if tensors_checksum(tensors) != meta.get("checksum"):
            raise ValueError("checksum mismatch")
        ids = json.loads(meta["ids"])
        payload = _unpack(component, tensors, meta, len(ids))
        return Component(component=component, ids=ids, payload=payload, key=meta["key"],
                         seconds=float(meta.get("seconds", "0")), arguments=json.loads(meta.get("arguments", "{}")))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        if not quiet:
            log(f"{path}: damaged feature file ({type(exc).__name__}: {str(exc)[:120]}); recomputing")
        return None


def update_summary(folder: str | Path, split: str, info: dict[str, Any]) -> None:
    """Merge ``info`` (``arguments`` and ``components.<name>``) into ``{split}.json`` atomically."""
    path = summary_path(folder, split)
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            current = {}
    components = dict(current.get("components", {}))
    components.update(info.get("components", {}))
    current.update({k: v for k, v in info.items() if k != "components"})
    current["components"] = components
    write_json(path, current)


# ---------------------------------------------------------------------------------------
# whole Features


def save_features(folder: str | Path, split: str, features: Features, *, keys: dict[str, str],
                  seconds: Optional[dict[str, float]] = None, arguments: Optional[dict[str, Any]] = None) -> None:
    """Write every component present in ``features`` (grads if any, reps, kfac) with its
    key from ``keys``; then the ``{split}.json`` summary."""
    payloads = {"grads": features.grads or None, "reps": features.reps, "kfac": features.kfac}
    summary: dict[str, Any] = {"split": split, "n": features.n, "arguments": arguments or {}, "components": {}}
    for component, payload in payloads.items():
        if payload is None:
            continue
        secs = float((seconds or {}).get(component, 0.0))
        path = save_component(folder, split, component, features.ids, payload, key=keys[component],
                              seconds=secs, arguments=arguments)
        summary["components"][component] = {"file": path.name, "key": keys[component], "seconds": secs,
                                            "arguments": arguments or {}}
    update_summary(folder, split, summary)


def load_features(folder: str | Path, split: str, keys: dict[str, Optional[str]], *,
                  quiet: bool = False) -> tuple[Optional[Features], set[str]]:
    """Load the components named in ``keys`` (``{component: key or None}``).

    Returns ``(features or None, missing)``: ``missing`` is the set of requested
    components that are absent, stale, damaged, or whose ids disagree with the others;
    ``features`` holds the components that loaded (None if none did).
    """
    loaded: dict[str, Component] = {}
    missing: set[str] = set()
    for component, key in keys.items():
        comp = load_component(folder, split, component, key=key, quiet=quiet)
        if comp is None:
            missing.add(component)
        else:
            loaded[component] = comp
    if not loaded:
        return None, missing
    ids = next(iter(loaded.values())).ids
    for component, comp in list(loaded.items()):
        if comp.ids != ids:
            missing.add(component)
            del loaded[component]
    features = Features(
        ids=list(ids),
        grads=loaded["grads"].payload if "grads" in loaded else {},
        reps=loaded["reps"].payload if "reps" in loaded else None,
        kfac=loaded["kfac"].payload if "kfac" in loaded else None,
    )
    return features, missing
