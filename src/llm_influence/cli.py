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
    p.add_argument("--plugin", action="append", metavar="MODULE_OR_FILE",
                   help="import a Python module or .py file first (e.g. one that registers a method); repeatable")


def _add_trust_remote_code(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a local or Hugging Face model run its own Python code (off by default; "
                        "only for sources you trust)")


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
    g.add_argument("--validation", choices=["held-out", "none"],
                   help="held-out: validation loss and early stopping on test-file rows that are never "
                        "attributed (from the rows the test subsample left out, else held out of it); "
                        "none: no validation")
    g.add_argument("--val-per-group", type=int, help="validation examples per group (held out, never attributed)")
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
    d.add_argument("--data-seed", type=int, default=0,
                   help="seed of the train/test/validation subsamples (default 0; --seed seeds training only)")


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
    task = load_task(ns.task, ns.data_dir, train_per_group=train_pg, test_per_group=test_pg, seed=ns.data_seed,
                     val_per_group=args.validation_per_group())
    result = finetune(ns.out, task, model_name=model, lora=lora, args=args, trust_remote_code=ns.trust_remote_code,
                      task_config={"profile": profile.name, "train_per_group": train_pg, "test_per_group": test_pg,
                                   "data_seed": ns.data_seed})
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    log(f"fine-tuned {model} on {ns.task} ({len(task.train)} train): {result.epochs_done} epochs"
        f"{' (early stop)' if result.stopped_early else ''}{val}; adapters in {result.run / 'checkpoints'}")
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from .models.generation import generate
    from .progress import log
    from .rundir import RunDir
    from .training.load import load_finetuned

    run = RunDir(ns.run)
    model, formatter, checkpoint = load_finetuned(run, ns.checkpoint, trust_remote_code=ns.trust_remote_code)
    name = run.config()["finetune"]["model"]
    prompts = ns.prompt
    for prompt, text in zip(prompts, generate(model, formatter, prompts, max_new_tokens=ns.max_new_tokens)):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(text)
    log(f"generated {len(prompts)} response(s) with {name} + {ns.run}/checkpoints/{checkpoint}")
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


def _add_scale_flags(p: argparse.ArgumentParser) -> None:
    """Feature-extraction flags shared by attribute and reproduce (dtype, chunks, projection)."""
    g = p.add_argument_group("feature extraction: precision, chunks, projection")
    g.add_argument("--dtype", choices=["float32", "float64", "bf16", "fp16"], default="float32",
                   help="model compute dtype; bf16/fp16 run forward/backward under autocast and store float32 "
                        "gradients (fp16 needs a CUDA GPU; bf16 also runs on the CPU)")
    g.add_argument("--chunk-size", type=int, default=256,
                   help="examples per feature chunk: finished chunks survive an interruption (run the same "
                        "command again to resume) and are the unit of work of a torchrun rank (default 256)")
    g.add_argument("--project-dim", type=int, default=None, metavar="D",
                   help="store a seeded random projection of each example's gradient to D dimensions in total "
                        "(split over the LoRA blocks) instead of the full gradient; part of the feature cache key")
    g.add_argument("--project-seed", type=int, default=0, help="seed of the projection (default 0)")
    g.add_argument("--project-kind", choices=["gaussian", "rademacher", "orthogonal"], default="gaussian")


def _scale_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {"dtype": ns.dtype, "chunk_size": ns.chunk_size, "project_dim": ns.project_dim,
            "project_seed": ns.project_seed, "project_kind": ns.project_kind}


def cmd_attribute(ns: argparse.Namespace) -> int:
    from .attribute import AttributeArgs, attribute, summary_line
    from .progress import log

    methods = tuple(m.strip() for m in ns.methods.split(",") if m.strip())
    if not methods:
        raise UserError("--methods: give at least one method")
    args = AttributeArgs(methods=methods, checkpoint=ns.checkpoint, damping=ns.damping,
                         damping_ratio=ns.damping_ratio, lissa_iters=ns.lissa_iters, lissa_scale=ns.lissa_scale,
                         hessian=ns.hessian, batch_size=ns.batch_size, rep_layer=ns.rep_layer,
                         rep_pooling=ns.rep_pooling, force=ns.force, trust_remote_code=ns.trust_remote_code,
                         **_scale_args(ns))
    from . import distributed

    try:
        results = attribute(ns.run, args)
    finally:
        distributed.shutdown()
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
                         lissa_scale=ns.lissa_scale, batch_size=ns.batch_size, **_scale_args(ns))
    studies = [x.strip() for x in ns.studies.split(",") if x.strip()] if ns.studies is not None else None
    results = reproduce(ns.profile, ns.out, tasks=tasks, methods=methods, data_dir=ns.data_dir, model=ns.model,
                        rank_by=ns.rank_by, attribute_args=args, studies=studies, seeds=ns.seeds,
                        seed_tasks=[t.strip() for t in ns.seed_tasks.split(",") if t.strip()] if ns.seed_tasks else None)
    from .distributed import current

    if current().rank != 0:  # torchrun: rank 0 prints the tables
        return 0
    for task, entry in results["tasks"].items():
        cells = "  ".join(f"{m} {100 * v['acc']:.1f}/{100 * v['cover']:.1f}" for m, v in entry["methods"].items())
        print(f"{task:<13} {cells}")
    log(f"reproduce ({ns.profile}) finished in {results['wall_seconds']:.0f} s; report in {ns.out}/report.md, explorer {ns.out}/report.html")
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


def cmd_report(ns: argparse.Namespace) -> int:
    from .report.html import write_html_report

    path = write_html_report(ns.out, ns.runs, top_k=ns.top_k, html_path=ns.html)
    print(f"report: {path} ({path.stat().st_size / 1e6:.2f} MB); open it in a browser (works offline)")
    return 0


def cmd_explain(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .explain import ExplainArgs, Query, args_from_run, explain, print_tables, read_queries, to_json, write_csv
    from .progress import log

    methods = tuple(m.strip() for m in ns.methods.split(",") if m.strip())
    options = {"methods": methods, "top": ns.top, "max_new_tokens": ns.max_new_tokens, "batch_size": ns.batch_size,
               "damping": ns.damping, "damping_ratio": ns.damping_ratio, "lissa_iters": ns.lissa_iters,
               "cache_dir": Path(ns.cache_dir) if ns.cache_dir else None,
               "trust_remote_code": ns.trust_remote_code}
    if ns.run:
        if ns.model or ns.adapter or ns.train:
            raise UserError("--run takes the model, adapter and training set from the run; "
                            "do not also give --model, --adapter or --train")
        args = args_from_run(ns.run, ns.checkpoint, **options)
    else:
        if not ns.model or not ns.train:
            raise UserError("give --model and --train (and --adapter for a LoRA fine-tune), or --run RUN")
        args = ExplainArgs(model=ns.model, train=Path(ns.train), adapter=Path(ns.adapter) if ns.adapter else None,
                           max_length=ns.max_length or 256, loss_on=ns.loss_on or "response", **options)
    if ns.run and (ns.max_length or ns.loss_on):
        raise UserError("--max-length/--loss-on come from the run with --run")
    if ns.queries and (ns.prompt or ns.response):
        raise UserError("give either --queries FILE or --prompt/--response, not both")
    if ns.response and not ns.prompt:
        raise UserError("--response needs --prompt")
    queries = read_queries(ns.queries) if ns.queries else [Query("q0", ns.prompt, ns.response)] if ns.prompt else []
    result = explain(queries, args)
    if ns.csv:
        write_csv(ns.csv, result)
    if ns.json:
        print(json.dumps(to_json(result), indent=2, ensure_ascii=False))
    elif not ns.csv:
        print_tables(result)
    log(f"explained {len(result.explanations)} quer{'y' if len(result.explanations) == 1 else 'ies'} with "
        f"{', '.join(args.methods)} in {result.seconds:.1f} s (training features "
        f"{'reused' if result.train_features_reused else 'computed'}; cache {result.query_run})"
        + (f"; CSV in {ns.csv}" if ns.csv else ""))
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
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="greedy generation with a run's fine-tuned adapter")
    _add_common(p)
    p.add_argument("--run", required=True)
    p.add_argument("--prompt", required=True, action="append", help="may be given several times")
    p.add_argument("--checkpoint", default="last", help="epoch-N or last")
    p.add_argument("--max-new-tokens", type=int, default=128)
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_generate)

    from .attribute import DEFAULT_METHODS

    p = sub.add_parser("attribute", help="score every training example for every test example")
    _add_common(p)
    p.add_argument("--run", required=True)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: datainf, lissa, gradsim, gradsim-cos, repsim, exact, exact-full, ekfac, "
                        "tracin, projected")
    p.add_argument("--checkpoint", default="last", help="epoch-N, last or all")
    p.add_argument("--damping", type=_damping, default=None,
                   help="a number, or 'auto' (default): per block damping-ratio x mean squared gradient entry")
    p.add_argument("--damping-ratio", type=float, default=0.1, help="the paper's 1/lambda_c (default 0.1)")
    p.add_argument("--lissa-iters", type=int, default=10)
    p.add_argument("--lissa-scale", type=_lissa_scale, default="auto")
    p.add_argument("--hessian", choices=["gauss-newton", "true"], default="gauss-newton",
                   help="lissa/exact-full: stored-gradient Gauss-Newton (default) or true Hessian-vector products")
    p.add_argument("--batch-size", type=int, default=8, help="feature extraction batch size")
    _add_scale_flags(p)
    p.add_argument("--rep-layer", type=int, default=-1, help="hidden-state index for repsim (default: last)")
    p.add_argument("--rep-pooling", choices=["last-prompt", "mean-prompt", "mean"], default="last-prompt")
    p.add_argument("--force", action="store_true", help="recompute features and scores")
    _add_trust_remote_code(p)
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
    p.add_argument("--methods", help="comma-separated (default: datainf,lissa,gradsim,repsim,exact, as attribute)")
    p.add_argument("--model", help="override the profile's model")
    p.add_argument("--rank-by", choices=["score", "abs"], default="score")
    p.add_argument("--damping", type=_damping, default=None)
    p.add_argument("--damping-ratio", type=float, default=0.1)
    p.add_argument("--lissa-iters", type=int, default=10)
    p.add_argument("--lissa-scale", type=_lissa_scale, default="auto")
    p.add_argument("--batch-size", type=int, default=8, help="feature extraction batch size")
    _add_scale_flags(p)
    p.add_argument("--studies", help="comma-separated studies to run after the tasks (default: all; '' for none)")
    p.add_argument("--seeds", type=int, default=1,
                   help="fine-tuning seeds per task (the profile's seed, +1, ...); tables add mean +- std")
    p.add_argument("--seed-tasks", help="comma-separated tasks that get --seeds seeds (default: every task)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("explain", help="rank the training examples that most influenced a model's response")
    _add_common(p)
    src = p.add_argument_group("model and training set (either --run, or --model/--train[/--adapter])")
    src.add_argument("--run", help="a fine-tuned run directory (model, adapter, training set, max_length)")
    src.add_argument("--checkpoint", default="last", help="with --run: epoch-N or last")
    src.add_argument("--model", help="smollm2-135m, tiny-llama, a local model directory or HF id")
    src.add_argument("--adapter", help="peft adapter folder (adapter_config.json + adapter_model.safetensors); "
                     "without it a fresh LoRA (B=0) gives randomly projected full-weight gradients")
    src.add_argument("--train", help="training set JSONL: prompt, response, optional id and group")
    src.add_argument("--max-length", type=int, help="token limit used in fine-tuning (default 256)")
    src.add_argument("--loss-on", choices=["response", "all"], help="tokens the fine-tuning loss covered")
    q = p.add_argument_group("queries")
    q.add_argument("--prompt", help="the prompt to explain")
    q.add_argument("--response", help="the response to explain (default: generate it greedily)")
    q.add_argument("--queries", help="batch mode: JSONL with prompt, optional response and id per line")
    q.add_argument("--max-new-tokens", type=int, default=128, help="for generated responses")
    p.add_argument("--methods", default="repsim,datainf", help="comma-separated (default: repsim,datainf)")
    p.add_argument("--top", type=int, default=10, help="training examples shown per query and method")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of tables")
    out.add_argument("--csv", help="write one row per (query, method, rank) to this CSV file")
    p.add_argument("--batch-size", type=int, default=8, help="feature extraction batch size")
    p.add_argument("--damping", type=_damping, default=None)
    p.add_argument("--damping-ratio", type=float, default=0.1)
    p.add_argument("--lissa-iters", type=int, default=10)
    p.add_argument("--cache-dir", help="where query runs are cached (default: $LLM_INFLUENCE_CACHE/explain)")
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_explain)

    from .studies import study_descriptions

    p = sub.add_parser("study", help="one of the paper's analyses: " + ", ".join(study_descriptions()))
    _add_common(p)
    p.add_argument("name", help="; ".join(f"{k}: {v}" for k, v in study_descriptions().items()))
    p.add_argument("--profile", default="cpu", help="smoke, cpu (default) or paper")
    p.add_argument("--out", required=True, help="output directory (NAME.json, NAME.md, PNGs)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="study-specific option (repeatable)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="one self-contained HTML explorer of a reproduce output or of run directories")
    _add_common(p)
    p.add_argument("--out", required=True, help="reproduce output directory (runs in DIR/runs/*); report.html goes here")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="explicit run directories instead of DIR/runs/*")
    p.add_argument("--top-k", type=int, default=10, help="training examples listed per test example (default 10)")
    p.add_argument("--html", metavar="PATH", help="write the page here instead of DIR/report.html")
    p.set_defaults(func=cmd_report)
    return parser


def load_plugin(spec: str) -> None:
    """Import ``spec``: a ``.py`` file path or an importable module name. Its top level runs,
    so ``@register`` / ``@register_study`` decorators in it take effect."""
    import importlib
    import importlib.util
    from pathlib import Path

    try:
        if spec.endswith(".py") or Path(spec).is_file():
            path = Path(spec)
            if not path.is_file():
                raise UserError(f"--plugin {spec}: no such file")
            module_spec = importlib.util.spec_from_file_location(f"llm_influence_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except UserError:
        raise
    except Exception as exc:  # the plugin's own error, reported in one line
        where = ""
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(Path(spec).name):
                where = f":{tb.tb_lineno}"
            tb = tb.tb_next
        raise UserError(f"--plugin {spec}{where}: {type(exc).__name__}: {exc}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from .progress import set_quiet

    set_quiet(getattr(ns, "quiet", False))
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    try:
        for plugin in getattr(ns, "plugin", None) or []:
            load_plugin(plugin)
        return int(ns.func(ns) or 0)
    except UserError as exc:
        print(f"llm-influence: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except OSError as exc:
        # A user path that cannot be read or written (a file where a folder is expected, a
        # missing parent, no permission, a full disk): one line, not a traceback.
        if exc.filename is None and exc.strerror is None:
            raise
        where = f"{exc.filename}: " if exc.filename is not None else ""
        print(f"llm-influence: error: {where}{(exc.strerror or str(exc)).lower()}", file=sys.stderr)
        return UserError.exit_status
    except KeyboardInterrupt:
        print("llm-influence: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
