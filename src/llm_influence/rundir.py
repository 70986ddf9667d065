"""The run directory: every stage reads and writes here, so each can be re-run, resumed
or inspected on its own.

```
RUN/config.json                 every argument of every stage, plus versions
RUN/data/{train,test,val}.jsonl the exact examples used (after profile subsampling); val = validation only
RUN/checkpoints/epoch-N/        peft adapter (safetensors) + trainer state for resuming
RUN/train_log.jsonl             per step and per epoch: train loss, validation loss
RUN/features/epoch-N/           per-example gradients per LoRA block, representations
RUN/scores/epoch-N/METHOD.safetensors
RUN/metrics.json
RUN/backdoor/epoch-N.json       backdoor tasks: greedy generations on the test prompts and their compliance
```
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from .data.example import Example, TaskData
from .data.jsonl import read_examples
from .errors import UserError
from .io_utils import atomic_path, write_json

EPOCH_RE = re.compile(r"^epoch-(\d+)$")


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from . import __version__

    return {"llm_influence": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def write_examples(path: Path, examples: Iterable[Example]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for ex in examples:
                row = {"id": ex.id, "prompt": ex.prompt, "response": ex.response, "group": ex.group}
                if not ex.group:  # ungrouped data (explain's queries, a user's training set)
                    del row["group"]
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- layout -------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def checkpoints_root(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints_root / f"epoch-{epoch}"

    def features_dir(self, checkpoint: str) -> Path:
        return self.path / "features" / checkpoint

    def scores_dir(self, checkpoint: str) -> Path:
        return self.path / "scores" / checkpoint

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    # -- config -------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_path.is_file()

    def config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise UserError(f"{self.path}: not a run directory (no config.json); run `llm-influence finetune --out {self.path}` first")
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.config_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None

    def update_config(self, section: str, value: Any) -> None:
        cfg = self.config() if self.exists() else {}
        cfg[section] = value
        cfg["versions"] = versions()
        write_json(self.config_path, cfg)

    # -- data ---------------------------------------------------------------------------
    def save_task(self, task: TaskData) -> None:
        write_examples(self.path / "data" / "train.jsonl", task.train)
        write_examples(self.path / "data" / "test.jsonl", task.test)
        if task.val:
            write_examples(self.path / "data" / "val.jsonl", task.val)

    def load_task(self) -> TaskData:
        """The task exactly as fine-tuned (relevance = same group). Groups are required
        unless the config's task section says ``"groups": false`` (explain's query runs)."""
        cfg = self.config()
        grouped = bool(cfg.get("task", {}).get("groups", True))
        train = read_examples(self.path / "data" / "train.jsonl", required_groups=grouped)
        test_path = self.path / "data" / "test.jsonl"
        test = (read_examples(test_path, required_groups=grouped)
                if test_path.is_file() and test_path.stat().st_size else [])
        val_path = self.path / "data" / "val.jsonl"
        val = read_examples(val_path, required_groups=grouped) if val_path.is_file() and val_path.stat().st_size else []
        return TaskData(name=cfg.get("task", {}).get("name", "?"), train=train, test=test, val=val)

    # -- checkpoints --------------------------------------------------------------------
    def epochs(self) -> list[int]:
        """Epochs with a complete checkpoint, ascending (0 = before training, if saved)."""
        if not self.checkpoints_root.is_dir():
            return []
        found = []
        for child in self.checkpoints_root.iterdir():
            m = EPOCH_RE.match(child.name)
            if m and (child / "adapter_model.safetensors").is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def resolve_checkpoints(self, which: str) -> list[str]:
        """``epoch-N``, ``last`` or ``all`` -> checkpoint names (``epoch-N``)."""
        epochs = [e for e in self.epochs() if e > 0]
        if not epochs:
            raise UserError(f"{self.path}: no fine-tuned checkpoint; run `llm-influence finetune --out {self.path}`")
        if which == "last":
            return [f"epoch-{epochs[-1]}"]
        if which == "all":
            return [f"epoch-{e}" for e in epochs]
        m = EPOCH_RE.match(which)
        if not m or int(m.group(1)) not in epochs:
            raise UserError(f"--checkpoint {which!r}: not one of last, all, "
                            + ", ".join(f"epoch-{e}" for e in epochs))
        return [which]
