"""Trainer state without pickle: optimizer tensors and the RNG state go to safetensors,
everything else to JSON. Together with the adapter this is enough to resume bitwise.

Every checkpoint's ``trainer_state.json`` also records what produced it and what it holds:

* ``inputs_sha256``: SHA-256 of the fine-tune's inputs (model, LoRA spec, training
  arguments, the examples' ids and texts; see :func:`inputs_digest`);
* ``sha256``: ``{file name: SHA-256}`` of the adapter and optimizer files next to it.

:func:`verify_checkpoint` checks both, so a truncated or modified checkpoint is never used
to resume or to attribute, and one made by other inputs is never mistaken for this run's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors.torch import load_file, save_file

from ..data.example import Example
from ..errors import UserError
from ..io_utils import sha256_file

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
CHECKED_FILES = ("adapter_config.json", ADAPTER_FILE, OPTIMIZER_FILE)


def inputs_digest(config: dict[str, Any], train: Iterable[Example], test: Iterable[Example],
                  val: Iterable[Example] = ()) -> str:
    """SHA-256 over ``config`` (canonical JSON) and every example's id, prompt and response
    (train, test, then the validation examples, which drive early stopping). Groups are
    left out: they do not change training."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    for split, examples in (("train", train), ("test", test), ("val", val)):
        h.update(f"\0{split}\0".encode())
        for ex in examples:
            h.update(json.dumps([ex.id, ex.prompt, ex.response], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def save_trainer_state(folder: Path, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """Write ``optimizer.safetensors`` and ``trainer_state.json`` into ``folder`` (after the
    adapter, whose files' hashes it records)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"state.{idx}.{key}"] = value.detach().clone().contiguous()
    save_file(tensors, str(folder / OPTIMIZER_FILE))
    hashes = {name: sha256_file(folder / name) for name in CHECKED_FILES if (folder / name).is_file()}
    meta = {"param_groups": sd["param_groups"], **info, "sha256": hashes}
    (folder / STATE_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def read_state_info(folder: Path) -> Optional[dict[str, Any]]:
    """The JSON of ``trainer_state.json``, or None when it is missing or unreadable."""
    try:
        meta = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def verify_checkpoint(folder: Path, inputs_sha256: Optional[str] = None, *,
                      need_state: bool = True) -> tuple[Optional[str], str]:
    """``(None, "")`` if the checkpoint in ``folder`` is intact (and, given
    ``inputs_sha256``, made by those inputs); else ``("corrupt" | "stale", reason)``.

    Checkpoints written before hashes were recorded are checked by reading their files.
    ``need_state=False`` accepts an adapter-only folder (no trainer state, e.g. an
    imported adapter), checking its files by reading them.
    """
    meta = read_state_info(folder)
    if meta is None:
        if (folder / STATE_FILE).exists():
            return "corrupt", f"{STATE_FILE} is not valid JSON"
        if need_state:
            return "corrupt", f"{STATE_FILE} is missing"
    hashes = (meta or {}).get("sha256")
    if isinstance(hashes, dict) and hashes:
        for name in CHECKED_FILES:
            if name not in hashes:
                continue
            path = folder / name
            if not path.is_file():
                return "corrupt", f"{name} is missing"
            if sha256_file(path) != hashes[name]:
                return "corrupt", f"{name} does not match its recorded SHA-256 (truncated or modified)"
    else:  # no recorded hashes: at least the files must read
        for name in (ADAPTER_FILE, OPTIMIZER_FILE) if meta is not None else (ADAPTER_FILE,):
            try:
                load_file(str(folder / name))
            except Exception as exc:  # safetensors raises its own types for truncated files
                return "corrupt", f"{name} is unreadable ({type(exc).__name__})"
    recorded = (meta or {}).get("inputs_sha256")
    if inputs_sha256 is not None and recorded is not None and recorded != inputs_sha256:
        return "stale", (f"it was made by other inputs (inputs_sha256 {recorded[:12]}..., this command "
                         f"{inputs_sha256[:12]}...): other data, model or arguments")
    return None, ""


def load_trainer_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer and the torch RNG; return the JSON info."""
    try:
        meta = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / OPTIMIZER_FILE))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if not key.startswith("state."):
                continue
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
        torch.set_rng_state(tensors["rng.torch"])
    except Exception as exc:  # OSError, JSON, safetensors' own types, a state of another shape
        raise UserError(f"{folder}: unreadable trainer state ({type(exc).__name__}); "
                        "delete this checkpoint folder to retrain it") from None
    return meta
