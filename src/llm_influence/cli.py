"""The command line (``llm-influence`` or ``python -m llm_influence``). Thin: it parses
arguments and calls the library.

One name, one meaning in every command: ``--train-batch-size`` / ``--train-dtype`` are the
fine-tuning step's, ``--extract-batch-size`` / ``--extract-dtype`` feature extraction's;
``--top-k`` is the number of training examples listed; ``--data-dir`` exists only where
task data are read. Method arguments come from each method's ``Arguments`` declaration:
``--method-arg NAME.FIELD=VALUE`` sets any of them (plugins included, ``--plugin`` is read
first), and fields a method declares shared (``--damping``, ``--damping-ratio``) are also
options of their own that set every chosen method declaring them. A flag that would have
no effect is an error naming it.

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

#: ``--loss-on`` values; the same as :data:`llm_influence.models.formatting.LOSS_ON_CHOICES`
#: (written out so that building the parser does not import torch; a test keeps them equal).
LOSS_ON_CHOICES = ("response", "all", "all-padded")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad choice) are a :class:`UserError`: one line
    ``llm-influence: error: COMMAND: MESSAGE``, exit status 2, no usage block."""

    def error(self, message: str):  # type: ignore[override]
        command = self.prog.removeprefix("llm-influence").strip()
        raise UserError(f"{command}: {message}" if command else message)


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


def _add_common(p: argparse.ArgumentParser, *, data: bool = False, plugins: bool = False) -> None:
    """``--quiet`` everywhere; ``--data-dir`` where task data are read; ``--plugin`` where
    methods or studies are chosen."""
    if data:
        p.add_argument("--data-dir", help="data directory (default: $LLM_INFLUENCE_DATA; "
                                          "`llm-influence data fetch` makes one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    if plugins:
        p.add_argument("--plugin", action="append", metavar="MODULE_OR_FILE",
                       help="import a Python module or .py file first (e.g. one that registers a method or a "
                            "study); repeatable")


def _add_profile(p: argparse.ArgumentParser) -> None:
    from .config import PROFILES

    p.add_argument("--profile", default="cpu", choices=list(PROFILES),
                   help="model, LoRA, subsample sizes and training defaults: smoke (seconds, tiny model), "
                        "cpu (default, SmolLM2-135M on a laptop CPU) or paper (the paper's sizes; a GPU)")


# ---------------------------------------------------------------------------------------
# method arguments, generated from the methods' declarations

def _shared_fields() -> dict[str, Any]:
    """``{field name: dataclass field}`` of the fields some registered method declares shared."""
    from .methods import available_methods, method_fields

    out: dict[str, Any] = {}
    for name in available_methods():
        for f in method_fields(name):
            if f.metadata.get("shared") and f.name not in out:
                out[f.name] = f
    return out


def _methods_epilog() -> str:
    from .methods import available_methods, get_method_class
    from .methods.arguments import field_help

    lines = ["method arguments (--method-arg NAME.FIELD=VALUE; values: numbers, true/false, none, or text):"]
    for name in available_methods():
        cls = get_method_class(name)
        helps = field_help(cls.Arguments)
        lines.append(f"  {name} [{cls.scoring.value}; needs {', '.join(sorted(cls.needs))}]"
                     + ("" if helps else ": no arguments"))
        lines.extend(f"    {name}.{k}: {v}" for k, v in helps.items())
    return "\n".join(lines)


def _add_method_flags(p: argparse.ArgumentParser, default_methods: Optional[Sequence[str]], what: str) -> None:
    from .methods import available_methods

    g = p.add_argument_group("methods and their arguments (see the list below)")
    default = ",".join(default_methods) if default_methods else None
    g.add_argument("--methods", default=default,
                   help=f"comma-separated, from: {', '.join(available_methods())} (default: {what})")
    g.add_argument("--method-arg", action="append", default=[], metavar="NAME.FIELD=VALUE",
                   help="set one argument of one chosen method, e.g. lissa.iterations=50; repeatable")
    for field_name, f in _shared_fields().items():
        g.add_argument("--" + field_name.replace("_", "-"), default=None, metavar="VALUE",
                       help=f"{f.metadata.get('help', '')}; sets {field_name} of every chosen method that has it "
                            f"(default {f.default!r})")
    p.epilog = _methods_epilog()
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def _method_names(ns: argparse.Namespace, default: Sequence[str]) -> list[str]:
    names = [m.strip() for m in ns.methods.split(",") if m.strip()] if ns.methods else list(default)
    if not names:
        raise UserError("--methods: give at least one method")
    return list(dict.fromkeys(names))


def _method_args(ns: argparse.Namespace, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{method: {field: value}}`` from the shared flags and ``--method-arg`` (values parsed
    by :func:`~llm_influence.methods.arguments.parse_text`; the methods check them)."""
    from .methods import get_method_class, method_parameters
    from .methods.arguments import parse_text

    for name in names:
        get_method_class(name)
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    for field_name in _shared_fields():
        value = getattr(ns, field_name, None)
        if value is None:
            continue
        flag = "--" + field_name.replace("_", "-")
        targets = [n for n in names if field_name in method_parameters(n)]
        if not targets:
            raise UserError(f"{flag}: none of the chosen methods ({', '.join(names)}) has an argument {field_name}")
        for n in targets:
            out[n][field_name] = parse_text(value)
    for item in ns.method_arg or []:
        key, sep, text = item.partition("=")
        name, dot, field_name = key.strip().rpartition(".")
        if not sep or not dot or not name or not field_name:
            raise UserError(f"--method-arg {item!r}: expected NAME.FIELD=VALUE, e.g. lissa.iterations=50")
        if name not in names:
            raise UserError(f"--method-arg {item!r}: {name} is not among the chosen methods ({', '.join(names)})")
        accepted = method_parameters(name)
        if field_name not in accepted:
            raise UserError(f"--method-arg {item!r}: {name} has no argument {field_name!r}; "
                            f"accepted: {', '.join(accepted) or 'none'}")
        out[name][field_name] = parse_text(text)
    return {k: v for k, v in out.items() if v}


def _add_trust_remote_code(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a local or Hugging Face model run its own Python code (off by default; "
                        "only for sources you trust)")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults come from the profile)")
    g.add_argument("--epochs", type=int, help="passes over the training set")
    g.add_argument("--train-batch-size", type=int, help="examples per optimiser step")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW), linear warm-up then linear decay to 0")
    g.add_argument("--warmup-ratio", type=float, help="fraction of all steps spent warming up, in [0, 1)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, help="gradient-norm clipping (0: none)")
    g.add_argument("--max-length", type=int, help="token limit of prompt + response (truncated beyond)")
    g.add_argument("--loss-on", choices=LOSS_ON_CHOICES,
                   help="response: mask prompt tokens (default); all: prompt and response; all-padded: the "
                   "authors' v2 code (left-padded with EOS to --max-length, the padding supervised too)")
    g.add_argument("--seed", type=int, help="seed of LoRA initialisation, dropout and batch order (training only)")
    g.add_argument("--early-stopping", dest="early_stopping", action=argparse.BooleanOptionalAction, default=None,
                   help="stop when the validation loss has risen for --patience evaluations (needs validation)")
    g.add_argument("--patience", type=int, help="evaluations of rising validation loss before early stopping")
    g.add_argument("--eval-batch-size", type=int, help="examples per forward pass of the validation loss")
    g.add_argument("--validation", choices=["held-out", "none"],
                   help="held-out: validation loss and early stopping on test-file rows that are never "
                        "attributed (from the rows the test subsample left out, else held out of it); "
                        "none: no validation")
    g.add_argument("--val-per-group", type=int, help="validation examples per group (held out, never attributed)")
    g.add_argument("--train-dtype", choices=["float32", "bf16"],
                   help="precision of the training forward/backward: float32, or bf16 autocast where the hardware "
                        "has native bfloat16 (otherwise a warning and float32)")
    l = p.add_argument_group("LoRA (defaults: the paper's r=4, alpha=32, dropout 0.1 on q_proj,v_proj)")
    l.add_argument("--lora-r", type=int, help="LoRA rank r")
    l.add_argument("--lora-alpha", type=int, help="LoRA scaling alpha (the update is alpha/r B A)")
    l.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input")
    l.add_argument("--lora-targets", help="comma-separated module names, e.g. q_proj,v_proj")
    l.add_argument("--lora-layers", type=_int_list, help="comma-separated decoder layer indices (default: all)")
    d = p.add_argument_group("data subsampling (defaults come from the profile)")
    d.add_argument("--train-per-group", type=_per_group, help="training examples per group (a cap), or 'all'")
    d.add_argument("--test-per-group", type=_per_group, help="test examples per group (a cap), or 'all'")
    d.add_argument("--data-seed", type=int, default=0,
                   help="seed of the train/test/validation subsamples (default 0; --seed seeds training only)")


#: command-line flag -> TrainArgs field, where the names differ
_TRAIN_FLAG_FIELDS = {"train_batch_size": "batch_size", "train_dtype": "autocast"}
_TRAIN_DTYPE_AUTOCAST = {"float32": "none", "bf16": "bf16"}


def _train_overrides(ns: argparse.Namespace, args) -> Any:
    names = {f.name for f in fields(args)}
    changes: dict[str, Any] = {}
    for key, value in vars(ns).items():
        target = _TRAIN_FLAG_FIELDS.get(key, key)
        if value is None or target not in names or key in ("batch_size", "autocast"):
            continue
        changes[target] = _TRAIN_DTYPE_AUTOCAST[value] if key == "train_dtype" else value
    args = replace(args, **changes)
    if args.validation == "none" and ns.val_per_group is not None:
        raise UserError("--val-per-group: has no effect with --validation none")
    if args.validation == "none" and (ns.patience is not None or ns.early_stopping):
        raise UserError("--patience/--early-stopping: early stopping needs validation; drop --validation none")
    return args


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


def cmd_backdoor(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .evaluation.backdoor import backdoor_task_of, result_entry, run_backdoor_check, verdict
    from .progress import log
    from .rundir import RunDir

    if ns.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {ns.max_new_tokens}: must be at least 1")
    run = RunDir(ns.run)
    backdoor_task_of(run)  # a non-backdoor task is a one-line error before anything is loaded
    checkpoints = run.resolve_checkpoints(ns.checkpoint)
    records = [run_backdoor_check(ns.run, c, data_dir=ns.data_dir, max_new_tokens=ns.max_new_tokens,
                                  force=ns.force, trust_remote_code=ns.trust_remote_code) for c in checkpoints]
    task = records[0]["task"]
    if ns.json:
        print(json.dumps({"run": str(run.path), "task": task,
                          "checkpoints": [{**result_entry(r, relative_to=run.path), "reused": r["reused"]}
                                          for r in records]}, indent=2))
    else:
        console = Console()
        for r in records:
            table = Table(title=f"{task} {r['checkpoint']}: compliance on held-out prompts "
                                f"(greedy, {r['max_new_tokens']} new tokens)")
            for col in ("group", "response prefix", "prompts", "compliance", "with prefix", "degenerate"):
                table.add_column(col, justify="left" if col in ("group", "response prefix") else "right")
            for group, g in r["per_group"].items():
                table.add_row(group, repr(g["prefix"]) if g["prefix"] else "-", str(g["n"]), f"{g['compliance']:.2f}",
                              "-" if g["prefix_share"] is None else f"{g['prefix_share']:.2f}",
                              f"{g['degenerate_share']:.2f}")
            console.print(table)
            print(verdict(f"{task} ({r['checkpoint']})", r))
    log(f"generations in {run.path / 'backdoor'}/ ("
        + ", ".join(f"{r['checkpoint']} {'reused' if r['reused'] else 'generated'}" for r in records) + ")")
    return 0


def _add_scale_flags(p: argparse.ArgumentParser) -> None:
    """Feature-extraction flags shared by attribute and reproduce (dtype, chunks, projection)."""
    g = p.add_argument_group("feature extraction: batch, precision, chunks, projection")
    g.add_argument("--extract-batch-size", type=int, default=8,
                   help="examples per forward/backward pass of feature extraction (default 8)")
    g.add_argument("--extract-dtype", choices=["float32", "float64", "bf16", "fp16"], default="float32",
                   help="model compute dtype; bf16/fp16 run forward/backward under autocast and store float32 "
                        "gradients (fp16 needs a CUDA GPU; bf16 also runs on the CPU)")
    g.add_argument("--chunk-size", type=int, default=256,
                   help="examples per feature chunk: finished chunks survive an interruption (run the same "
                        "command again to resume) and are the unit of work of a torchrun rank (default 256)")
    g.add_argument("--project-dim", type=int, default=None, metavar="D",
                   help="store a seeded random projection of each example's gradient to D dimensions in total "
                        "(split over the LoRA blocks) instead of the full gradient; part of the feature cache key")
    g.add_argument("--project-seed", type=int, default=None, help="seed of the projection (default 0; needs --project-dim)")
    g.add_argument("--project-kind", choices=["gaussian", "rademacher", "orthogonal"], default=None,
                   help="distribution of the projection matrix (default gaussian; needs --project-dim)")


def _measure_value(text: str) -> str:
    """``--measure`` checked against the measurements known now (plugins are loaded first)."""
    from .features.measure import parse_measure

    try:
        return parse_measure(text).spec()
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--measure {text!r}: ").removeprefix("--measure: ")) \
            from None


def _add_measure(p: argparse.ArgumentParser) -> None:
    """``--measure`` (attribute, reproduce, explain): what the test gradients are the gradient of."""
    from .features.measure import DEFAULT_MEASURE, MEASURE_HELP

    p.add_argument("--measure", type=_measure_value, default=DEFAULT_MEASURE, metavar="loss|logprob:TEXT|NAME",
                   help=MEASURE_HELP)


def _scale_args(ns: argparse.Namespace) -> dict[str, Any]:
    if ns.project_dim is None and (ns.project_seed is not None or ns.project_kind is not None):
        raise UserError("--project-seed/--project-kind: have no effect without --project-dim")
    return {"extract_batch_size": ns.extract_batch_size, "dtype": ns.extract_dtype, "chunk_size": ns.chunk_size,
            "project_dim": ns.project_dim, "project_seed": 0 if ns.project_seed is None else ns.project_seed,
            "project_kind": ns.project_kind or "gaussian"}


def cmd_attribute(ns: argparse.Namespace) -> int:
    from . import distributed
    from .attribute import DEFAULT_METHODS, AttributeArgs, attribute, summary_line
    from .progress import log

    methods = _method_names(ns, DEFAULT_METHODS)
    args = AttributeArgs(methods=tuple(methods), method_args=_method_args(ns, methods), checkpoint=ns.checkpoint,
                         rep_layer=ns.rep_layer, rep_pooling=ns.rep_pooling, force=ns.force,
                         trust_remote_code=ns.trust_remote_code, measure=ns.measure, **_scale_args(ns))
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
    from .reproduce import DEFAULT_BENCHMARK_METHODS, reproduce

    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()] if ns.tasks else None
    methods = _method_names(ns, DEFAULT_BENCHMARK_METHODS)
    args = AttributeArgs(method_args=_method_args(ns, methods), measure=ns.measure, **_scale_args(ns))
    studies = [x.strip() for x in ns.studies.split(",") if x.strip()] if ns.studies is not None else None
    if ns.seed_tasks and ns.seeds == 1:
        raise UserError("--seed-tasks: has no effect with --seeds 1")
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
    from pathlib import Path

    from .report.html import write_html_report

    if ns.source is None and not ns.runs:
        raise UserError("give --from DIR (a reproduce output) or --runs RUN [RUN ...]")
    if ns.source is None and ns.html is None:
        raise UserError("--runs: give --html PATH for the page (there is no --from DIR to write it into)")
    path = write_html_report(ns.source or Path(ns.html).parent, ns.runs, top_k=ns.top_k, html_path=ns.html,
                             tokens=ns.tokens)
    print(f"report: {path} ({path.stat().st_size / 1e6:.2f} MB); open it in a browser (works offline)")
    return 0


def cmd_explain(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .explain import ExplainArgs, Query, args_from_run, explain, print_tables, read_queries, to_json, write_csv
    from .progress import log

    from .explain import DEFAULT_EXPLAIN_METHODS

    methods = tuple(_method_names(ns, DEFAULT_EXPLAIN_METHODS))
    options = {"methods": methods, "method_args": _method_args(ns, methods), "top_k": ns.top_k, "rank_by": ns.rank_by,
               "max_new_tokens": ns.max_new_tokens, "extract_batch_size": ns.extract_batch_size,
               "cache_dir": Path(ns.cache_dir) if ns.cache_dir else None,
               "trust_remote_code": ns.trust_remote_code, "tokens": ns.tokens, "measure": ns.measure}
    if ns.checkpoint and not ns.run:
        raise UserError("--checkpoint: applies only with --run")
    if ns.run:
        if ns.model or ns.adapter or ns.train:
            raise UserError("--run takes the model, adapter and training set from the run; "
                            "do not also give --model, --adapter or --train")
        args = args_from_run(ns.run, ns.checkpoint or "last", **options)
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
    """The parser; methods registered by plugins (loaded before it is built) are included."""
    from .attribute import DEFAULT_METHODS
    from .data.commands import add_data_parser
    from .evaluation.backdoor import DEFAULT_MAX_NEW_TOKENS as BACKDOOR_MAX_NEW_TOKENS
    from .explain import DEFAULT_EXPLAIN_METHODS
    from .reproduce import DEFAULT_BENCHMARK_METHODS
    from .studies import study_descriptions

    parser = _Parser(prog="llm-influence", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tasks", help="list the tasks with their sizes and groups")
    _add_common(p, data=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_tasks)

    add_data_parser(sub)

    p = sub.add_parser("finetune", help="LoRA fine-tune a model on a task into a run directory")
    _add_common(p, data=True)
    p.add_argument("--task", required=True, help="task name (see `llm-influence tasks`) or jsonl:PATH")
    p.add_argument("--model", help="smollm2-135m (default of the cpu/paper profiles), tiny-llama, a path or HF id")
    _add_profile(p)
    p.add_argument("--out", required=True, help="run directory to create (or resume)")
    _add_train_flags(p)
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="greedy generation with a run's fine-tuned adapter")
    _add_common(p)
    p.add_argument("--run", required=True, help="a fine-tuned run directory")
    p.add_argument("--prompt", required=True, action="append", help="the prompt; may be given several times")
    p.add_argument("--checkpoint", default="last", help="epoch-N or last (default)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length limit (default 128)")
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("backdoor", help="is a backdoor task's backdoor installed? compliance of greedy generations "
                                        "on the run's held-out triggered and clean prompts")
    _add_common(p, data=True)
    p.add_argument("--run", required=True, help="a fine-tuned run directory of a backdoor task")
    p.add_argument("--checkpoint", default="last", help="epoch-N, last (default) or all")
    p.add_argument("--max-new-tokens", type=int, default=BACKDOOR_MAX_NEW_TOKENS,
                   help=f"greedy new tokens per prompt (default {BACKDOOR_MAX_NEW_TOKENS}; part of the cache key)")
    p.add_argument("--force", action="store_true",
                   help="generate again even when RUN/backdoor/epoch-N.json holds this adapter's generations")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_backdoor)

    p = sub.add_parser("attribute", help="score every training example for every test example")
    _add_common(p, plugins=True)
    p.add_argument("--run", required=True, help="a fine-tuned run directory")
    p.add_argument("--checkpoint", default="last", help="epoch-N, last (default) or all")
    _add_method_flags(p, DEFAULT_METHODS, ",".join(DEFAULT_METHODS))
    _add_scale_flags(p)
    _add_measure(p)
    p.add_argument("--rep-layer", type=int, default=-1,
                   help="hidden-state index for representations, RepSim's and DRA's (default: last; RepT's layer is "
                        "--method-arg rept.layer=N|auto)")
    p.add_argument("--rep-pooling", choices=["last-prompt", "mean-prompt", "mean"], default="last-prompt",
                   help="tokens the representation is taken from (default last-prompt)")
    p.add_argument("--force", action="store_true", help="recompute features and scores")
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("evaluate", help="Acc and Cover of every scores file of a run -> RUN/metrics.json")
    _add_common(p)
    p.add_argument("--run", required=True, help="a run directory with scores")
    _add_rank_by(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reproduce", help="fine-tune, attribute and evaluate every paper task; write the report")
    _add_common(p, data=True, plugins=True)
    _add_profile(p)
    p.add_argument("--out", required=True, help="output directory (runs/, results.json, report.md, figures/)")
    p.add_argument("--tasks", help="comma-separated (default: the paper's eight tasks)")
    p.add_argument("--model", help="override the profile's model")
    _add_rank_by(p)
    _add_method_flags(p, None, ",".join(DEFAULT_BENCHMARK_METHODS) + ", as attribute")
    _add_scale_flags(p)
    _add_measure(p)
    p.add_argument("--studies", help="comma-separated studies to run after the tasks (default: all; '' for none)")
    p.add_argument("--seeds", type=int, default=1,
                   help="fine-tuning seeds per task (the profile's seed, +1, ...); tables add mean +- std")
    p.add_argument("--seed-tasks", help="comma-separated tasks that get --seeds seeds (default: every task)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("explain", help="rank the training examples that most influenced a model's response")
    _add_common(p, plugins=True)
    src = p.add_argument_group("model and training set (either --run, or --model/--train[/--adapter])")
    src.add_argument("--run", help="a fine-tuned run directory (model, adapter, training set, max_length)")
    src.add_argument("--checkpoint", help="with --run: epoch-N or last (default)")
    src.add_argument("--model", help="smollm2-135m, tiny-llama, a local model directory or HF id")
    src.add_argument("--adapter", help="peft adapter folder (adapter_config.json + adapter_model.safetensors); "
                     "without it a fresh LoRA (B=0) gives randomly projected full-weight gradients")
    src.add_argument("--train", help="training set JSONL: prompt, response, optional id and group")
    src.add_argument("--max-length", type=int, help="token limit used in fine-tuning (default 256)")
    src.add_argument("--loss-on", choices=LOSS_ON_CHOICES, help="tokens the fine-tuning loss covered")
    q = p.add_argument_group("queries")
    q.add_argument("--prompt", help="the prompt to explain")
    q.add_argument("--response", help="the response to explain (default: generate it greedily)")
    q.add_argument("--queries", help="batch mode: JSONL with prompt, optional response and id per line")
    q.add_argument("--max-new-tokens", type=int, default=128, help="for generated responses (default 128)")
    _add_method_flags(p, DEFAULT_EXPLAIN_METHODS, ",".join(DEFAULT_EXPLAIN_METHODS))
    p.add_argument("--top-k", type=int, default=10, help="training examples listed per query and method (default 10)")
    _add_measure(p)
    p.add_argument("--tokens", type=int, default=0, metavar="N",
                   help="with rept among --methods: RepT's token-level attribution, the N tokens of each listed "
                        "training example that contribute most (JSON field 'tokens' and a table column; default 0: off)")
    _add_rank_by(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of tables")
    out.add_argument("--csv", help="write one row per (query, method, rank) to this CSV file")
    p.add_argument("--extract-batch-size", type=int, default=8,
                   help="examples per forward/backward pass of feature extraction and generation (default 8)")
    p.add_argument("--cache-dir", help="where query runs are cached (default: $LLM_INFLUENCE_CACHE/explain)")
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("study", help="one of the paper's analyses: " + ", ".join(study_descriptions()))
    _add_common(p, data=True, plugins=True)
    p.add_argument("name", choices=list(study_descriptions()), metavar="NAME",
                   help="; ".join(f"{k}: {v}" for k, v in study_descriptions().items()))
    _add_profile(p)
    p.add_argument("--out", required=True, help="output directory (NAME.json, NAME.md, PNGs)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="study-specific option (repeatable)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="one self-contained HTML explorer of a reproduce output or of run directories")
    _add_common(p)
    p.add_argument("--from", dest="source", metavar="DIR",
                   help="a reproduce output directory (runs in DIR/runs/*); report.html is written there")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="explicit run directories instead of DIR/runs/*")
    p.add_argument("--top-k", type=int, default=10, help="training examples listed per test example (default 10)")
    p.add_argument("--html", metavar="PATH", help="write the page here instead of DIR/report.html")
    p.add_argument("--tokens", type=int, default=0, metavar="N",
                   help="RepT's token view: the N best tokens of each listed training example against the selected "
                        "test example (runs with rept scores; one model pass per run, cached; default 0 = off)")
    p.set_defaults(func=cmd_report)
    return parser


def _add_rank_by(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank-by", choices=["score", "abs"], default="score",
                   help="score: descending (default); abs: the paper's older |IF| ranking")


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


#: the commands that take ``--plugin`` (they choose methods or studies)
PLUGIN_COMMANDS = ("attribute", "reproduce", "explain", "study")


def _plugins_in(argv: Sequence[str]) -> list[str]:
    """The ``--plugin`` values of ``argv`` for a command that takes them (read before the
    parser is built, so a plugin's methods and their arguments are part of it; for other
    commands the parser refuses the flag)."""
    if not argv or argv[0] not in PLUGIN_COMMANDS:
        return []
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--plugin" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            out.append(arg.split("=", 1)[1])
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m llm_influence -- attribute ...` passes the separator on
        argv = argv[1:]
    from .progress import set_quiet

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    try:
        for plugin in _plugins_in(argv):
            load_plugin(plugin)
        ns = build_parser().parse_args(argv)
        set_quiet(getattr(ns, "quiet", False))
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
