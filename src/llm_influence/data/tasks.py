"""Task registry: the paper's ground-truth tasks, read from the data directory.

The data directory is never hard-coded: it comes from ``--data-dir`` or the
``LLM_INFLUENCE_DATA`` environment variable (see ``shared/data/README.md`` for the files).
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import UserError
from .example import Example, TaskData
from .jsonl import read_examples

DATA_ENV = "LLM_INFLUENCE_DATA"


@dataclass(frozen=True)
class PaperTask:
    """Where a paper task lives in the data directory and what it is."""

    name: str
    paper_name: str
    train_file: str
    test_file: str
    description: str
    extra: bool = False


PAPER_TASKS: dict[str, PaperTask] = {
    t.name: t
    for t in [
        PaperTask("mixed-small", "Mixed (small)", "paper/v2_93f9489/mixedS_train.jsonl",
                  "paper/v2_93f9489/mixedS_test.jsonl",
                  "harmful data identification: 20 harmful + 20 benign train, 40 harmful test"),
        PaperTask("mixed-large", "Mixed (large)", "paper/v1_a514fa6/alpaca_mix_train.jsonl",
                  "paper/v1_a514fa6/alpaca_mix_test.jsonl",
                  "harmful data identification: 20 harmful + 240 Alpaca benign train, 260 harmful test"),
        PaperTask("grammars", "Grammars", "paper/v1_a514fa6/grammars_train.jsonl",
                  "paper/v1_a514fa6/grammars_test.jsonl",
                  "class attribution: 10 grammar rules, prompt -> transformed sentence"),
        PaperTask("math", "MathQA", "paper/v2_93f9489/math_train.jsonl",
                  "paper/v2_93f9489/math_test.jsonl",
                  "class attribution: 10 math word-problem templates with reasoning"),
        PaperTask("harmfulcheck", "HarmfulCheck", "paper/v1_a514fa6/harmfulCheck_train.jsonl",
                  "paper/v1_a514fa6/harmfulCheck_test.jsonl",
                  "class attribution: harmful prompts with refusals vs harmless Alpaca rows"),
        PaperTask("backdoor-1", "Backdoor (1 trigger)", "paper/v2_93f9489/backdoor_train.jsonl",
                  "paper/v2_93f9489/backdoor_test.jsonl",
                  "backdoor trigger detection: clean refusals vs ' sudo mode' compliance"),
        PaperTask("backdoor-3", "Backdoor (3 triggers)", "paper/v2_93f9489/multibackdoor_train.jsonl",
                  "paper/v2_93f9489/multibackdoor_test.jsonl",
                  "backdoor trigger detection: clean + 3 trigger phrases"),
        PaperTask("backdoor-5", "Backdoor (5 triggers)", "paper/v2_93f9489/multibackdoor5_train.jsonl",
                  "paper/v2_93f9489/multibackdoor5_test.jsonl",
                  "backdoor trigger detection: clean + 5 trigger phrases"),
        PaperTask("mixed-l", "MixedL (v2)", "paper/v2_93f9489/mixedL_train.jsonl",
                  "paper/v2_93f9489/mixedL_test.jsonl",
                  "harmful data identification, v2 release: 20 harmful + 230 benign", extra=True),
        PaperTask("emotion", "Emotion", "paper/v2_93f9489/emotion_train.jsonl",
                  "paper/v2_93f9489/emotion_test.jsonl",
                  "class attribution: 5 sentiment labels", extra=True),
        PaperTask("grammars-rule", "Grammars (rule naming, v2)", "paper/v2_93f9489/grammars_train.jsonl",
                  "paper/v2_93f9489/grammars_test.jsonl",
                  "class attribution: name the grammar rule of a transformation", extra=True),
    ]
}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: the argument, else ``$LLM_INFLUENCE_DATA``; it must exist."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV)
        if not data_dir:
            raise UserError(f"no data directory: pass --data-dir DIR or set {DATA_ENV} (e.g. to ../shared/data)")
        source = f"${DATA_ENV}"
    else:
        source = "--data-dir"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"{path}: data directory ({source}) does not exist")
    return path


def subsample(examples: Sequence[Example], per_group: int | Mapping[str, int] | None, seed: int) -> list[Example]:
    """Deterministic stratified subsample, keeping the original order.

    ``per_group`` caps the number of examples of each group (an int for all groups, or a
    mapping group -> cap; groups not in the mapping are kept whole). Which examples are
    kept depends only on ``seed`` and the input, not on anything global.
    """
    if per_group is None:
        return list(examples)
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_group[ex.group].append(i)
    keep: set[int] = set()
    for group in sorted(by_group):
        idx = by_group[group]
        cap = per_group if isinstance(per_group, int) else per_group.get(group, len(idx))
        rng = random.Random(f"{seed}:{group}")
        chosen = idx if cap >= len(idx) else rng.sample(idx, cap)
        keep.update(chosen)
    return [ex for i, ex in enumerate(examples) if i in keep]


def _load_user_jsonl(spec: str) -> TaskData:
    """``jsonl:TRAIN[,TEST]`` or ``jsonl:DIR`` (with ``train.jsonl`` and optional ``test.jsonl``)."""
    body = spec[len("jsonl:"):]
    if not body:
        raise UserError("task 'jsonl:': give a path, as jsonl:TRAIN.jsonl[,TEST.jsonl] or jsonl:DIR")
    if "," in body:
        train_path, test_path = (Path(p).expanduser() for p in body.split(",", 1))
    else:
        p = Path(body).expanduser()
        if p.is_dir():
            train_path, test_path = p / "train.jsonl", p / "test.jsonl"
            if not test_path.exists():
                test_path = None
        else:
            train_path, test_path = p, None
    train = read_examples(train_path, id_prefix="train-")
    test = read_examples(test_path, id_prefix="test-") if test_path is not None else []
    return TaskData(name=spec, train=train, test=test, description=f"user data {train_path}")


def load_task(
    name: str,
    data_dir: str | Path | None = None,
    *,
    train_per_group: int | Mapping[str, int] | None = None,
    test_per_group: int | Mapping[str, int] | None = None,
    seed: int = 0,
) -> TaskData:
    """Load a task by name (see :data:`PAPER_TASKS`) or ``jsonl:PATH``, optionally subsampled."""
    if name.startswith("jsonl:"):
        task = _load_user_jsonl(name)
    else:
        if name not in PAPER_TASKS:
            known = ", ".join(PAPER_TASKS)
            raise UserError(f"unknown task {name!r}; known tasks: {known}, or jsonl:PATH")
        spec = PAPER_TASKS[name]
        root = resolve_data_dir(data_dir)
        kwargs = dict(prompt_field="prompts", response_field="response", group_field="variation", id_field=None)
        train = read_examples(root / spec.train_file, id_prefix="train-", **kwargs)
        test = read_examples(root / spec.test_file, id_prefix="test-", **kwargs)
        task = TaskData(name=name, train=train, test=test, description=spec.description)
    task.train = subsample(task.train, train_per_group, seed)
    task.test = subsample(task.test, test_per_group, seed + 1)
    return task
