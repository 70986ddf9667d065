"""The command line. Thin: it parses arguments and calls the library.

Errors a user can cause (:class:`~llm_influence.errors.UserError`) print one line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import fields, replace
from typing import Any, Optional, Sequence

from .errors import UserError


def _per_group(text: Optional[str]):
    if text is None:
        return None
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="data directory (default: $LLM_INFLUENCE_DATA)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults come from the profile)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup-ratio", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--max-grad-norm", type=float)
    g.add_argument("--max-length", type=int)
    g.add_argument("--loss-on", choices=["response", "all"],
                   help="response: mask prompt tokens (default); all: the paper's v2 variant")
    g.add_argument("--seed", type=int)
    g.add_argument("--early-stopping", dest="early_stopping", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--patience", type=int)
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--validation", choices=["test", "none"])
    g.add_argument("--val-per-group", type=int, help="cap the validation examples per group")
    g.add_argument("--autocast", choices=["none", "bf16"], help="bfloat16 autocast for the training step")
    l = p.add_argument_group("LoRA (defaults: the paper's r=4, alpha=32, dropout 0.1 on q_proj,v_proj)")
    l.add_argument("--lora-r", type=int)
    l.add_argument("--lora-alpha", type=int)
    l.add_argument("--lora-dropout", type=float)
    l.add_argument("--lora-targets", help="comma-separated module names, e.g. q_proj,v_proj")
    l.add_argument("--lora-layers", type=_int_list, help="comma-separated decoder layer indices")
    d = p.add_argument_group("data subsampling (defaults come from the profile)")
    d.add_argument("--train-per-group", type=_per_group, help="cap per group, or 'all'")
    d.add_argument("--test-per-group", type=_per_group, help="cap per group, or 'all'")


def _train_overrides(ns: argparse.Namespace, args) -> Any:
    names = {f.name for f in fields(args)}
    changes = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    return replace(args, **changes)


def _lora_overrides(ns: argparse.Namespace, lora):
    changes: dict[str, Any] = {}
    if ns.lora_r is not None:
        changes["r"] = ns.lora_r
    if ns.lora_alpha is not None:
        changes["alpha"] = ns.lora_alpha
    if ns.lora_dropout is not None:
        changes["dropout"] = ns.lora_dropout
    if ns.lora_targets:
        changes["targets"] = tuple(t.strip() for t in ns.lora_targets.split(",") if t.strip())
    if ns.lora_layers is not None:
        changes["layers"] = ns.lora_layers
    return replace(lora, **changes)


def cmd_tasks(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .data import PAPER_TASKS, load_task

    table = Table(title="tasks")
    for col in ("task", "paper name", "train", "test", "groups (train)"):
        table.add_column(col)
    rows = []
    for name, spec in PAPER_TASKS.items():
        task = load_task(name, ns.data_dir)
        groups = task.group_counts("train")
        rows.append({"task": name, "paper_name": spec.paper_name, "train": len(task.train), "test": len(task.test),
                     "groups": groups, "extra": spec.extra})
        shown = ", ".join(f"{g} {c}" for g, c in groups.items())
        table.add_row(name + (" (extra)" if spec.extra else ""), spec.paper_name, str(len(task.train)),
                      str(len(task.test)), shown)
    if ns.json:
        print(json.dumps(rows, indent=2))
    else:
        Console().print(table)
    return 0


def cmd_finetune(ns: argparse.Namespace) -> int:
    from .config import get_profile
    from .data import load_task
    from .progress import log
    from .training import finetune

    profile = get_profile(ns.profile)
    model = ns.model or profile.model
    tp = profile.task(ns.task)
    train_pg = tp.train_per_group if ns.train_per_group is None else (None if ns.train_per_group == "all" else ns.train_per_group)
    test_pg = tp.test_per_group if ns.test_per_group is None else (None if ns.test_per_group == "all" else ns.test_per_group)
    args = _train_overrides(ns, profile.train_args(ns.task))
    lora = _lora_overrides(ns, profile.lora)
    task = load_task(ns.task, ns.data_dir, train_per_group=train_pg, test_per_group=test_pg, seed=args.seed)
    result = finetune(ns.out, task, model_name=model, lora=lora, args=args,
                      task_config={"profile": profile.name, "train_per_group": train_pg, "test_per_group": test_pg})
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    log(f"fine-tuned {model} on {ns.task} ({len(task.train)} train): {result.epochs_done} epochs"
        f"{' (early stop)' if result.stopped_early else ''}{val}; adapters in {result.run / 'checkpoints'}")
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from .models.generation import generate
    from .rundir import RunDir
    from .training.load import load_finetuned

    model, formatter, name = load_finetuned(RunDir(ns.run), ns.checkpoint)
    prompts = ns.prompt
    for prompt, text in zip(prompts, generate(model, formatter, prompts, max_new_tokens=ns.max_new_tokens)):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(text)
    return 0


def _lissa_scale(text: str):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _damping(text: str):
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def cmd_attribute(ns: argparse.Namespace) -> int:
    from .attribute import AttributeArgs, attribute, summary_line
    from .progress import log

    methods = tuple(m.strip() for m in ns.methods.split(",") if m.strip())
    if not methods:
        raise UserError("--methods: give at least one method")
    args = AttributeArgs(methods=methods, checkpoint=ns.checkpoint, damping=ns.damping,
                         damping_ratio=ns.damping_ratio, lissa_iters=ns.lissa_iters, lissa_scale=ns.lissa_scale,
                         hessian=ns.hessian, batch_size=ns.batch_size, dtype=ns.dtype, rep_layer=ns.rep_layer,
                         rep_pooling=ns.rep_pooling, force=ns.force)
    results = attribute(ns.run, args)
    for result in results:
        print(summary_line(result))
    log(f"scores in {ns.run}/scores/")
    return 0


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .evaluation.run_metrics import evaluate_run, metrics_table
    from .progress import log

    metrics = evaluate_run(ns.run, rank_by=ns.rank_by)
    table = Table(title=f"{metrics['task']}: Acc / Cover (rank by {metrics['rank_by']})")
    for col in ("checkpoint", "method", "Acc %", "Cover %", "seconds", "residual max"):
        table.add_column(col, justify="right" if col not in ("checkpoint", "method") else "left")
    for row in metrics_table(metrics):
        table.add_row(*row)
    Console().print(table)
    log(f"metrics in {ns.run}/metrics.json")
    return 0


def cmd_reproduce(ns: argparse.Namespace) -> int:
    from .attribute import AttributeArgs
    from .progress import log
    from .reproduce import reproduce

    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()] if ns.tasks else None
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()] if ns.methods else None
    args = AttributeArgs(damping=ns.damping, damping_ratio=ns.damping_ratio, lissa_iters=ns.lissa_iters,
                         lissa_scale=ns.lissa_scale, batch_size=ns.batch_size)
    studies = [x.strip() for x in ns.studies.split(",") if x.strip()] if ns.studies is not None else None
    results = reproduce(ns.profile, ns.out, tasks=tasks, methods=methods, data_dir=ns.data_dir, model=ns.model,
                        rank_by=ns.rank_by, attribute_args=args, studies=studies)
    for task, entry in results["tasks"].items():
        cells = "  ".join(f"{m} {100 * v['acc']:.1f}/{100 * v['cover']:.1f}" for m, v in entry["methods"].items())
        print(f"{task:<13} {cells}")
    log(f"reproduce ({ns.profile}) finished in {results['wall_seconds']:.0f} s; report in {ns.out}/report.md")
    return 0


def cmd_study(ns: argparse.Namespace) -> int:
    from .progress import log
    from .studies import run_study

    options: dict[str, str] = {}
    for item in ns.option or []:
        if "=" not in item:
            raise UserError(f"--option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        options[key.strip().replace("-", "_")] = value
    result = run_study(ns.name, ns.profile, ns.out, data_dir=ns.data_dir, **options)
    print(result.markdown)
    log(f"study {ns.name} ({ns.profile}): {result.json_path}, {result.markdown_path}, "
        + ", ".join(str(f) for f in result.figures))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-influence", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tasks", help="list the tasks with their sizes and groups")
    _add_common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("finetune", help="LoRA fine-tune a model on a task into a run directory")
    _add_common(p)
    p.add_argument("--task", required=True, help="task name (see `llm-influence tasks`) or jsonl:PATH")
    p.add_argument("--model", help="smollm2-135m (default of the cpu/paper profiles), tiny-llama, a path or HF id")
    p.add_argument("--profile", default="cpu", help="smoke, cpu (default) or paper")
    p.add_argument("--out", required=True, help="run directory")
    _add_train_flags(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="greedy generation with a run's fine-tuned adapter")
    _add_common(p)
    p.add_argument("--run", required=True)
    p.add_argument("--prompt", required=True, action="append", help="may be given several times")
    p.add_argument("--checkpoint", default="last", help="epoch-N or last")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=cmd_generate)

    from .attribute import DEFAULT_METHODS

    p = sub.add_parser("attribute", help="score every training example for every test example")
    _add_common(p)
    p.add_argument("--run", required=True)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: datainf, lissa, gradsim, gradsim-cos, repsim, exact, exact-full, ekfac, tracin")
    p.add_argument("--checkpoint", default="last", help="epoch-N, last or all")
    p.add_argument("--damping", type=_damping, default=None,
                   help="a number, or 'auto' (default): per block damping-ratio x mean squared gradient entry")
    p.add_argument("--damping-ratio", type=float, default=0.1, help="the paper's 1/lambda_c (default 0.1)")
    p.add_argument("--lissa-iters", type=int, default=10)
    p.add_argument("--lissa-scale", type=_lissa_scale, default="auto")
    p.add_argument("--hessian", choices=["gauss-newton", "true"], default="gauss-newton",
                   help="lissa/exact-full: stored-gradient Gauss-Newton (default) or true Hessian-vector products")
    p.add_argument("--batch-size", type=int, default=8, help="feature extraction batch size")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--rep-layer", type=int, default=-1, help="hidden-state index for repsim (default: last)")
    p.add_argument("--rep-pooling", choices=["last-prompt", "mean-prompt", "mean"], default="last-prompt")
    p.add_argument("--force", action="store_true", help="recompute features and scores")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("evaluate", help="Acc and Cover of every scores file of a run -> RUN/metrics.json")
    _add_common(p)
    p.add_argument("--run", required=True)
    p.add_argument("--rank-by", choices=["score", "abs"], default="score",
                   help="score: descending (default); abs: the paper's older |IF| ranking")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reproduce", help="fine-tune, attribute and evaluate every paper task; write the report")
    _add_common(p)
    p.add_argument("--profile", default="cpu", help="smoke, cpu (default) or paper")
    p.add_argument("--out", required=True, help="output directory (runs/, results.json, report.md, figures/)")
    p.add_argument("--tasks", help="comma-separated (default: the paper's eight tasks)")
    p.add_argument("--methods", help="comma-separated (default: datainf,lissa,gradsim,repsim)")
    p.add_argument("--model", help="override the profile's model")
    p.add_argument("--rank-by", choices=["score", "abs"], default="score")
    p.add_argument("--damping", type=_damping, default=None)
    p.add_argument("--damping-ratio", type=float, default=0.1)
    p.add_argument("--lissa-iters", type=int, default=10)
    p.add_argument("--lissa-scale", type=_lissa_scale, default="auto")
    p.add_argument("--batch-size", type=int, default=8, help="feature extraction batch size")
    p.add_argument("--studies", help="comma-separated studies to run after the tasks (default: all; '' for none)")
    p.set_defaults(func=cmd_reproduce)

    from .studies import study_descriptions

    p = sub.add_parser("study", help="one of the paper's analyses: " + ", ".join(study_descriptions()))
    _add_common(p)
    p.add_argument("name", help="; ".join(f"{k}: {v}" for k, v in study_descriptions().items()))
    p.add_argument("--profile", default="cpu", help="smoke, cpu (default) or paper")
    p.add_argument("--out", required=True, help="output directory (NAME.json, NAME.md, PNGs)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="study-specific option (repeatable)")
    p.set_defaults(func=cmd_study)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from .progress import set_quiet

    set_quiet(getattr(ns, "quiet", False))
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    try:
        return int(ns.func(ns) or 0)
    except UserError as exc:
        print(f"llm-influence: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("llm-influence: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
