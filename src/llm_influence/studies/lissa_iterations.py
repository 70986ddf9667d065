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

The helpers the LLM studies share are in :mod:`.llm_runs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import UserError
from .base import (StudyResult, markdown_table, new_figure, register_study, resolve_options, save_figure,
                   with_interval)
from .llm_runs import LLM_STUDY_DEFAULTS, method_spec, profile_task_run, run_tasks, score_checkpoint

NAME = "lissa-iterations"
TASKS = ("mixed-small", "harmfulcheck", "grammars", "math")
PROFILE_SIZE = 0  # option value meaning "the profile's setting"


# =======================================================================================
# the study
# =======================================================================================


def _defaults(profile: str) -> dict[str, Any]:
    return {
        "tasks": TASKS,
        "iterations": (1, 2, 5, 10, 20, 50),
        "references": ("repsim", "exact"),
        **LLM_STUDY_DEFAULTS,
    }


def run_task(task_name: str, profile: str, out_dir: Path, data_dir: Optional[Path], opts: dict) -> dict[str, Any]:
    """All numbers of one task (module docstring); JSON-serialisable."""
    tr = profile_task_run(NAME, task_name, profile, out_dir, data_dir, opts["runs"] or None)
    checkpoint = tr.run.resolve_checkpoints("last")[0]
    ratio = float(opts["damping_ratio"])
    specs = []
    for t in opts["iterations"]:
        name, kw = method_spec("lissa", ratio, iterations=int(t))
        specs.append((f"lissa-{int(t)}", name, kw))
    for ref in opts["references"]:
        name, kw = method_spec(ref, ratio)
        specs.append((ref, name, kw))
    scored = score_checkpoint(tr.run, checkpoint, specs, rank_by=opts["rank_by"], batch_size=int(opts["extract_batch_size"]))
    lissa = []
    for t in opts["iterations"]:
        s = scored[f"lissa-{int(t)}"]
        lissa.append({"iterations": int(t), "acc": s["acc"], "cover": s["cover"], "acc_ci95": s["acc_ci95"],
                      "cover_ci95": s["cover_ci95"], "seconds": s["seconds"],
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
            rows.append([r["task"], metric.capitalize()] + [with_interval(p, metric) for p in r["lissa"]]
                        + [with_interval(r["references"][ref], metric) for ref in refs])
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
        "training example is in their group; Cover = fraction of the top k that are (k = group size in train); "
        "in brackets the 95 % bootstrap interval over test examples (2,000 seeded resamples). "
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
    ``damping_ratio`` (0.1), ``rank_by`` (``score`` or ``abs``), ``extract_batch_size`` (feature
    extraction), ``runs`` (a directory of ``reproduce`` runs to reuse; default ``OUT/runs``).
    Sizes are the profile's (``config.py``) for every profile.
    """
    opts = resolve_options(NAME, options, _defaults(profile))
    if not opts["iterations"] or any(int(t) < 1 for t in opts["iterations"]):
        raise UserError(f"study {NAME!r}: iterations must be positive integers, got {opts['iterations']!r}")
    results = run_tasks(NAME, opts["tasks"], lambda task_name: run_task(task_name, profile, out_dir, data_dir, opts))
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
