"""Task registry: the paper's ground-truth tasks, read from the data directory.

The data directory is never hard-coded: it comes from ``--data-dir`` or the
``LLM_INFLUENCE_DATA`` environment variable (see ``shared/data/README.md`` for the files).
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..errors import UserError, warn
from .example import Example, TaskData
from .jsonl import read_examples, read_examples_with_lines

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


def split_validation(full_test: Sequence[Example], test: Sequence[Example], per_group: int,
                     seed: int) -> tuple[list[Example], list[Example]]:
    """``(test, val)``: up to ``per_group`` validation examples per group that are never
    attributed.

    Per group of ``test`` (the subsample that will be attributed, drawn from ``full_test``):
    if ``full_test`` has rows of that group that ``test`` left out, the validation rows are
    a seeded subsample of those (``test`` unchanged); otherwise every row of the file is
    attributed, and ``min(per_group, n - 1)`` of them (n = the group's test rows, so at
    least one stays attributed) are held out: moved from ``test`` to ``val`` and excluded
    from Acc/Cover. Both lists keep the file order."""
    if per_group < 1:
        raise UserError(f"val_per_group must be >= 1, got {per_group}")
    chosen = {ex.id for ex in test}
    val_ids: set[str] = set()
    for group in sorted({ex.group for ex in test}):
        unused = [ex for ex in full_test if ex.group == group and ex.id not in chosen]
        if unused:
            picked = subsample(unused, per_group, seed)
        else:
            rows = [ex for ex in test if ex.group == group]
            picked = subsample(rows, min(per_group, len(rows) - 1), seed) if len(rows) > 1 else []
        val_ids.update(ex.id for ex in picked)
    kept = [ex for ex in test if ex.id not in val_ids]
    val = [ex for ex in full_test if ex.id in val_ids]
    return kept, val


@dataclass(frozen=True)
class _UserFiles:
    """Where a ``jsonl:`` task came from, for messages that name file and line."""

    train: Path
    test: Optional[Path]
    train_lines: dict[str, int]
    test_lines: dict[str, int]


def _load_user_jsonl(spec: str) -> tuple[TaskData, _UserFiles]:
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
    train, train_lines = read_examples_with_lines(train_path, id_prefix="train-")
    test, test_lines = read_examples_with_lines(test_path, id_prefix="test-") if test_path is not None else ([], [])
    files = _UserFiles(train_path, test_path, {e.id: n for e, n in zip(train, train_lines)},
                       {e.id: n for e, n in zip(test, test_lines)})
    return TaskData(name=spec, train=train, test=test, description=f"user data {train_path}"), files


def check_groups(task: TaskData, files: _UserFiles) -> None:
    """Ground truth is "same group", so every test group needs training examples.

    * No test example has a relevant training example: Acc and Cover would be undefined
      for all of them -> :class:`UserError` naming the first test line.
    * Some test groups are absent from training: a warning; those test examples are
      excluded from Acc/Cover (``n_skipped`` in ``metrics.json``).
    * A test group with a single training example: a warning (k = 1, so Cover equals Acc
      for its test examples); it is scored normally.
    """
    if not task.test or files.test is None:
        return
    train_counts = Counter(ex.group for ex in task.train)
    absent = [ex for ex in task.test if ex.group not in train_counts]
    if absent:
        first = absent[0]
        where = f"{files.test}:{files.test_lines.get(first.id, '?')}: field 'group'"
        groups = sorted({ex.group for ex in absent})
        shown = ", ".join(repr(g) for g in groups[:5]) + (f" and {len(groups) - 5} more" if len(groups) > 5 else "")
        if len(absent) == len(task.test):
            raise UserError(f"{where}: no test group occurs in the training data {files.train} ({shown}); "
                            "relevance is 'same group', so Acc and Cover would be undefined")
        warn(f"{where}: test group(s) {shown} absent from the training data: their {len(absent)} test "
             "example(s) have no relevant training example and are excluded from Acc/Cover (n_skipped)")
    single = sorted(g for g in {ex.group for ex in task.test} if train_counts.get(g) == 1)
    if single:
        first = next(ex for ex in task.train if ex.group == single[0])
        shown = ", ".join(repr(g) for g in single[:5]) + (f" and {len(single) - 5} more" if len(single) > 5 else "")
        warn(f"{files.train}:{files.train_lines.get(first.id, '?')}: field 'group': group(s) {shown} have a "
             "single training example: k = 1, so Cover equals Acc for their test examples")


def load_task(
    name: str,
    data_dir: str | Path | None = None,
    *,
    train_per_group: int | Mapping[str, int] | None = None,
    test_per_group: int | Mapping[str, int] | None = None,
    seed: int = 0,
    val_per_group: int | None = None,
) -> TaskData:
    """Load a task by name (see :data:`PAPER_TASKS`) or ``jsonl:PATH``, optionally subsampled.

    ``val_per_group`` (``None``: no validation split) sets aside validation examples from
    the test file that are never attributed (:func:`split_validation`). ``seed`` draws the
    training subsample (``seed``), the test subsample (``seed + 1``) and the validation rows
    (``seed + 2``)."""
    files: Optional[_UserFiles] = None
    if name.startswith("jsonl:"):
        task, files = _load_user_jsonl(name)
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
    full_test = task.test
    task.test = subsample(full_test, test_per_group, seed + 1)
    if val_per_group is not None:
        task.test, task.val = split_validation(full_test, task.test, val_per_group, seed + 2)
    if files is not None:
        check_groups(task, files)
    return task
