"""Helpers the LLM studies share: where a study's run lives, when an existing run is reused,
how a method is specified with the attribute stage's defaults, how one checkpoint is
scored in memory, and the per-epoch training log.

A study run is reused when its ``config.json`` equals what the study would fine-tune
(task sizes, model, LoRA spec, training arguments); otherwise the study fine-tunes its own
copy under ``OUT/runs/STUDY-TASK``. :func:`score_checkpoint` fits and scores methods on a
checkpoint's cached features without writing scores into the run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..config import TrainArgs, get_profile, load_profile_task
from ..data.example import TaskData
from ..evaluation.metrics import evaluate_scores, relevance_from_task
from ..evaluation.run_metrics import diagnostics_summary
from ..features.extract import extract_features
from ..methods import make_method, method_parameters
from ..models.lora import LoraSpec
from ..progress import log
from ..rundir import RunDir
from ..training import finetune

#: options every LLM study shares: the methods' damping ratio, the ranking, the feature
#: extraction batch, and where an existing run may be reused from ("" = OUT/runs)
LLM_STUDY_DEFAULTS: dict[str, Any] = {"damping_ratio": 0.1, "rank_by": "score", "extract_batch_size": 8, "runs": ""}



@dataclass
class TaskRun:
    """A fine-tuned run a study works on.

    ``run``: the run directory. ``task``: the examples exactly as fine-tuned
    (``run.load_task()``, relevance = same group). ``reused``: the run existed with the same
    configuration before this call (complete or resumed). ``shared``: it lives at
    ``RUNS/TASK`` where ``reproduce`` keeps its runs (else under ``OUT/runs/STUDY/``).
    ``finetune_seconds``: training time spent in this call (0 when nothing was left to do).
    """

    run: RunDir
    task: TaskData
    reused: bool
    shared: bool
    finetune_seconds: float

    def info(self) -> dict[str, Any]:
        """JSON facts about the run for a study's data: path, sizes, groups, reuse."""
        return {"run_dir": str(self.run.path), "reused": self.reused, "shared": self.shared,
                "finetune_seconds": self.finetune_seconds, "n_train": len(self.task.train),
                "n_test": len(self.task.test), "train_groups": self.task.group_counts("train"),
                "test_groups": self.task.group_counts("test")}


def _roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from ``config.json`` (tuples become lists)."""
    return json.loads(json.dumps(obj, default=str))


def _wanted_config(task: TaskData, task_config: dict, model: str, lora: LoraSpec, args: TrainArgs) -> dict:
    """The ``task`` and ``finetune`` sections :func:`finetune` writes for these arguments."""
    return _roundtrip({
        "task": {"name": task.name, **task_config, "train_ids": [e.id for e in task.train],
                 "test_ids": [e.id for e in task.test], "val_ids": [e.id for e in task.val]},
        "finetune": {"model": model, "lora": lora.to_dict(), "train": asdict(args)},
    })


def _matches(path: Path, wanted: dict) -> bool:
    run = RunDir(path)
    if not run.exists():
        return False
    try:
        cfg = run.config()
    except Exception:  # unreadable config: not ours to reuse
        return False
    return all(cfg.get(section) == value for section, value in wanted.items())


def runs_root(out_dir: Path, runs: str | Path | None) -> Optional[Path]:
    """The directory of shared task runs named by option ``runs`` (``None`` when empty)."""
    return Path(runs) if runs not in (None, "") else None


def ensure_finetuned(study: str, out_dir: Path, runs: str | Path | None, *, task: TaskData, task_config: dict,
                     model: str, lora: LoraSpec, args: TrainArgs, tag: str, shareable: bool) -> TaskRun:
    """Fine-tune ``task`` (or reuse a run with exactly this configuration) and return it.

    Where the run lives:

    * ``shareable`` (the profile's own settings for a paper task, as ``reproduce`` uses):
      ``RUNS/TASK`` if the ``runs`` option names a directory holding a run of this task with
      the same configuration (task examples, model, LoRA spec, training arguments), else
      ``OUT/runs/TASK`` when that holds a matching run or does not exist yet (so a later
      ``reproduce`` into the same ``OUT`` reuses it), else the study's own folder below.
    * otherwise: ``OUT/runs/STUDY/TAG-HASH``, ``HASH`` = the first 10 hex digits of the
      SHA-256 of the configuration, so a change of options never collides with an old run.

    :func:`finetune` resumes an interrupted run and returns at once for a complete one.
    """
    wanted = _wanted_config(task, task_config, model, lora, args)
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:10]
    own = out_dir / "runs" / study / f"{tag}-{digest}"
    path, shared = own, False
    if shareable:
        root = runs_root(out_dir, runs)
        default = out_dir / "runs" / task.name
        candidates = ([root / task.name] if root is not None else []) + [default]
        found = next((c for c in candidates if _matches(c, wanted)), None)
        if found is not None:
            path, shared = found, True
        elif not RunDir(default).exists() and not default.exists():
            path, shared = default, True
    reused = _matches(path, wanted)
    log(f"{study}: {'reusing' if reused else 'fine-tuning'} {task.name} run {path}")
    t0 = time.time()
    finetune(path, task, model_name=model, lora=lora, args=args, task_config=task_config)
    run = RunDir(path)
    return TaskRun(run, run.load_task(), reused, shared, time.time() - t0)


def profile_task_run(study: str, task_name: str, profile_name: str, out_dir: Path, data_dir: Optional[Path],
                     runs: str | Path | None = None, *, lora: Optional[LoraSpec] = None,
                     train: Optional[dict[str, Any]] = None, train_per_group: Any = None,
                     test_per_group: Any = None, tag: Optional[str] = None) -> TaskRun:
    """The run of paper task ``task_name`` under ``profile_name``, with optional overrides.

    Without overrides (``lora``, ``train``, ``train_per_group``, ``test_per_group`` all
    ``None``) the configuration is exactly the one ``reproduce`` fine-tunes (same model,
    LoRA spec, training arguments, stratified subsample and ``task_config``), so its run is
    reused (:func:`ensure_finetuned`). Overrides make a study-specific run named ``tag``.
    """
    profile = get_profile(profile_name)
    task, args, task_config = load_profile_task(profile, task_name, data_dir, train_per_group=train_per_group,
                                                test_per_group=test_per_group, train=train)
    shareable = lora is None and not train and train_per_group is None and test_per_group is None
    return ensure_finetuned(study, out_dir, runs, task=task, task_config=task_config, model=profile.model,
                            lora=lora or profile.lora, args=args, tag=tag or task_name, shareable=shareable)


def method_spec(name: str, damping_ratio: float = 0.1, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """``(method, kwargs)``: the method's declared defaults with ``damping_ratio`` (where the
    method has one) and ``overrides`` (argument names of the method's ``Arguments``)."""
    accepted = method_parameters(name)
    kwargs = {"damping_ratio": damping_ratio} if "damping_ratio" in accepted else {}
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"method_spec: {name} has no argument(s) {', '.join(unknown)}")
    return name, {**kwargs, **overrides}


def score_checkpoint(run: RunDir, checkpoint: str, specs: Sequence[tuple[str, str, dict[str, Any]]], *,
                     rank_by: str = "score", batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """Acc/Cover of each ``(label, method, kwargs)`` at ``checkpoint`` (``epoch-N``/``last``).

    Features (per-example LoRA gradients ``{block: [n, rows, cols]}``, float32; representations
    ``[n, hidden]``) come from the run's feature cache or are extracted once and cached; every
    method is fitted on the training split and scores the test split (``[n_test, n_train]``,
    higher = more helpful) in memory; the scores are ranked in float64, exactly as the attribute
    stage stores them, so Acc/Cover equal what ``evaluate`` reports for the
    same run, checkpoint and method arguments. Returns ``{label: {"acc", "cover", "n_scored",
    "n_skipped", "seconds", "diagnostics"}}`` with Acc/Cover in [0, 1] against the run's
    ground truth (same group) and ``diagnostics`` the method's scalar solver facts
    (relative residual max/mean, iterations, damping range).
    """
    methods = [(label, make_method(name, **kwargs)) for label, name, kwargs in specs]
    needs: set[str] = set()
    for _, m in methods:
        needs |= set(m.required_features())
    if needs - {"grads", "reps", "kfac"}:
        raise ValueError(f"score_checkpoint: methods needing {sorted(needs - {'grads', 'reps', 'kfac'})} "
                         "are not supported here; use the attribute stage")
    train = extract_features(run, checkpoint, "train", need=needs, batch_size=batch_size)
    test = extract_features(run, checkpoint, "test", need=needs - {"kfac"}, batch_size=batch_size)
    relevant = relevance_from_task(run.load_task())
    out: dict[str, dict[str, Any]] = {}
    for label, method in methods:
        t0 = time.perf_counter()
        method.fit(train)
        scores = method.score(test)
        seconds = time.perf_counter() - t0
        m = evaluate_scores(scores.double(), relevant, rank_by=rank_by)
        out[label] = {"acc": float(m.acc), "cover": float(m.cover), "acc_ci95": list(m.acc_ci95),
                      "cover_ci95": list(m.cover_ci95), "n_scored": int(m.n_scored),
                      "n_skipped": int(m.n_skipped), "seconds": seconds,
                      "diagnostics": diagnostics_summary(method.diagnostics)}
    return out


def run_tasks(study: str, tasks: Sequence[str], run_one: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """``[run_one(task) for task in tasks]``, logging ``"STUDY: TASK"`` before each task."""
    results = []
    for task_name in tasks:
        log(f"{study}: {task_name}")
        results.append(run_one(task_name))
    return results


def epoch_log(run: RunDir) -> list[dict[str, Any]]:
    """Per-epoch rows of ``RUN/train_log.jsonl``: ``{"epoch", "train_loss", "val_loss"}``
    (mean per-example token cross-entropy in nats; epoch 0 = before training; ``val_loss``
    ``None`` without a validation split), ascending by epoch, last write of an epoch wins."""
    from ..training.log import read_train_log

    rows: dict[int, dict[str, Any]] = {}
    for row in read_train_log(run.train_log):
        if row.get("kind") == "epoch":
            rows[int(row["epoch"])] = {"epoch": int(row["epoch"]), "train_loss": row.get("train_loss"),
                                       "val_loss": row.get("val_loss")}
    return [rows[e] for e in sorted(rows)]
