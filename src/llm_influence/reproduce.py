"""``reproduce``: fine-tune -> attribute -> evaluate on every paper task, then the report.

Each task gets its own run directory ``DIR/runs/TASK``; every stage skips work that is
already complete (fine-tuning resumes, features and scores are reused when their inputs
are unchanged), so an interrupted ``reproduce`` picks up where it stopped. Results are
written after every task: ``DIR/results.json`` (every number) and ``DIR/report.md``
(the paper's Tables 2-4 with the published numbers beside ours, and Figs. 1-2). A backdoor
task's entry also says whether its backdoor is installed: greedy generation on the held-out
triggered and clean prompts of the final checkpoint (:mod:`.evaluation.backdoor`; the
generations stay in ``RUN/backdoor/epoch-N.json``).
"""

from __future__ import annotations

import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import distributed
from .attribute import DEFAULT_METHODS, AttributeArgs, attribute, read_scores
from .config import get_profile, load_profile_task
from .errors import UserError
from .evaluation.backdoor import is_backdoor_task, result_entry, run_backdoor_check, verdict
from .evaluation.run_metrics import evaluate_run
from .evaluation.uncertainty import seed_summary
from .io_utils import write_json, write_text
from .progress import log
from .rundir import RunDir, versions
from .training import finetune

PAPER_TASKS_ORDER = ("mixed-small", "mixed-large", "grammars", "math", "harmfulcheck",
                     "backdoor-1", "backdoor-3", "backdoor-5")
#: the paper's methods, the same default as ``attribute``'s
DEFAULT_BENCHMARK_METHODS = DEFAULT_METHODS
SHOWCASE_TASK = "mixed-small"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def machine_description() -> str:
    import os

    mem = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            kb = int(fh.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()} CPU{mem}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _epoch_rows(run: RunDir) -> list[dict[str, Any]]:
    from .training.log import read_train_log

    return [r for r in read_train_log(run.train_log) if r.get("kind") == "epoch"]


def seed_run_path(out_dir: Path, task_name: str, seed: int) -> Path:
    """``DIR/runs/TASK`` for the profile's seed 0, ``DIR/runs/TASK-seedN`` for the others."""
    return out_dir / "runs" / (task_name if seed == 0 else f"{task_name}-seed{seed}")


def run_task(task_name: str, profile_name: str, out_dir: Path, *, methods: Sequence[str],
             data_dir: Optional[str] = None, model: Optional[str] = None, rank_by: str = "score",
             attribute_args: Optional[AttributeArgs] = None, seed: int = 0) -> dict[str, Any]:
    """One task end to end with fine-tuning seed ``seed`` (the data subsample and the
    validation rows do not depend on it); returns its entry of ``results.json``."""
    profile = get_profile(profile_name)
    task, args, task_config = load_profile_task(profile, task_name, data_dir)
    args = replace(args, seed=args.seed + seed)
    run_path = seed_run_path(out_dir, task_name, seed)
    t0 = time.time()
    world = distributed.current()

    def tune():
        if world.rank != 0:  # under torchrun rank 0 fine-tunes; the others wait in agree()
            return None
        return finetune(run_path, task, model_name=model or profile.model, lora=profile.lora, args=args,
                        task_config=task_config)

    result = distributed.agree(tune, f"fine-tuning {task_name} (seed {args.seed})")
    run = RunDir(run_path)
    attr_args = replace(attribute_args or AttributeArgs(), methods=tuple(methods), checkpoint="last")
    attribute(run_path, attr_args)  # sharded over the ranks under torchrun
    if world.rank != 0:
        return {}
    metrics = evaluate_run(run_path, rank_by=rank_by)
    checkpoint = run.resolve_checkpoints("last")[0]
    backdoor = backdoor_entry(run, checkpoint, data_dir) if is_backdoor_task(task) else None
    per_method = metrics["checkpoints"][checkpoint]
    epochs = _epoch_rows(run)
    feature_seconds = max((m.get("feature_seconds") or 0.0) for m in per_method.values())
    return {
        "n_train": len(task.train), "n_test": len(task.test), "n_val": len(task.val),
        "train_groups": task.group_counts("train"), "test_groups": task.group_counts("test"),
        "val_groups": task.group_counts("val"), "val_source": task_config.get("val_source"),
        "seed": args.seed, "epochs": result.epochs_done, "stopped_early": result.stopped_early,
        "train_loss": [r["train_loss"] for r in epochs], "val_loss": [r["val_loss"] for r in epochs],
        "finetune_seconds": sum(r.get("seconds") or 0.0 for r in epochs),
        "checkpoint": checkpoint, "feature_seconds": feature_seconds,
        "max_length": args.max_length, "lr": args.lr, "batch_size": args.batch_size,
        "methods": {name: {k: m[k] for k in METHOD_RESULT_KEYS if k in m}
                    for name, m in per_method.items() if name in methods},
        "run_dir": str(run_path), "stage_seconds": time.time() - t0,
        **({"backdoor": backdoor} if backdoor is not None else {}),
    }


def backdoor_entry(run: RunDir, checkpoint: str, data_dir: Optional[str]) -> dict[str, Any]:
    """The ``"backdoor"`` entry of a backdoor task's results (:mod:`.evaluation.backdoor`):
    compliance of the trigger groups and the clean group on the run's held-out test prompts
    at ``checkpoint``, greedy generations cached in ``RUN/backdoor/CHECKPOINT.json``."""
    record = run_backdoor_check(run.path, checkpoint, data_dir=data_dir)
    log(verdict(run.load_task().name, record))
    return result_entry(record, relative_to=run.path)


#: what results.json keeps of each seed's entry in a task's ``seeds`` list
SEED_RESULT_KEYS = ("seed", "run_dir", "epochs", "val_loss", "methods", "backdoor")
#: what results.json keeps of each method's metrics.json entry
METHOD_RESULT_KEYS = ("acc", "acc_ci95", "cover", "cover_ci95", "ties", "seconds", "n_scored", "n_skipped",
                      "diagnostics", "other_ranking")


def across_seeds(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"seeds": [...], "methods": {method: {"acc": seed_summary, "cover": seed_summary}}}``
    of one task's per-seed entries (:func:`run_task`), for the methods every seed has; with
    ``"backdoor": {"triggered_compliance": seed_summary, "clean_compliance": seed_summary,
    "fires": [bool per seed]}`` when every seed has a backdoor check."""
    methods = [m for m in entries[0]["methods"] if all(m in e["methods"] for e in entries)]
    out: dict[str, Any] = {"seeds": [e["seed"] for e in entries], "methods": {}}
    for name in methods:
        out["methods"][name] = {metric: seed_summary([e["methods"][name][metric] for e in entries])
                                for metric in ("acc", "cover")}
    checks = [e.get("backdoor") for e in entries]
    if all(isinstance(c, dict) for c in checks):
        out["backdoor"] = {key: seed_summary([c[key] for c in checks])
                           for key in ("triggered_compliance", "clean_compliance")
                           if all(c.get(key) is not None for c in checks)}
        out["backdoor"]["fires"] = [bool(c.get("fires")) for c in checks]
    return out


def _figures(out_dir: Path, results: dict[str, Any], methods: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Fig. 2 (heatmaps) and Fig. 1 (showcase) for the showcase task, if it was run.

    Returns ``({title: relative PNG path}, {title: showcase markdown})``."""
    from .report.figures import heatmap_figure, showcase_figure

    entry = results["tasks"].get(SHOWCASE_TASK)
    if entry is None:
        return {}, {}
    run = RunDir(entry["run_dir"])
    task = run.load_task()
    scores = {}
    for name in methods:
        path = run.scores_dir(entry["checkpoint"]) / f"{name}.safetensors"
        if path.is_file():
            scores[name] = read_scores(path)[0]
    if not scores:
        return {}, {}
    rank_by = results.get("rank_by", "score")
    heat = out_dir / "figures" / f"fig2_heatmap_{SHOWCASE_TASK}.png"
    heatmap_figure(scores, [e.group for e in task.train], "harmful", heat, rank_by=rank_by,
                   title=f"Fig. 2: scores on {SHOWCASE_TASK} (harmful training examples left of the line)")
    from .report.figures import top_by_method

    test_index = 0
    top = top_by_method(scores, task.train, test_index, rank_by=rank_by)
    show = out_dir / "figures" / f"fig1_showcase_{SHOWCASE_TASK}.png"
    markdown = showcase_figure(task.test[test_index], top, show)
    figures = {f"Fig. 2: score heatmaps on {SHOWCASE_TASK}": str(heat.relative_to(out_dir)),
               f"Fig. 1: each method's top training example for one {SHOWCASE_TASK} test prompt":
                   str(show.relative_to(out_dir))}
    return figures, {f"Fig. 1 (text): {SHOWCASE_TASK}, test example {task.test[test_index].id}": markdown}


def run_studies(names: Sequence[str], profile_name: str, out: Path, data_dir: Optional[str]) -> dict[str, Any]:
    """Run the named studies into ``out`` (``NAME.json``, ``NAME.md``, PNGs beside report.md)."""
    from .studies import run_study

    done: dict[str, Any] = {}
    for name in names:
        log(f"study {name}")
        t0 = time.time()
        result = run_study(name, profile_name, out, data_dir=data_dir)
        done[name] = {"json": result.json_path.name, "markdown": result.markdown,
                      "figures": [Path(f).name for f in result.figures], "seconds": time.time() - t0}
    return done


def _plan(names: Sequence[str], profile_name: str, data_dir: Optional[str], seeds: int,
          seed_tasks: Optional[Sequence[str]]) -> list[tuple[str, int, float]]:
    """``[(task, seed, weight)]`` in run order; ``weight`` (training example-epochs plus the
    extraction pass) estimates each unit's share of the wall time for the ETA."""
    profile = get_profile(profile_name)
    plan = []
    for name in names:
        task, args, _ = load_profile_task(profile, name, data_dir)
        weight = len(task.train) * (args.epochs + 2) + len(task.test) + len(task.val) * args.epochs
        n = seeds if seed_tasks is None or name in seed_tasks else 1
        plan.extend((name, s, float(weight)) for s in range(n))
    return plan


def reproduce(profile_name: str, out_dir: str | Path, *, tasks: Optional[Sequence[str]] = None,
              methods: Optional[Sequence[str]] = None, data_dir: Optional[str] = None,
              model: Optional[str] = None, rank_by: str = "score",
              attribute_args: Optional[AttributeArgs] = None,
              studies: Optional[Sequence[str]] = None, seeds: int = 1,
              seed_tasks: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark; write ``results.json``, ``report.md``, ``report.html`` (the explorer)
    and the figures into ``out_dir``.

    ``seeds`` fine-tuning seeds per task (the profile's seed, +1, ...; only for the tasks in
    ``seed_tasks`` when given, one seed for the others): each task's entry is its first
    seed's, with ``seeds`` (every seed's metrics) and ``across_seeds`` (mean and sample
    std per method). ``studies`` (default: every registered study) run after the tasks
    under the same profile; their Markdown sections are appended to the report. Under
    ``torchrun`` rank 0 fine-tunes each task, every rank takes its share of the attribute
    stage, rank 0 evaluates and writes everything, and the studies are skipped (they are
    not sharded).
    """
    from .report.markdown import render_report
    from .studies import available_studies

    study_names = list(available_studies() if studies is None else studies)

    profile = get_profile(profile_name)
    out = Path(out_dir)
    names = list(tasks or PAPER_TASKS_ORDER)
    methods = list(methods or DEFAULT_BENCHMARK_METHODS)
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    for name in list(names) + list(seed_tasks or []):
        if name not in profile.tasks and profile.name != "paper" and not name.startswith("jsonl:"):
            raise UserError(f"task {name!r} has no settings in profile {profile.name!r}")
    unknown = sorted(set(seed_tasks or []) - set(names))
    if unknown:
        raise UserError(f"--seed-tasks {','.join(unknown)}: not among the tasks run ({','.join(names)})")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results: dict[str, Any] = {
        "profile": profile.name, "model": model or profile.model, "machine": machine_description(),
        "rank_by": rank_by, "methods": methods, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": versions(), "seeds": seeds, "seed_tasks": list(seed_tasks) if seed_tasks else None,
        "tasks": {},
    }
    world = distributed.current()
    if world.active and study_names:
        log(f"torchrun: the studies are not sharded and are skipped here ({', '.join(study_names)}); "
            "run `llm-influence study NAME` afterwards")
        study_names = []
    plan = _plan(names, profile.name, data_dir, seeds, seed_tasks)
    total = sum(w for *_, w in plan)
    done = 0.0
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for i, (name, seed, weight) in enumerate(plan, 1):
        elapsed = time.time() - t0
        eta = f", ETA {_minutes(elapsed / done * (total - done))} for the tasks" if done else ""
        log(f"[{i}/{len(plan)}] {name}" + (f" seed +{seed}" if seed else "") + f" ({_minutes(elapsed)} elapsed{eta})")
        entry = run_task(name, profile.name, out, methods=methods, data_dir=data_dir, model=model,
                         rank_by=rank_by, attribute_args=attribute_args, seed=seed)
        done += weight
        if world.rank == 0:
            per_seed.setdefault(name, []).append(entry)
            first = dict(per_seed[name][0])
            first["seeds"] = [{k: e[k] for k in SEED_RESULT_KEYS if k in e} for e in per_seed[name]]
            first["across_seeds"] = across_seeds(per_seed[name])
            results["tasks"][name] = first
            results["wall_seconds"] = time.time() - t0
            write_json(out / "results.json", results)
    if world.rank != 0:  # rank 0 writes the figures and reports
        return results
    figures, showcases = _figures(out, results, methods)
    results["figures"] = figures
    studies_done = run_studies(study_names, profile.name, out, data_dir)
    results["studies"] = {k: {kk: vv for kk, vv in v.items() if kk != "markdown"} for k, v in studies_done.items()}
    results["wall_seconds"] = time.time() - t0
    write_json(out / "results.json", results)
    report = render_report(results, figures, showcases=showcases)
    if studies_done:
        report += "\n\n# Why influence functions fail: the studies\n\n" + "\n\n".join(
            v["markdown"].strip() for v in studies_done.values()) + "\n"
    write_text(out / "report.md", report)
    from .report.html import write_html_report
    from .token_attribution import DEFAULT_EXPLORER_TOKENS

    # RepT's token view in the explorer for each task's first seed (one model pass per run)
    write_html_report(out, tokens=DEFAULT_EXPLORER_TOKENS if "rept" in methods else 0,
                      token_runs=[seed_run_path(out, name, 0) for name in names])
    return results
