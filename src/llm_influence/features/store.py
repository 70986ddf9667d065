"""The on-disk feature store: ``RUN/features/epoch-N/{split}.{component}.safetensors``.

One self-contained safetensors file per split (``train`` / ``test``) and component:

* ``{split}.grads.safetensors``: tensors ``grads/<block>`` ``[n, rows, cols]`` (``[n, 1, k_l]``
  for projected gradients, see :mod:`.projection`);
* ``{split}.reps.safetensors``: tensor ``reps`` ``[n, hidden]``;
* ``{split}.kfac.safetensors``: tensors ``kfac/<block>/input_cov`` and ``.../grad_cov``;
* ``{split}.repgrads.safetensors``: tensor ``repgrads`` ``[n, 3, hidden]`` (RepT, :mod:`.rep_grads`).

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

**Chunks (resumable extraction).** A split is extracted in chunks of consecutive
examples; each finished chunk is written atomically to
``RUN/features/epoch-N/chunks/{split}.{component}.{key[:16]}/{start:09d}-{stop:09d}.safetensors``
with the component key, its example range and ids, and the checksum of its tensors
(:func:`save_chunk`). A chunk that verifies is never recomputed (:func:`load_chunk`). When
every chunk exists, :func:`assemble_component` streams them, in order, into the
component file (for K-FAC: the chunks hold float64 sums and token counts, which are added
in chunk order and divided once) and the chunk folder is removed. Chunk folders of an
extraction that was abandoned with other arguments (another key) are left in place; delete
``RUN/features/epoch-N/chunks/`` by hand to reclaim their space.

**Memory-mapped reading.** Files are read with :func:`open_safetensors`, which parses the
safetensors header itself and, for files of at least :data:`MMAP_MIN_BYTES` (256 MiB by
default, env ``LLM_INFLUENCE_MMAP_MIN_BYTES``), maps each tensor's bytes with
``numpy.memmap`` (copy-on-write: the tensors are writable, writes never reach the file);
nothing is read into memory until it is used, so a training set larger than RAM can be
opened. The store never rewrites a file in place (it writes a new file and renames it), so
a mapping stays valid after a recomputation; a file truncated in place by hand while mapped
would crash the reader (SIGBUS), which is why small files are read into memory instead. Verification streams the file
through SHA-256 in 64 MiB pieces (once per process per file version). Files are written by
:func:`write_safetensors`, which streams tensors piece by piece (never holding a whole
component in memory) and produces standard safetensors files (``safetensors.safe_open``
reads them). No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from ..data.example import Example
from ..io_utils import atomic_path, sha256_file, write_json
from ..progress import log
from .types import Features, KFACFactors

FORMAT = "llm-influence-features"
FORMAT_VERSION = 1
COMPONENTS = ("grads", "reps", "kfac", "repgrads")
SPLITS = ("train", "test")


# ---------------------------------------------------------------------------------------
# digests and keys


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
# safetensors files: streaming writer, memory-mapped reader

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "?"}
_PIECE_BYTES = 64 << 20
#: files at least this large are memory-mapped when read (smaller ones are read into memory,
#: so their tensors stay valid whatever later happens to the file); env LLM_INFLUENCE_MMAP_MIN_BYTES
MMAP_MIN_BYTES = int(os.environ.get("LLM_INFLUENCE_MMAP_MIN_BYTES", str(256 << 20)))
_CHECKSUM_PLACEHOLDER = "0" * 64
_MAX_HEADER = 256 << 20


@dataclass
class TensorSource:
    """A tensor to write without holding it: ``pieces()`` yields tensors whose row-major
    bytes, concatenated, are the tensor's (e.g. the rows of each chunk, in order)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Callable[[], Iterable[torch.Tensor]]


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, dtype=np.uint8)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def write_safetensors(path: str | Path, sources: list[TensorSource], metadata: dict[str, str]) -> str:
    """Write a safetensors file atomically from ``sources`` (in name order) and return the
    :func:`tensors_checksum` of its tensors, which is also stored as ``metadata["checksum"]``.
    Memory: one piece at a time."""
    sources = sorted(sources, key=lambda src: src.name)
    header: dict[str, Any] = {}
    offset = 0
    for src in sources:
        if src.dtype not in _ST_DTYPES:
            raise ValueError(f"{src.name}: dtype {src.dtype} cannot be stored")
        nbytes = int(np.prod(src.shape, dtype=np.int64)) * _itemsize(src.dtype)
        header[src.name] = {"dtype": _ST_DTYPES[src.dtype], "shape": [int(x) for x in src.shape],
                            "data_offsets": [offset, offset + nbytes]}
        offset += nbytes

    def encode(checksum: str) -> bytes:
        meta = {**metadata, "checksum": checksum}
        raw = json.dumps({"__metadata__": meta, **header}, ensure_ascii=False, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    first = encode(_CHECKSUM_PLACEHOLDER)
    h = hashlib.sha256()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(first)))
            fh.write(first)
            for src in sources:
                h.update(f"{src.name}|{src.dtype}|{tuple(int(x) for x in src.shape)}|".encode())
                begin, end = header[src.name]["data_offsets"]
                written = 0
                for piece in src.pieces():
                    if piece.dtype != src.dtype:
                        raise ValueError(f"{src.name}: piece dtype {piece.dtype}, expected {src.dtype}")
                    data = _as_bytes(piece)
                    h.update(data)
                    fh.write(memoryview(data))
                    written += data.nbytes
                if written != end - begin:
                    raise ValueError(f"{src.name}: wrote {written} bytes, expected {end - begin}")
            checksum = h.hexdigest()
            final = encode(checksum)
            assert len(final) == len(first)
            fh.seek(8)
            fh.write(final)
    _VERIFIED[(*_file_identity(Path(path)), checksum)] = True  # this process wrote it: no re-hash
    return checksum


def read_header(path: str | Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """``(tensor entries, metadata, data start offset)`` of a safetensors file; raises
    ValueError when the header is malformed or the file is shorter than it says."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError("file shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(fh.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    end_max = 0
    for name, entry in header.items():
        dtype = entry.get("dtype")
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"{name}: unknown dtype {dtype!r}")
        b, e = (int(x) for x in entry["data_offsets"])
        numel = int(np.prod(entry["shape"], dtype=np.int64))
        if e - b != numel * _itemsize(_TORCH_DTYPES[dtype]) or b < 0:
            raise ValueError(f"{name}: data offsets {b}..{e} do not match shape {entry['shape']}")
        end_max = max(end_max, e)
    if start + end_max != size:
        raise ValueError(f"file is {size} bytes, its header describes {start + end_max}")
    return header, meta, start


def _map_tensor(base: Optional[np.ndarray], entry: dict[str, Any], start: int) -> torch.Tensor:
    """One tensor as a view of ``base``, the file's copy-on-write ``uint8`` memory map."""
    dtype = _TORCH_DTYPES[entry["dtype"]]
    shape = tuple(int(x) for x in entry["shape"])
    b, e = (int(x) for x in entry["data_offsets"])
    if e == b or base is None:
        return torch.empty(shape, dtype=dtype)
    raw = base[start + b:start + e]
    if entry["dtype"] in _NP_DTYPES:
        return torch.from_numpy(raw.view(np.dtype(_NP_DTYPES[entry["dtype"]])).reshape(shape))
    return torch.from_numpy(raw).view(dtype).reshape(shape)  # bfloat16: no numpy dtype


_VERIFIED: dict[tuple, bool] = {}


def _file_identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def stream_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """:func:`tensors_checksum` computed in 64 MiB pieces (for memory-mapped tensors)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            flat = _as_bytes(t)
            for i in range(0, flat.nbytes, _PIECE_BYTES):
                h.update(flat[i:i + _PIECE_BYTES])
    return h.hexdigest()


def open_safetensors(path: str | Path, *, verify: bool = True,
                     mmap: Optional[bool] = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file.

    ``mmap``: True maps the tensors (copy-on-write views of one ``numpy.memmap``), False
    reads them into memory, None (default) maps files of at least :data:`MMAP_MIN_BYTES`.
    With ``verify``, the tensors' :func:`tensors_checksum` must equal ``metadata["checksum"]``
    (computed by streaming; remembered per process for an unchanged file). Raises
    ValueError for a malformed, truncated or corrupted file."""
    path = Path(path)
    header, meta, start = read_header(path)
    size = path.stat().st_size
    if mmap is None:
        mmap = size >= MMAP_MIN_BYTES
    base = None
    if size > start:
        base = np.memmap(path, dtype=np.uint8, mode="c") if mmap else np.fromfile(path, dtype=np.uint8)
    tensors = {name: _map_tensor(base, entry, start) for name, entry in header.items()}
    if verify:
        ident = (*_file_identity(path), meta.get("checksum"))
        if not _VERIFIED.get(ident):
            if stream_checksum(tensors) != meta.get("checksum"):
                raise ValueError("checksum mismatch")
            _VERIFIED[ident] = True
    return tensors, meta


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """:func:`write_safetensors` for tensors already in memory; returns the checksum."""
    sources = [TensorSource(name, t.dtype, tuple(t.shape), (lambda t=t: [t])) for name, t in tensors.items()]
    return write_safetensors(path, sources, metadata)


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
    if component in ("reps", "repgrads"):
        return {component: payload.detach().cpu().contiguous()}, {}
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
    if component == "repgrads":
        rg = tensors["repgrads"]
        if rg.dim() != 3 or rg.shape[0] != n:
            raise ValueError(f"repgrads shaped {tuple(rg.shape)}, expected [{n}, 3, hidden]")
        return rg
    blocks = json.loads(meta["blocks"])
    n_tokens = json.loads(meta["n_tokens"])
    return {b: KFACFactors(input_cov=tensors[f"kfac/{b}/input_cov"], grad_cov=tensors[f"kfac/{b}/grad_cov"],
                           n_tokens=int(n_tokens[b])) for b in blocks}


def save_component(folder: str | Path, split: str, component: str, ids: list[str], payload: Any, *,
                   key: str, seconds: float = 0.0, arguments: Optional[dict[str, Any]] = None) -> Path:
    """Write one component atomically; returns its path."""
    path = component_path(folder, split, component)
    tensors, extra = _pack(component, payload)
    save_tensors(path, tensors, _component_meta(component, split, key, ids, seconds, arguments, extra))
    return path


def _component_meta(component: str, split: str, key: str, ids: list[str], seconds: float,
                    arguments: Optional[dict[str, Any]], extra: dict[str, str]) -> dict[str, str]:
    return {"format": FORMAT, "version": str(FORMAT_VERSION), "component": component, "split": split,
            "key": key, "ids": json.dumps(list(ids), ensure_ascii=False), "seconds": repr(float(seconds)),
            "arguments": json.dumps(arguments or {}, sort_keys=True, default=str), **extra}


def load_component(folder: str | Path, split: str, component: str, *, key: Optional[str] = None,
                   quiet: bool = False, verify: bool = True) -> Optional[Component]:
    """The stored component, or None when it is missing, was made for another ``key``
    (None = accept any), or fails verification (unreadable, truncated, checksum
    mismatch, inconsistent shapes). The reason is logged unless ``quiet``. Tensors are
    memory-mapped (:func:`open_safetensors`); ``verify=False`` skips the checksum (for a
    file this process has just written)."""
    path = component_path(folder, split, component)
    if not path.is_file():
        return None
    try:
        _, meta, _ = read_header(path)
        if meta.get("format") != FORMAT or meta.get("version") != str(FORMAT_VERSION) \
                or meta.get("component") != component:
            reason = "not a feature file of this version"
        elif key is not None and meta.get("key") != key:
            reason = "stale (made with other inputs or arguments)"
        else:
            reason = ""
        if reason:
            if not quiet:
                log(f"{path}: {reason}; recomputing")
            return None
        tensors, meta = open_safetensors(path, verify=verify)
        ids = json.loads(meta["ids"])
        payload = _unpack(component, tensors, meta, len(ids))
        return Component(component=component, ids=ids, payload=payload, key=meta["key"],
                         seconds=float(meta.get("seconds", "0")), arguments=json.loads(meta.get("arguments", "{}")))
    except Exception as exc:  # malformed headers, truncation, checksum mismatch, bad metadata
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
                  quiet: bool = False, verify: bool = True) -> tuple[Optional[Features], set[str]]:
    """Load the components named in ``keys`` (``{component: key or None}``).

    Returns ``(features or None, missing)``: ``missing`` is the set of requested
    components that are absent, stale, damaged, or whose ids disagree with the others;
    ``features`` holds the components that loaded (None if none did).
    """
    loaded: dict[str, Component] = {}
    missing: set[str] = set()
    for component, key in keys.items():
        comp = load_component(folder, split, component, key=key, quiet=quiet, verify=verify)
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
        repgrads=loaded["repgrads"].payload if "repgrads" in loaded else None,
    )
    return features, missing


# ---------------------------------------------------------------------------------------
# chunks: resumable extraction


def chunk_dir(folder: str | Path, split: str, component: str, key: str) -> Path:
    """The folder of one component's chunk files for one key."""
    component_path(folder, split, component)  # validates split and component
    return Path(folder) / "chunks" / f"{split}.{component}.{key[:16]}"


def chunk_path(folder: str | Path, split: str, component: str, key: str, start: int, stop: int) -> Path:
    return chunk_dir(folder, split, component, key) / f"{start:09d}-{stop:09d}.safetensors"


def _pack_chunk(component: str, payload: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if component != "kfac":
        return _pack(component, payload)
    sums, n_tokens = payload
    tensors: dict[str, torch.Tensor] = {}
    for b, (a, g) in sums.items():
        tensors[f"kfac/{b}/input_sum"] = a.detach().cpu().to(torch.float64).contiguous()
        tensors[f"kfac/{b}/grad_sum"] = g.detach().cpu().to(torch.float64).contiguous()
    return tensors, {"blocks": json.dumps(list(sums)), "n_tokens": str(int(n_tokens))}


def save_chunk(folder: str | Path, split: str, component: str, key: str, start: int, stop: int,
               ids: list[str], payload: Any, *, seconds: float = 0.0) -> Path:
    """Write one chunk (examples ``start..stop-1``) atomically. ``payload``: grads
    ``{block: [k, ...]}``, reps ``[k, hidden]``, or kfac ``({block: (input_sum, grad_sum)},
    n_tokens)`` with float64 sums over the chunk's tokens."""
    if len(ids) != stop - start:
        raise ValueError(f"chunk {start}..{stop} has {len(ids)} ids")
    path = chunk_path(folder, split, component, key, start, stop)
    tensors, extra = _pack_chunk(component, payload)
    meta = _component_meta(component, split, key, ids, seconds, None,
                           {**extra, "chunk": json.dumps([start, stop])})
    save_tensors(path, tensors, meta)
    return path


def load_chunk(folder: str | Path, split: str, component: str, key: str, start: int, stop: int,
               ids: list[str], *, verify: bool = True) -> Optional[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """``(tensors, metadata)`` of a finished chunk, or None when it is missing, made for
    another key, range or ids, or does not verify (its tensors are memory-mapped)."""
    path = chunk_path(folder, split, component, key, start, stop)
    if not path.is_file():
        return None
    try:
        tensors, meta = open_safetensors(path, verify=verify)
        if meta.get("format") != FORMAT or meta.get("version") != str(FORMAT_VERSION) \
                or meta.get("component") != component or meta.get("key") != key \
                or json.loads(meta.get("chunk", "null")) != [start, stop] or json.loads(meta["ids"]) != list(ids):
            return None
        return tensors, meta
    except Exception:  # damaged or half-described chunk: recompute it
        return None


def assemble_component(folder: str | Path, split: str, component: str, key: str,
                       ranges: list[tuple[int, int]], ids: list[str], *, seconds: float = 0.0,
                       arguments: Optional[dict[str, Any]] = None,
                       kfac_dtype: torch.dtype = torch.float32) -> tuple[Path, float]:
    """Stream the finished chunks ``ranges`` (in order, covering ``ids``) into the
    component file; returns its path and the chunks' extraction seconds, summed. Raises ValueError if a chunk is missing or the chunks
    disagree (block names, shapes, dtypes). Memory: one chunk's tensor at a time (K-FAC:
    the float64 sums)."""
    chunks = []
    for start, stop in ranges:
        loaded = load_chunk(folder, split, component, key, start, stop, ids[start:stop], verify=False)
        if loaded is None:
            raise ValueError(f"chunk {start}..{stop} of {split}.{component} is missing or damaged")
        chunks.append(loaded)
    first_tensors, first_meta = chunks[0]
    names = sorted(first_tensors)
    for tensors, meta in chunks[1:]:
        if sorted(tensors) != names or meta.get("blocks") != first_meta.get("blocks"):
            raise ValueError(f"the chunks of {split}.{component} disagree on their tensors")
        for name in names:
            a, b = tensors[name], first_tensors[name]
            if a.dtype != b.dtype or (component != "kfac" and tuple(a.shape[1:]) != tuple(b.shape[1:])):
                raise ValueError(f"the chunks of {split}.{component} disagree on {name}")
    path = component_path(folder, split, component)
    extra = {k: first_meta[k] for k in ("blocks",) if k in first_meta}
    seconds = float(seconds) or sum(float(m.get("seconds", "0")) for _, m in chunks)
    meta = _component_meta(component, split, key, ids, seconds, arguments, extra)
    if component == "kfac":
        blocks = json.loads(first_meta["blocks"])
        n_tokens = 0
        sums = {b: [torch.zeros_like(first_tensors[f"kfac/{b}/input_sum"]),
                    torch.zeros_like(first_tensors[f"kfac/{b}/grad_sum"])] for b in blocks}
        for tensors, cmeta in chunks:
            n_tokens += int(cmeta["n_tokens"])
            for b in blocks:
                sums[b][0] += tensors[f"kfac/{b}/input_sum"]
                sums[b][1] += tensors[f"kfac/{b}/grad_sum"]
        from .gradients import factors_from_sums

        factors = factors_from_sums({b: (a, g) for b, (a, g) in sums.items()}, n_tokens, kfac_dtype)
        tensors, extra = _pack("kfac", factors)
        save_tensors(path, tensors, {**meta, **extra})
        return path, seconds
    n = len(ids)
    sources = []
    for name in names:
        t0 = first_tensors[name]
        shape = (n, *t0.shape[1:])
        sources.append(TensorSource(name, t0.dtype, shape,
                                    (lambda name=name: (tensors[name] for tensors, _ in chunks))))
    write_safetensors(path, sources, meta)
    return path, seconds


def remove_chunks(folder: str | Path, split: str, component: str, key: str) -> None:
    """Delete one component's chunk folder (and the ``chunks`` folder once it is empty)."""
    d = chunk_dir(folder, split, component, key)
    shutil.rmtree(d, ignore_errors=True)
    try:
        d.parent.rmdir()
    except OSError:
        pass
