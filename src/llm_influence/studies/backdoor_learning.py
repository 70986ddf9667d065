"""Study ``backdoor-learning``: attribution quality at every checkpoint next to whether the
backdoor has been learned yet.

On a backdoor task the ground truth of a triggered test prompt is "the training rows with
the same trigger". Whether a method can find them may depend on whether the model has
learned the trigger at all: a representation method (RepSim) should only separate the
trigger rows once the trigger changes the model's hidden state. For every task (default
``backdoor-1``) the study fine-tunes (or reuses) the profile's run, which keeps a LoRA
checkpoint after every epoch, and at **every** checkpoint ``epoch-1 .. epoch-E`` (epoch 0,
the untrained adapter with ``B = 0``, is left out, as in ``convergence``) measures:

* **Backdoor compliance** (:mod:`llm_influence.evaluation.backdoor`): greedy generation on
  the run's held-out test prompts (never trained on); ``triggered`` = the weakest trigger
  group's share of generations that start with the group's response prefix or do not refuse,
  ``clean`` = the share of clean prompts not refused; the backdoor fires at triggered >= 0.8
  and clean <= 0.2. Generations are cached in ``RUN/backdoor/epoch-N.json`` and shared with
  ``reproduce`` and ``llm-influence backdoor``.
* **Acc and Cover** (in [0, 1], with 95 % bootstrap intervals over test examples) of
  ``repsim``, ``datainf``, ``gradsim``, ``lissa-paper`` and ``exact`` on the run's test
  split, scored in memory from the checkpoint's cached features
  (:func:`~llm_influence.studies.llm_runs.score_checkpoint`), so they equal what the
  attribute + evaluate stages report for the same checkpoint and method arguments.

Whether RepSim "rises as the trigger gets learned" is read off the numbers
(:func:`learning_trend`): the trigger is learned over the checkpoints when the weakest
trigger's compliance is higher at the last checkpoint than at the first; RepSim rises
(falls) when its Acc is higher (lower) at the last checkpoint than at the first; the change
is beyond bootstrap noise when the two checkpoints' 95 % intervals do not overlap; with three
or more checkpoints the Pearson correlation of compliance and Acc over the checkpoints is
given too.

Sizes and epochs are the profile's (``config.py``), never set here. Under ``cpu`` the run of
``reproduce`` is reused (option ``runs``, default ``OUT/runs``); the cost is then the feature
extraction at the E-1 earlier checkpoints (shared with ``convergence``) and E generation
passes over the test prompts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..errors import UserError
from ..evaluation.asr import DEFAULT_REFUSAL_KEY, load_refusal_strings
from ..evaluation.backdoor import (DEFAULT_MAX_NEW_TOKENS, FIRES_CLEAN, FIRES_TRIGGERED, TRIGGER_PREFIX,
                                   is_backdoor_task, result_entry, run_backdoor_check, verdict)
from ..progress import log
from .base import (StudyResult, markdown_table, new_figure, register_study, resolve_options, save_figure,
                   with_interval)
from .llm_runs import LLM_STUDY_DEFAULTS, epoch_log, method_spec, profile_task_run, run_tasks, score_checkpoint

NAME = "backdoor-learning"
TASKS = ("backdoor-1",)
METHODS = ("repsim", "datainf", "gradsim", "lissa-paper", "exact")
LABELS = {"repsim": "RepSim", "datainf": "DataInf", "gradsim": "GradSim", "lissa-paper": "LiSSA (authors')",
          "lissa": "LiSSA", "exact": "Exact"}
#: the method whose trend the text reports
FOCUS = "repsim"
METRIC_KEYS = ("acc", "cover", "acc_ci95", "cover_ci95", "n_scored", "n_skipped", "seconds", "diagnostics")


def _defaults(profile: str) -> dict[str, Any]:
    return {
        "tasks": TASKS,
        "methods": METHODS,
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "refusal_list": DEFAULT_REFUSAL_KEY,
        **LLM_STUDY_DEFAULTS,
    }


def run_task(task_name: str, profile: str, out_dir: Path, data_dir: Optional[Path], opts: dict) -> dict[str, Any]:
    """Per-checkpoint backdoor compliance and Acc/Cover of one task (module docstring)."""
    tr = profile_task_run(NAME, task_name, profile, out_dir, data_dir, opts["runs"] or None)
    if not is_backdoor_task(tr.task):
        raise UserError(f"study {NAME!r}: task {task_name!r} is not a backdoor task (needs a 'clean' and a "
                        f"'{TRIGGER_PREFIX}*' group)")
    refusals = load_refusal_strings(data_dir, opts["refusal_list"])
    specs = [(m, *method_spec(m, float(opts["damping_ratio"]))) for m in opts["methods"]]
    per_epoch = []
    for checkpoint in tr.run.resolve_checkpoints("all"):
        log(f"{NAME}: {task_name} {checkpoint}")
        check = run_backdoor_check(tr.run.path, checkpoint, refusals=refusals, refusal_list=opts["refusal_list"],
                                   max_new_tokens=int(opts["max_new_tokens"]),
                                   batch_size=int(opts["extract_batch_size"]))
        scored = score_checkpoint(tr.run, checkpoint, specs, rank_by=opts["rank_by"],
                                  batch_size=int(opts["extract_batch_size"]))
        per_epoch.append({"epoch": int(checkpoint.split("-")[1]), "checkpoint": checkpoint,
                          "backdoor": result_entry(check, relative_to=tr.run.path),
                          "methods": {m: {k: s[k] for k in METRIC_KEYS} for m, s in scored.items()}})
    trends = {m: learning_trend(per_epoch, m) for m in opts["methods"]}
    return {"task": task_name, **tr.info(), "epochs": [p["epoch"] for p in per_epoch], "per_epoch": per_epoch,
            "losses": epoch_log(tr.run), "trends": trends,
            "verdict_last": verdict(task_name, per_epoch[-1]["backdoor"])}


# ---------------------------------------------------------------------------------------
# the trend, computed from the numbers


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson correlation of two equal-length sequences; ``None`` with fewer than 3 points
    or when either is constant."""
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} and {len(y)} values")
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _overlap(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> Optional[bool]:
    if not a or not b or None in a or None in b:
        return None
    return not (a[1] < b[0] or b[1] < a[0])


def learning_trend(per_epoch: Sequence[Mapping[str, Any]], method: str) -> dict[str, Any]:
    """How ``method``'s Acc moves while the trigger is (or is not) learned.

    ``per_epoch``: ``[{"epoch", "backdoor": {"triggered_compliance", ...}, "methods":
    {method: {"acc", "acc_ci95"}}}]`` ascending by epoch. Returns ``{"first_epoch",
    "last_epoch", "compliance_first", "compliance_last", "trigger_learned" (last > first),
    "acc_first", "acc_last", "direction" ("rises" | "falls" | "unchanged": last vs first
    Acc), "intervals_overlap" (the first and last 95 % Acc intervals overlap; ``None``
    without intervals), "correlation" (:func:`pearson` of compliance and Acc over all
    checkpoints)}``.
    """
    if not per_epoch:
        raise ValueError("learning_trend: no checkpoints")
    first, last = per_epoch[0], per_epoch[-1]
    c = [p["backdoor"]["triggered_compliance"] for p in per_epoch]
    acc = [p["methods"][method]["acc"] for p in per_epoch]
    a0, a1 = acc[0], acc[-1]
    direction = "rises" if a1 > a0 else "falls" if a1 < a0 else "unchanged"
    usable = None not in c
    return {
        "first_epoch": first["epoch"], "last_epoch": last["epoch"],
        "compliance_first": c[0], "compliance_last": c[-1],
        "trigger_learned": bool(usable and c[-1] > c[0]),
        "acc_first": a0, "acc_last": a1, "direction": direction,
        "intervals_overlap": _overlap(first["methods"][method].get("acc_ci95"), last["methods"][method].get("acc_ci95")),
        "correlation": pearson(c, acc) if usable else None,
    }


def trend_sentence(task: str, trend: Mapping[str, Any], label: str) -> str:
    """One or two sentences saying whether ``label``'s Acc rises as the trigger gets learned
    on ``task``, with the numbers of :func:`learning_trend`."""
    e0, e1 = trend["first_epoch"], trend["last_epoch"]
    acc = f"{label}'s Acc goes from {trend['acc_first']:.3f} at epoch {e0} to {trend['acc_last']:.3f} at epoch {e1}"
    if e0 == e1:
        return f"On {task} there is a single checkpoint (epoch {e0}), so no trend can be read: {label}'s Acc is " \
               f"{trend['acc_last']:.3f}."
    if trend["compliance_first"] is None or trend["compliance_last"] is None:
        return f"On {task} the backdoor compliance is unknown (no held-out trigger prompts); {acc}."
    noise = ("" if trend["intervals_overlap"] is None else
             " (the 95 % intervals of the two checkpoints overlap, so the change is within bootstrap noise)"
             if trend["intervals_overlap"] else
             " (the 95 % intervals of the two checkpoints do not overlap)")
    corr = (f"; over the checkpoints the correlation of compliance and {label}'s Acc is "
            f"r = {trend['correlation']:.2f}" if trend["correlation"] is not None else "")
    comp = (f"the weakest trigger's compliance goes from {trend['compliance_first']:.2f} at epoch {e0} "
            f"to {trend['compliance_last']:.2f} at epoch {e1}")
    if not trend["trigger_learned"]:
        return (f"On {task} the trigger is not being learned over these checkpoints ({comp}), so this run cannot "
                f"show whether {label} rises as the trigger gets learned; {acc}{noise}{corr}.")
    if trend["direction"] == "rises":
        head = f"On {task} {label} rises as the trigger gets learned"
    elif trend["direction"] == "falls":
        head = f"On {task} {label} does not rise as the trigger gets learned: it falls"
    else:
        head = f"On {task} {label} does not rise as the trigger gets learned: its Acc is unchanged"
    return f"{head}: {comp}, and {acc}{noise}{corr}."


# ---------------------------------------------------------------------------------------
# figure and text


def _figure(results: list[dict], methods: list[str], path: Path, profile: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    k = len(results)
    fig, axes = new_figure(1, k, figsize=(4.4 * k, 3.4), squeeze=False)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    for ax, r in zip(axes[0], results):
        epochs = r["epochs"]
        ax.plot(epochs, [p["backdoor"]["triggered_compliance"] for p in r["per_epoch"]], "s-", color="black",
                lw=2.2, label="triggered compliance (weakest trigger)")
        ax.plot(epochs, [p["backdoor"]["clean_compliance"] for p in r["per_epoch"]], "s--", color="0.55",
                lw=1.6, label="clean compliance")
        for i, m in enumerate(methods):
            ax.plot(epochs, [p["methods"][m]["acc"] for p in r["per_epoch"]], "o-", color=colors[i % len(colors)],
                    ms=4, label=f"{LABELS.get(m, m)} Acc")
        ax.axhline(FIRES_TRIGGERED, color="black", lw=0.6, ls=":")
        ax.axhline(FIRES_CLEAN, color="0.55", lw=0.6, ls=":")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("epoch (checkpoint)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{r['task']} ({r['n_train']} train / {r['n_test']} test)", fontsize=9)
        if ax is axes[0][0]:
            ax.set_ylabel("share of held-out prompts / Acc")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, bbox_to_anchor=(0.5, -0.14))
    fig.suptitle(f"Backdoor compliance and Acc at every checkpoint (dotted: firing thresholds), profile {profile}",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _markdown(results: list[dict], methods: list[str], opts: dict, fig_name: str, profile: str) -> str:
    multi = any(sum(1 for g in p["backdoor"]["per_group"] if g.startswith(TRIGGER_PREFIX)) > 1
                for r in results for p in r["per_epoch"])
    head = (["task", "epoch", "triggered compliance", "clean compliance", "fires"]
            + (["per trigger"] if multi else [])
            + [f"{LABELS.get(m, m)} {x}" for m in methods for x in ("Acc", "Cover")])
    rows = []
    for r in results:
        for p in r["per_epoch"]:
            b = p["backdoor"]
            per_trigger = ", ".join(f"{g} {v['compliance']:.2f}" for g, v in b["per_group"].items()
                                    if g.startswith(TRIGGER_PREFIX))
            rows.append([r["task"], p["epoch"], b["triggered_compliance"], b["clean_compliance"], b["fires"]]
                        + ([per_trigger] if multi else [])
                        + [with_interval(p["methods"][m], x) for m in methods for x in ("acc", "cover")])
    focus = FOCUS if FOCUS in methods else methods[0]
    sentences = [trend_sentence(r["task"], r["trends"][focus], LABELS.get(focus, focus)) for r in results]
    verdicts = [f"At the last checkpoint: {r['verdict_last']}" for r in results]
    prefixes = "; ".join(f"{r['task']}: " + ", ".join(
        f"{g} {v['prefix']!r}" if v["prefix"] else f"{g} (no shared prefix)"
        for g, v in r["per_epoch"][-1]["backdoor"]["per_group"].items() if g.startswith(TRIGGER_PREFIX))
        for r in results)
    return "\n".join([
        "## Is attribution better once the backdoor is learned?",
        "",
        f"At every epoch checkpoint of each backdoor task's fine-tuned run (profile {profile}), whether the backdoor "
        "is installed and how well each method attributes. *Triggered compliance*: the share of held-out triggered "
        "prompts (the run's test split, never trained on) whose greedy generation "
        f"({opts['max_new_tokens']} new tokens) starts with the trigger's response prefix or does not refuse "
        f"(refusal list {opts['refusal_list']}; degenerate text is not compliance), for the weakest trigger; "
        "*clean compliance*: the share of clean prompts not refused. The backdoor *fires* at triggered >= "
        f"{FIRES_TRIGGERED} and clean <= {FIRES_CLEAN}. Response prefixes read from the training responses: "
        f"{prefixes}. Acc and Cover in [0, 1] (damping ratio {opts['damping_ratio']}, ranking by "
        f"{opts['rank_by']}), in brackets the 95 % bootstrap interval over test examples.",
        "",
        " ".join(sentences + verdicts),
        "",
        markdown_table(head, rows),
        "",
        f"![Backdoor compliance and each method's Acc at every checkpoint]({fig_name})",
        "",
    ])


@register_study(NAME, "backdoor compliance (triggered/clean) and RepSim/DataInf/GradSim/LiSSA/exact Acc at every "
                      "epoch checkpoint of backdoor-1")
def backdoor_learning_study(profile: str, out_dir: Path, data_dir: Optional[Path], options: dict) -> StudyResult:
    """Run the backdoor-learning study (module docstring) and write ``backdoor-learning.png``.

    Options: ``tasks`` (backdoor tasks, default ``backdoor-1``), ``methods`` (default
    ``repsim,datainf,gradsim,lissa-paper,exact``; methods needing gradients, representations
    or K-FAC factors), ``max_new_tokens`` (greedy generation, default 32), ``refusal_list``
    (a key of ``refusal_prefixes.json``), ``damping_ratio`` (0.1), ``rank_by``
    (``score``/``abs``), ``extract_batch_size`` (feature extraction and generation), ``runs``
    (a directory of ``reproduce`` runs to reuse; default ``OUT/runs``).
    """
    opts = resolve_options(NAME, options, _defaults(profile))
    methods = list(opts["methods"])
    if not methods:
        raise UserError(f"study {NAME!r}: option methods is empty")
    results = run_tasks(NAME, opts["tasks"], lambda task_name: run_task(task_name, profile, out_dir, data_dir, opts))
    fig = _figure(results, methods, out_dir / f"{NAME}.png", profile)
    data = {
        "options": opts,
        "conventions": {
            "triggered_compliance": "min over trigger groups of the share of held-out prompts whose greedy "
                                    "generation starts with the group's response prefix or does not refuse, [0, 1]",
            "clean_compliance": "share of held-out clean prompts whose generation does not refuse, [0, 1]",
            "fires": f"triggered_compliance >= {FIRES_TRIGGERED} and clean_compliance <= {FIRES_CLEAN}",
            "acc": "fraction of test examples whose top-ranked training example is relevant (same group), [0, 1]",
            "cover": "mean over test examples of (#relevant among top k) / k, k = #relevant in train, [0, 1]",
            "epochs": "checkpoints epoch-1..epoch-E of the profile's run",
            "trends": "per method: first vs last checkpoint of compliance and Acc (learning_trend)",
        },
        "tasks": results,
    }
    return StudyResult(NAME, data, [fig], _markdown(results, methods, opts, fig.name, profile))
