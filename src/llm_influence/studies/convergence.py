"""Study ``convergence``: attribution quality at every epoch of fine-tuning, next to the
training and validation loss (the paper's Fig. 5).

Influence functions assume the model sits at a (local) minimum of the training loss. If
that assumption mattered, their Acc should improve as training converges. For every task we
fine-tune (or reuse) the profile's run, which saves a LoRA checkpoint after every epoch, and
score DataInf and GradSim at **every** checkpoint ``epoch-1 .. epoch-E`` (the attribute
stage's ``checkpoint="all"``; epoch 0, the untrained adapter with ``B = 0``, has all-zero
``lora_A`` gradients and is left out). Per-example gradients are extracted once per
checkpoint and cached in ``RUN/features/epoch-N/``; scores are computed in memory, so a run
shared with ``reproduce`` keeps its ``scores/`` and ``config.json``.

Recorded per task and epoch: Acc and Cover per method (in [0, 1]), and from
``RUN/train_log.jsonl`` the training loss (mean of the epoch's batch losses; epoch 0 = the
loss before training) and the validation loss (mean per-example token cross-entropy, nats,
on the run's validation subset), plus which epoch has the best Acc per method and which the
lowest validation loss.

Tasks (paper): ``mixed-small``, ``grammars``, ``math``, ``backdoor-1`` at the profile's sizes
and epochs (``config.py``: ``cpu`` trains 3-4 epochs, ``paper`` up to 25 with early
stopping). Under ``cpu`` the runs of ``reproduce`` are reused (option ``runs``, default
``OUT/runs``); the cost is then the gradient extraction at the E-1 earlier checkpoints
(estimated 4-6 minutes on 2 cores), plus the four fine-tunes when run on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..progress import log
from .base import (StudyResult, markdown_table, new_figure, register_study, resolve_options, save_figure,
                   with_interval)
from .llm_runs import LLM_STUDY_DEFAULTS, epoch_log, method_spec, profile_task_run, run_tasks, score_checkpoint

NAME = "convergence"
TASKS = ("mixed-small", "grammars", "math", "backdoor-1")
LABELS = {"datainf": "DataInf", "gradsim": "GradSim", "lissa": "LiSSA", "repsim": "RepSim", "exact": "exact"}


def _defaults(profile: str) -> dict[str, Any]:
    return {
        "tasks": TASKS,
        "methods": ("datainf", "gradsim"),
        **LLM_STUDY_DEFAULTS,
    }


def run_task(task_name: str, profile: str, out_dir: Path, data_dir: Optional[Path], opts: dict) -> dict[str, Any]:
    """Per-epoch Acc/Cover and losses of one task (module docstring); JSON-serialisable."""
    tr = profile_task_run(NAME, task_name, profile, out_dir, data_dir, opts["runs"] or None)
    specs = [(m, *method_spec(m, float(opts["damping_ratio"]))) for m in opts["methods"]]
    checkpoints = tr.run.resolve_checkpoints("all")
    per_epoch = []
    for checkpoint in checkpoints:
        log(f"{NAME}: {task_name} {checkpoint}")
        scored = score_checkpoint(tr.run, checkpoint, specs, rank_by=opts["rank_by"],
                                  batch_size=int(opts["extract_batch_size"]))
        per_epoch.append({"epoch": int(checkpoint.split("-")[1]), "checkpoint": checkpoint,
                          "methods": {m: {k: s[k] for k in ("acc", "cover", "acc_ci95", "cover_ci95", "seconds", "diagnostics")}
                                      for m, s in scored.items()}})
    losses = epoch_log(tr.run)
    epochs = [p["epoch"] for p in per_epoch]
    best_acc = {m: epochs[int(np.argmax([p["methods"][m]["acc"] for p in per_epoch]))] for m in opts["methods"]}
    vals = [(r["epoch"], r["val_loss"]) for r in losses if r["val_loss"] is not None and r["epoch"] >= 1]
    return {"task": task_name, **tr.info(), "epochs": epochs, "per_epoch": per_epoch, "losses": losses,
            "best_epoch_by_acc": best_acc,
            "best_epoch_by_val_loss": min(vals, key=lambda x: x[1])[0] if vals else None}


def _figure(results: list[dict], methods: list[str], path: Path, profile: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    k = len(results)
    fig, axes = new_figure(1, k, figsize=(3.6 * k, 3.3), squeeze=False)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b"]
    twins = []
    for ax, r in zip(axes[0], results):
        for i, m in enumerate(methods):
            ax.plot(r["epochs"], [p["methods"][m]["acc"] for p in r["per_epoch"]], "o-", color=colors[i % 5],
                    label=f"{LABELS.get(m, m)} Acc")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        twin = ax.twinx()
        twins.append(twin)
        twin.ticklabel_format(axis="y", useOffset=False)
        ep = [row["epoch"] for row in r["losses"]]
        twin.plot(ep, [row["train_loss"] for row in r["losses"]], "s-", color="0.45", ms=3, label="train loss")
        if any(row["val_loss"] is not None for row in r["losses"]):
            twin.plot([e for e, row in zip(ep, r["losses"]) if row["val_loss"] is not None],
                      [row["val_loss"] for row in r["losses"] if row["val_loss"] is not None],
                      "s--", color="0.15", ms=3, label="validation loss")
        ax.set_title(f"{r['task']} ({r['n_train']} train / {r['n_test']} test)", fontsize=9)
        if ax is axes[0][0]:
            ax.set_ylabel("Acc")
        if ax is axes[0][-1]:
            twin.set_ylabel("loss (nats / token)")
    h1, l1 = axes[0][0].get_legend_handles_labels()
    h2, l2 = twins[0].get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, loc="lower center", ncol=len(l1) + len(l2), fontsize=7, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"Fig. 5: Acc per epoch (left axis) and train/validation loss (right axis), profile {profile}",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _markdown(results: list[dict], methods: list[str], opts: dict, fig_name: str, profile: str) -> str:
    head = ["task", "epoch", "train loss", "val loss"] + [f"{LABELS.get(m, m)} {x}" for m in methods
                                                          for x in ("Acc", "Cover")]
    rows = []
    for r in results:
        loss = {row["epoch"]: row for row in r["losses"]}
        for row in r["losses"]:
            if row["epoch"] == 0:
                rows.append([r["task"], 0, row["train_loss"], row["val_loss"]] + [None] * (2 * len(methods)))
        for p in r["per_epoch"]:
            lr = loss.get(p["epoch"], {})
            rows.append([r["task"], p["epoch"], lr.get("train_loss"), lr.get("val_loss")]
                        + [with_interval(p["methods"][m], x) for m in methods for x in ("acc", "cover")])
    best = "; ".join(f"{r['task']}: best Acc at epoch " + ", ".join(
        f"{e} ({LABELS.get(m, m)})" for m, e in r["best_epoch_by_acc"].items())
        + (f", lowest validation loss at epoch {r['best_epoch_by_val_loss']}"
           if r["best_epoch_by_val_loss"] is not None else "") for r in results)
    return "\n".join([
        "## Attribution vs convergence (paper: Fig. 5)",
        "",
        f"{', '.join(LABELS.get(m, m) for m in methods)} scored at every epoch checkpoint of each task's "
        f"fine-tuned run (profile {profile}; damping ratio {opts['damping_ratio']}), next to the training loss "
        "(mean of the epoch's batch losses; epoch 0 = before training) and the validation loss (mean per-example "
        "token cross-entropy in nats on the run's validation subset). If influence functions needed a converged "
        "model, Acc would rise as the losses fall. Acc and Cover in [0, 1], in brackets the 95 % bootstrap "
        "interval over test examples. " + best + ".",
        "",
        markdown_table(head, rows),
        "",
        f"![Acc per epoch (left axis) and train/validation loss (right axis), one panel per task]({fig_name})",
        "",
    ])


@register_study(NAME, "Fig. 5: DataInf/GradSim Acc at every epoch checkpoint next to train and validation "
                      "loss on mixed-small, grammars, math, backdoor-1")
def convergence_study(profile: str, out_dir: Path, data_dir: Optional[Path], options: dict) -> StudyResult:
    """Run the convergence study (module docstring) and write ``convergence.png``.

    Options: ``tasks`` (paper task names), ``methods`` (registered gradient/representation
    methods, default ``datainf,gradsim``), ``damping_ratio`` (0.1), ``rank_by``
    (``score``/``abs``), ``extract_batch_size`` (feature extraction), ``runs`` (a directory of
    ``reproduce`` runs to reuse; default ``OUT/runs``). Sizes and epochs are the profile's.
    """
    opts = resolve_options(NAME, options, _defaults(profile))
    methods = list(opts["methods"])
    results = run_tasks(NAME, opts["tasks"], lambda task_name: run_task(task_name, profile, out_dir, data_dir, opts))
    fig = _figure(results, methods, out_dir / f"{NAME}.png", profile)
    data = {
        "options": opts,
        "conventions": {
            "acc": "fraction of test examples whose top-ranked training example is relevant (same group), [0, 1]",
            "cover": "mean over test examples of (#relevant among top k) / k, k = #relevant in train, [0, 1]",
            "train_loss": "mean of the epoch's batch losses (each the batch mean of per-example mean token "
                          "cross-entropy, nats); epoch 0 = evaluated before training",
            "val_loss": "mean per-example token cross-entropy (nats) on the run's validation subset, eval mode",
            "epochs": "checkpoints epoch-1..epoch-E (the attribute stage's checkpoint='all')",
            "best_epoch_by_acc": "the earliest epoch with the highest Acc, per method",
            "best_epoch_by_val_loss": "the epoch >= 1 with the lowest validation loss (None without validation)",
        },
        "tasks": results,
    }
    return StudyResult(NAME, data, [fig], _markdown(results, methods, opts, fig.name, profile))
