"""Study ``lissa-iterations``: LiSSA's Acc and Cover against its number of iterations (the
paper's Fig. 4), with RepSim (and the block-exact inverse) as reference lines.

LiSSA approximates ``(G_l + lambda_l I)^{-1} v_l`` per LoRA block by ``T`` steps of a Neumann
series (:mod:`llm_influence.methods.lissa`; automatic scale, the attribute stage's damping
``lambda_l = damping_ratio x mean squared training-gradient entry``). The paper reports that
more iterations do not make it identify the right training data better. For every task we
fine-tune (or reuse) the profile's run, extract the per-example LoRA gradients and the
representations of its last checkpoint **once** (the feature engine caches them in
``RUN/features/epoch-N/``), then score with ``T`` in ``iterations`` (default 1, 2, 5, 10,
20, 50) and compute Acc and Cover against the task's ground truth (same group). Scores are
computed in memory and never written into the run, so a run shared with ``reproduce`` keeps
its own ``scores/`` and ``config.json`` untouched; only the feature cache is filled.

Recorded per task and ``T``: Acc and Cover (in [0, 1]), the seconds of fit + score, and the
solver's relative residual ``||(G_l + lambda_l I) x - v|| / ||v||`` (max and mean over test
examples and blocks), which shows how far ``T`` steps are from the exact solve. References:
``repsim`` (cosine of last-layer hidden states at the last prompt token; the paper's dashed
line) and ``exact`` (the block-exact damped inverse, i.e. LiSSA's limit ``T -> inf``).

Tasks (paper): ``mixed-small``, ``harmfulcheck``, ``grammars``, ``math``, at the profile's
sizes (``config.py``). Under ``cpu`` a run that ``reproduce`` already made is reused (option
``runs``, default ``OUT/runs``), and the study then takes seconds; on its own it fine-tunes
the four tasks first (estimated 6-8 minutes on 2 cores from the cpu profile's measured
throughput of about 3 training examples/s and 2 feature examples/s).

This module also holds the helpers the other LLM studies share (:func:`profile_task_run`,
:func:`ensure_finetuned`, :func:`score_checkpoint`, :func:`epoch_log`): where a study's run
lives, when an existing run is reused, and how a checkpoint is scored.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..attribute import AttributeArgs, method_kwargs
from ..config import TrainArgs, get_profile, load_profile_task
from ..data.example import TaskData
from ..errors import UserError
from ..evaluation.metrics import evaluate_scores, relevance_from_task
from ..evaluation.run_metrics import diagnostics_summary
from ..features.extract import extract_features
from ..methods import make_method
from ..models.lora import LoraSpec
from ..progress import log
from ..rundir import RunDir
from ..training import finetune
from .base import StudyResult, markdown_table, new_figure, register_study, resolve_options, save_figure

NAME = "lissa-iterations"
TASKS = ("mixed-small", "harmfulcheck", "grammars", "math")
PROFILE_SIZE = 0  # option value meaning "the profile's setting"


# =======================================================================================
# shared helpers of the LLM studies
# =======================================================================================


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
    """``(method, kwargs)`` with the attribute stage's defaults (:class:`AttributeArgs`)."""
    attr = AttributeArgs(damping_ratio=damping_ratio, **overrides)
    return name, method_kwargs(name, attr)


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
        needs |= set(m.needs)
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


# =======================================================================================
# the study
# =======================================================================================


def _defaults(profile: str) -> dict[str, Any]:
    return {
        "tasks": TASKS,
        "iterations": (1, 2, 5, 10, 20, 50),
        "references": ("repsim", "exact"),
        "damping_ratio": 0.1,
        "rank_by": "score",
        "batch_size": 8,
        "runs": "",
    }


def run_task(task_name: str, profile: str, out_dir: Path, data_dir: Optional[Path], opts: dict) -> dict[str, Any]:
    """All numbers of one task (module docstring); JSON-serialisable."""
    tr = profile_task_run(NAME, task_name, profile, out_dir, data_dir, opts["runs"] or None)
    checkpoint = tr.run.resolve_checkpoints("last")[0]
    ratio = float(opts["damping_ratio"])
    specs = []
    for t in opts["iterations"]:
        name, kw = method_spec("lissa", ratio, lissa_iters=int(t))
        specs.append((f"lissa-{int(t)}", name, kw))
    for ref in opts["references"]:
        name, kw = method_spec(ref, ratio)
        specs.append((ref, name, kw))
    scored = score_checkpoint(tr.run, checkpoint, specs, rank_by=opts["rank_by"], batch_size=int(opts["batch_size"]))
    lissa = []
    for t in opts["iterations"]:
        s = scored[f"lissa-{int(t)}"]
        lissa.append({"iterations": int(t), "acc": s["acc"], "cover": s["cover"], "seconds": s["seconds"],
                      "residual_max": s["diagnostics"].get("residual_max"),
                      "residual_mean": s["diagnostics"].get("residual_mean"),
                      "damping_min": s["diagnostics"].get("damping_min"),
                      "damping_max": s["diagnostics"].get("damping_max")})
    return {"task": task_name, "checkpoint": checkpoint, **tr.info(), "lissa": lissa,
            "references": {ref: scored[ref] for ref in opts["references"]}}


REF_STYLE = {"repsim": ("--", "RepSim"), "exact": (":", "exact (block)")}


def _figure(results: list[dict], path: Path, profile: str) -> Path:
    k = len(results)
    fig, axes = new_figure(1, k, figsize=(3.4 * k, 3.3), squeeze=False)
    colors = {"acc": "#1f77b4", "cover": "#ff7f0e"}
    for ax, r in zip(axes[0], results):
        its = [p["iterations"] for p in r["lissa"]]
        for metric in ("acc", "cover"):
            ax.plot(its, [p[metric] for p in r["lissa"]], "o-", color=colors[metric],
                    label=f"LiSSA {metric.capitalize()}")
            for ref, m in r["references"].items():
                style, label = REF_STYLE.get(ref, ("-.", ref))
                ax.axhline(m[metric], linestyle=style, color=colors[metric], alpha=0.8,
                           label=f"{label} {metric.capitalize()}")
        ax.set_xscale("log")
        ax.set_xticks(its)
        ax.set_xticklabels([str(i) for i in its], fontsize=8)
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("LiSSA iterations")
        ax.set_title(f"{r['task']} ({r['n_train']} train / {r['n_test']} test)", fontsize=9)
        if ax is axes[0][0]:
            ax.set_ylabel("Acc / Cover")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7,
               bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"Fig. 4: LiSSA Acc and Cover vs iterations (profile {profile})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _markdown(results: list[dict], opts: dict, fig_name: str, profile: str) -> str:
    its = [int(t) for t in opts["iterations"]]
    refs = list(opts["references"])
    head = ["task", "metric"] + [f"T={t}" for t in its] + [REF_STYLE.get(r, ("", r))[1] for r in refs]
    rows = []
    for r in results:
        for metric in ("acc", "cover"):
            rows.append([r["task"], metric.capitalize()] + [p[metric] for p in r["lissa"]]
                        + [r["references"][ref][metric] for ref in refs])
        rows.append([r["task"], "residual max"] + [p["residual_max"] for p in r["lissa"]]
                    + [r["references"][ref]["diagnostics"].get("residual_max") for ref in refs])
    runs = "; ".join(f"{r['task']}: {r['n_train']} train / {r['n_test']} test, {r['checkpoint']}"
                     f"{' (reused run)' if r['reused'] else ''}" for r in results)
    return "\n".join([
        "## LiSSA iterations (paper: Fig. 4)",
        "",
        f"LiSSA (Gauss-Newton, block-wise, automatic scale, damping = {opts['damping_ratio']} x mean squared "
        "training-gradient entry per LoRA block) with T iterations, scored on the last checkpoint of each "
        f"task's fine-tuned run (profile {profile}; {runs}). Acc = fraction of test examples whose top-ranked "
        "training example is in their group; Cover = fraction of the top k that are (k = group size in train). "
        "'residual max' = the largest relative residual ||(G+lambda I)x - v|| / ||v|| over test examples and "
        "blocks: how far T steps are from the exact damped solve (RepSim has none; 'exact (block)' is LiSSA's "
        "limit). Features are extracted once per task and reused for every T.",
        "",
        markdown_table(head, rows),
        "",
        f"![LiSSA Acc and Cover against iterations, one panel per task; RepSim dashed, exact dotted]({fig_name})",
        "",
    ])


@register_study(NAME, "Fig. 4: LiSSA Acc/Cover vs iterations (1-50) on mixed-small, harmfulcheck, grammars, "
                      "math, with RepSim as reference")
def lissa_iterations_study(profile: str, out_dir: Path, data_dir: Optional[Path], options: dict) -> StudyResult:
    """Run the LiSSA-iterations study (module docstring) and write ``lissa-iterations.png``.

    Options: ``tasks`` (paper task names), ``iterations`` (LiSSA step counts), ``references``
    (registered methods drawn as horizontal lines, default ``repsim,exact``),
    ``damping_ratio`` (0.1), ``rank_by`` (``score`` or ``abs``), ``batch_size`` (feature
    extraction), ``runs`` (a directory of ``reproduce`` runs to reuse; default ``OUT/runs``).
    Sizes are the profile's (``config.py``) for every profile.
    """
    opts = resolve_options(NAME, options, _defaults(profile))
    if not opts["iterations"] or any(int(t) < 1 for t in opts["iterations"]):
        raise UserError(f"study {NAME!r}: iterations must be positive integers, got {opts['iterations']!r}")
    results = []
    for task_name in opts["tasks"]:
        log(f"{NAME}: {task_name}")
        results.append(run_task(task_name, profile, out_dir, data_dir, opts))
    fig = _figure(results, out_dir / f"{NAME}.png", profile)
    data = {
        "options": opts,
        "conventions": {
            "acc": "fraction of test examples whose top-ranked training example is relevant (same group), [0, 1]",
            "cover": "mean over test examples of (#relevant among top k) / k, k = #relevant in train, [0, 1]",
            "score": "higher = the training example helped the test example more (-I of the paper's Eq. 3)",
            "lissa": "Gauss-Newton block-wise, scale auto = 1.05 (lambda_max(G_l) + lambda_l), "
                     "lambda_l = damping_ratio x mean squared training-gradient entry of block l",
            "residual": "||(G_l + lambda_l I) x - v|| / ||v||, max/mean over test examples and blocks",
            "seconds": "fit + score on this machine, features excluded",
            "best_iterations_by_acc": "the smallest T with the highest Acc",
        },
        "best_iterations_by_acc": {r["task"]: r["lissa"][int(np.argmax([p["acc"] for p in r["lissa"]]))]["iterations"]
                                   for r in results},
        "tasks": results,
    }
    return StudyResult(NAME, data, [fig], _markdown(results, opts, fig.name, profile))
