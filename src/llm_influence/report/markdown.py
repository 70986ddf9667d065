"""``report.md``: the benchmark's results as the paper's Tables 2-4, with run facts,
solver residuals and figures.

Input: the benchmark runner's results dict (schema below) and the figures already
written. Output: Markdown text. The text states facts only (numbers, sizes, times); the
interpretation belongs in the README.

Results schema (keys this module reads; others are ignored)::

    {"profile": "cpu", "model": "smollm2-135m", "machine": "2-core x86_64 CPU, 24 GiB",
     "wall_seconds": 1234.5, "rank_by": "score", "started": "...", "versions": {...},
     "tasks": {TASK: {"n_train": 40, "n_test": 40, "epochs": 6, "stopped_early": False,
                      "train_loss": [...per epoch...], "val_loss": [...],
                      "finetune_seconds": 300.1, "checkpoint": "epoch-6",
                      "feature_seconds": 12.3, "error": "...optional...",
                      "backdoor": {...backdoor tasks: evaluation.backdoor.result_entry...},
                      "methods": {METHOD: {"acc": 0.9, "cover": 0.6, "seconds": 0.5,
                                           "n_scored": 40, "n_skipped": 0,
                                           "diagnostics": {"residual_max": 1.2,
                                                           "residual_mean": 0.4, ...},
                                           "error": "...optional..."}}}}}

Conventions of the rendered tables:

* ``acc`` / ``cover`` in the results are fractions in ``[0, 1]``; they are printed as
  percentages with one decimal (``0.9`` -> ``90.0``). The paper's numbers
  (:mod:`.paper_numbers`) are already percentages and are printed the same way.
* Rows are methods: the paper's four (DataInf, LiSSA, GradSim, RepSim) always, in that
  order, then every other method present in the table's tasks (``exact``,
  ``exact-full``, ``ekfac``, ``tracin``, ``gradsim-cos``, ``projected``, then any other
  name alphabetically). A method without a number for a task shows ``–`` (U+2013).
* Columns, per task present in the results: ``<task> Acc``, then ``<task> Acc (paper)``
  when the paper's number is known, then ``<task> Cover`` and ``<task> Cover (paper)``.
  Tasks absent from the results are omitted; a table with none of its tasks is omitted.
  A table without known paper numbers has no paper columns and says so.
* In each of our columns the best value (highest, compared at the printed precision) is
  **bold**, every tied cell included, when the column has at least two numbers. Paper
  columns are never bold.
* Tasks not in Tables 2-4 (extras, ``jsonl:`` data) get their own table, without paper
  columns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..io_utils import atomic_path
from .paper_numbers import (OTHER_TASK_REFERENCES, PAPER_ARXIV, PAPER_METHODS, PAPER_TABLES, PAPER_TITLE,
                            PaperTable)

DASH = "–"

METHOD_LABELS: dict[str, str] = {
    "datainf": "DataInf",
    "lissa": "LiSSA",
    "lissa-paper": "LiSSA (authors' recursion)",
    "gradsim": "GradSim",
    "repsim": "RepSim",
    "exact": "Exact",
    "exact-full": "Exact (full Hessian)",
    "ekfac": "EK-FAC",
    "tracin": "TracIn",
    "gradsim-cos": "GradSim (cosine)",
    "projected": "Projected",
    "rept": "RepT",
    "dra": "DRA",
    "trackstar": "TrackStar",
    "less": "LESS",
}

#: Methods beyond the paper's four, in the order the report lists them.
EXTRA_METHOD_ORDER: tuple[str, ...] = ("exact", "exact-full", "ekfac", "tracin", "gradsim-cos", "projected", "rept",
                                        "dra", "trackstar", "less")

#: The paper's tables in the report's order.
TABLE_ORDER: tuple[int, ...] = (2, 3, 4)

_DIAGNOSTIC_NOTES: tuple[str, ...] = ("solver", "hessian", "iterations", "iterations_max", "iterations_mean",
                                      "converged", "not_converged", "negative_curvature", "scale", "hvp_calls")


# --------------------------------------------------------------------------- formatting

def _number(value: Any) -> Optional[float]:
    """``value`` as a float, or ``None`` when it is missing or not a number.

    ``inf`` / ``-inf`` (also the strings JSON writers use for them) are kept; NaN is
    treated as missing."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("inf", "+inf", "infinity", "+infinity"):
            return math.inf
        if text in ("-inf", "-infinity"):
            return -math.inf
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def format_percent(fraction: Any) -> str:
    """A fraction in ``[0, 1]`` as a percentage with one decimal (``0.9`` -> ``"90.0"``);
    ``–`` when missing, NaN or infinite."""
    value = _number(fraction)
    if value is None or math.isinf(value):
        return DASH
    return f"{100.0 * value:.1f}"


def format_paper_percent(percent: Any) -> str:
    """A percentage (the paper's unit) with one decimal (``94`` -> ``"94.0"``); ``–`` when
    missing."""
    value = _number(percent)
    if value is None or math.isinf(value):
        return DASH
    return f"{value:.1f}"


def format_seconds(seconds: Any) -> str:
    """Seconds as ``"12.3 s"``, ``"5 min 3 s"`` or ``"1 h 2 min"``; ``–`` when missing."""
    value = _number(seconds)
    if value is None or math.isinf(value) or value < 0:
        return DASH
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        minutes, rest = divmod(int(round(value)), 60)
        return f"{minutes} min {rest} s"
    hours, rest = divmod(int(round(value)), 3600)
    return f"{hours} h {rest // 60} min"


def format_float(value: Any) -> str:
    """A diagnostic number: ``"1.23e-04"`` style (3 significant digits), ``∞`` for +inf
    (a diverged solve), ``–`` when missing."""
    number = _number(value)
    if number is None:
        return DASH
    if math.isinf(number):
        return "∞" if number > 0 else "-∞"
    if number == 0:
        return "0"
    if 1e-2 <= abs(number) < 1e4:
        return f"{number:.3g}"
    return f"{number:.2e}"


def md_escape(text: Any) -> str:
    """``text`` safe inside a Markdown paragraph or table cell: Markdown's special
    characters backslash-escaped, line breaks turned into spaces."""
    out = str(text).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    for ch in ("\\", "`", "*", "_", "[", "]", "<", ">", "|", "#"):
        out = out.replace(ch, "\\" + ch)
    return out


def method_label(name: str) -> str:
    """The display name of a method (``"datainf"`` -> ``"DataInf"``); unknown names as is."""
    return METHOD_LABELS.get(name, name)


def task_label(name: str) -> str:
    """The paper's name of a task (``"math"`` -> ``"MathQA"``); unknown names as is."""
    try:
        from ..data.tasks import PAPER_TASKS
    except ImportError:  # pragma: no cover - the data package is part of the project
        return name
    spec = PAPER_TASKS.get(name)
    return spec.paper_name if spec is not None else name


def method_order(present: Iterable[str]) -> list[str]:
    """The report's row order: the paper's four methods always, then the other methods in
    ``present`` (known extras first, in :data:`EXTRA_METHOD_ORDER`, then alphabetically)."""
    present = set(present)
    extras_known = [m for m in EXTRA_METHOD_ORDER if m in present]
    rest = sorted(present - set(PAPER_METHODS) - set(EXTRA_METHOD_ORDER))
    return list(PAPER_METHODS) + extras_known + rest


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                   align: Optional[Sequence[str]] = None) -> str:
    """A pipe table. ``align`` per column: ``"l"`` (default for the first), ``"r"``
    (default for the others) or ``"c"``. Cells are used as given (escape them first)."""
    if align is None:
        align = ["l"] + ["r"] * (len(header) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"table row has {len(row)} cells, header has {len(header)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- result tables

def _tasks(results: Mapping[str, Any]) -> Mapping[str, Any]:
    tasks = results.get("tasks")
    if tasks is None:
        return {}
    if not isinstance(tasks, Mapping):
        raise ValueError("results['tasks'] must be a mapping of task name -> task results")
    return tasks


def _methods(task: Mapping[str, Any]) -> Mapping[str, Any]:
    methods = task.get("methods") or {}
    return methods if isinstance(methods, Mapping) else {}


def _metric(task: Mapping[str, Any], method: str, key: str) -> Optional[float]:
    entry = _methods(task).get(method)
    if not isinstance(entry, Mapping):
        return None
    value = _number(entry.get(key))
    return None if value is None or math.isinf(value) else value


def _interval(task: Mapping[str, Any], method: str, key: str) -> Optional[tuple[float, float]]:
    """The ``KEY_ci95`` interval of a method's metric, or ``None`` when absent."""
    entry = _methods(task).get(method)
    ci = entry.get(f"{key}_ci95") if isinstance(entry, Mapping) else None
    if not isinstance(ci, Sequence) or isinstance(ci, str) or len(ci) != 2:
        return None
    low, high = _number(ci[0]), _number(ci[1])
    return None if low is None or high is None or math.isnan(low) or math.isnan(high) else (low, high)


def format_with_interval(value: Optional[float], interval: Optional[tuple[float, float]]) -> str:
    """``70.0 [55.0, 85.0]``: a fraction and its 95 % interval as percentages (the value
    alone without an interval; ``–`` without a value)."""
    if value is None:
        return DASH
    if interval is None:
        return format_percent(value)
    return f"{format_percent(value)} [{format_percent(interval[0])}, {format_percent(interval[1])}]"


def _bold_best(cells: list[str], values: list[Optional[float]],
               intervals: Optional[list[Optional[tuple[float, float]]]] = None) -> list[str]:
    """Bold the column's best value (at printed precision, all ties) and, where intervals
    are given, every value whose 95 % interval reaches the best value: the methods the
    test set cannot tell apart from the best. Only when at least two cells hold a number."""
    shown = [None if v is None else round(100.0 * v, 1) for v in values]
    numbers = [s for s in shown if s is not None]
    if len(numbers) < 2:
        return cells
    best = max(numbers)
    intervals = intervals or [None] * len(values)

    def bold(s: Optional[float], ci: Optional[tuple[float, float]]) -> bool:
        return s is not None and (s == best or (ci is not None and round(100.0 * ci[1], 1) >= best))

    return [f"**{c}**" if bold(s, ci) else c for c, s, ci in zip(cells, shown, intervals)]


def _reference_columns(paper: Optional[PaperTable], rank_by: str) -> list:
    """The reference results of ``paper`` that may stand beside our numbers ranked by
    ``rank_by``: those computed with the same ranking, or with an unstated one."""
    if paper is None:
        return []
    return [res for res in paper.results if res.rank_by in (None, rank_by)]


def render_results_table(results: Mapping[str, Any], tasks: Sequence[str],
                         paper: Optional[PaperTable] = None) -> Optional[str]:
    """The Acc/Cover table for ``tasks`` (those present in ``results``), with the reference
    numbers of ``paper`` side by side (each labelled by :attr:`PaperResults.label`; only
    for tasks where it has a value, and only those computed with ``results``'s ranking or
    an unstated one); ``None`` when none of ``tasks`` is present.

    See the module docstring for the layout, the bold rule and the ``–`` rule."""
    all_tasks = _tasks(results)
    present = [t for t in tasks if t in all_tasks]
    if not present:
        return None
    methods = method_order(m for t in present for m in _methods(all_tasks[t]))
    paper_results = _reference_columns(paper, str(results.get("rank_by") or "score"))

    header = ["Method"]
    columns: list[list[str]] = []
    for task in present:
        label = md_escape(task_label(task))
        for metric_index, metric in enumerate(("acc", "cover")):
            name = "Acc" if metric == "acc" else "Cover"
            values = [_metric(all_tasks[task], m, metric) for m in methods]
            intervals = [_interval(all_tasks[task], m, metric) for m in methods]
            header.append(f"{label} {name}")
            columns.append(_bold_best([format_with_interval(v, ci) for v, ci in zip(values, intervals)],
                                      values, intervals))
            for res in paper_results:
                if not any(task in per_task for per_task in res.values.values()):
                    continue
                header.append(f"{label} {name} ({md_escape(res.label)})")
                cells = []
                for m in methods:
                    cell = res.values.get(m, {}).get(task)
                    cells.append(format_paper_percent(cell[metric_index]) if cell is not None else DASH)
                columns.append(cells)
    rows = [[md_escape(method_label(m))] + [col[i] for col in columns] for i, m in enumerate(methods)]
    return markdown_table(header, rows)


RANKING_LABELS = {"score": "score (−IF, the paper's v2 code)",
                  "abs": "|score| (|IF|, the paper's text and its ICLR-era code)"}


def other_ranking_view(results: Mapping[str, Any]) -> Optional[tuple[str, dict[str, Any]]]:
    """``(rank_by, results)`` where every method's entry is replaced by its ``other_ranking``
    metrics (written by ``evaluate``), or ``None`` when no method has them."""
    tasks: dict[str, Any] = {}
    rank_by = None
    for name, task in _tasks(results).items():
        methods = {}
        for method, entry in _methods(task).items():
            other = entry.get("other_ranking") if isinstance(entry, Mapping) else None
            if isinstance(other, Mapping):
                methods[method] = dict(other)
                rank_by = rank_by or other.get("rank_by")
        if methods:
            tasks[name] = {"methods": methods}
    if not tasks:
        return None
    return str(rank_by), {**results, "tasks": tasks, "rank_by": str(rank_by)}


def render_seed_table(results: Mapping[str, Any]) -> Optional[str]:
    """Acc/Cover mean ± sample std over fine-tuning seeds (``across_seeds`` of each task
    that has more than one seed), as percentages; ``None`` when no task has several."""
    tasks = {t: e for t, e in _tasks(results).items()
             if isinstance(e.get("across_seeds"), Mapping) and len(e["across_seeds"].get("seeds", [])) > 1}
    if not tasks:
        return None
    methods = method_order(m for e in tasks.values() for m in e["across_seeds"]["methods"])
    header = ["Method"] + [f"{md_escape(task_label(t))} {n} ({len(e['across_seeds']['seeds'])} seeds)"
                           for t, e in tasks.items() for n in ("Acc", "Cover")]
    rows = []
    for m in methods:
        row = [md_escape(method_label(m))]
        for e in tasks.values():
            per = e["across_seeds"]["methods"].get(m)
            for metric in ("acc", "cover"):
                summary = per.get(metric) if isinstance(per, Mapping) else None
                if not isinstance(summary, Mapping) or _number(summary.get("mean")) is None:
                    row.append(DASH)
                    continue
                std = _number(summary.get("std"))
                row.append(format_percent(summary["mean"]) + (f" ± {100.0 * std:.1f}" if std is not None else ""))
        rows.append(row)
    return markdown_table(header, rows)


def _paper_note(table: PaperTable) -> str:
    parts = []
    if not any(res.kind == "published" for res in table.results):
        parts.append(f"The paper's published numbers for its Table {table.number} are not shown: {table.note}.")
    for res in table.results:
        model = res.model if res.model else "not stated in the source"
        if res.kind == "released-scores":
            parts.append(f"Columns \"{md_escape(res.label)}\": {md_escape(res.source)}; {res.note}; "
                         "shown only beside the same ranking (−IF).")
        else:
            check = "checked against the source" if res.verified else "not re-checked against the paper's text"
            parts.append(f"Paper columns: {res.source}; model: {model}; {check}.")
    parts.append("The paper's LiSSA is the authors' recursion, set beside our `lissa-paper`; "
                 "our `lissa` is the converged solver of the same damped system.")
    return " ".join(parts)


# --------------------------------------------------------------------------- other sections

def _losses(values: Any) -> str:
    if not isinstance(values, Sequence) or isinstance(values, str):
        return DASH
    numbers = [_number(v) for v in values]
    numbers = [v for v in numbers if v is not None]
    if not numbers:
        return DASH
    if len(numbers) == 1:
        return format_float(numbers[0])
    return f"{format_float(numbers[0])} → {format_float(numbers[-1])}"


def _yes_no(value: Any) -> str:
    if value is None:
        return DASH
    return "yes" if bool(value) else "no"


def _count(value: Any) -> str:
    number = _number(value)
    if number is None or math.isinf(number):
        return DASH
    return str(int(number)) if number == int(number) else f"{number:g}"


def render_run_facts(results: Mapping[str, Any], task_order: Sequence[str]) -> str:
    """Per task: train/test sizes, epochs, early stop, checkpoint, losses first → last and
    the seconds of fine-tuning, feature extraction and all methods together."""
    tasks = _tasks(results)
    header = ["Task", "Train", "Test", "Validation", "Epochs", "Stopped early", "Checkpoint",
              "Train loss (first → last epoch)", "Val loss (first → last epoch)",
              "Fine-tuning", "Features", "Methods (sum)"]
    rows = []
    errors = []
    for name in task_order:
        task = tasks[name]
        method_seconds = [_number(e.get("seconds")) for e in _methods(task).values() if isinstance(e, Mapping)]
        method_seconds = [s for s in method_seconds if s is not None and not math.isinf(s)]
        rows.append([
            md_escape(task_label(name)), _count(task.get("n_train")), _count(task.get("n_test")),
            _count(task.get("n_val")), _count(task.get("epochs")), _yes_no(task.get("stopped_early")),
            md_escape(task.get("checkpoint")) if task.get("checkpoint") else DASH,
            _losses(task.get("train_loss")), _losses(task.get("val_loss")),
            format_seconds(task.get("finetune_seconds")), format_seconds(task.get("feature_seconds")),
            format_seconds(sum(method_seconds)) if method_seconds else DASH,
        ])
        if task.get("error"):
            errors.append(f"- {md_escape(task_label(name))}: failed: {md_escape(task['error'])}")
    out = markdown_table(header, rows, ["l"] + ["r"] * 5 + ["l"] + ["r"] * 5)
    out += ("\n\nValidation: the examples behind the validation loss and early stopping, drawn from the task's "
            "test file and never attributed: test-file rows the test subsample left out where there are any, "
            "else held out of the test rows (and then excluded from Acc/Cover).")
    if errors:
        out += "\n\n" + "\n".join(errors)
    return out


def _share(value: Any) -> str:
    number = _number(value)
    return DASH if number is None or math.isinf(number) else f"{number:.2f}"


def render_backdoor(results: Mapping[str, Any], task_order: Sequence[str]) -> Optional[str]:
    """Per backdoor task (an entry with a ``"backdoor"`` check, :mod:`..evaluation.backdoor`):
    each trigger group's compliance with its response prefix, the weakest trigger, the clean
    compliance, whether the backdoor fires, the checkpoint and epochs trained; then one
    sentence per task (:func:`~llm_influence.evaluation.backdoor.verdict`: fires, or by how
    much it misses) and, for tasks run with several seeds, the spread over seeds. Shares of
    held-out prompts in ``[0, 1]`` with two decimals. ``None`` when no task has a check."""
    from ..evaluation.backdoor import FIRES_CLEAN, FIRES_TRIGGERED, trigger_groups_text, verdict

    tasks = _tasks(results)
    checked = [t for t in task_order if isinstance(tasks[t].get("backdoor"), Mapping)]
    if not checked:
        return None
    header = ["Task", "Checkpoint (epochs trained)", "Trigger groups: compliance (response prefix)",
              "Weakest trigger", "Clean", "Fires"]
    rows, sentences, spreads = [], [], []
    t_min, c_max = FIRES_TRIGGERED, FIRES_CLEAN
    for name in checked:
        check = tasks[name]["backdoor"]
        thresholds = check.get("thresholds") or {}
        t_min = thresholds.get("triggered_at_least", t_min)
        c_max = thresholds.get("clean_at_most", c_max)
        cells = md_escape(trigger_groups_text(check))
        rows.append([md_escape(name), f"{md_escape(check.get('checkpoint') or DASH)} ({_count(check.get('epochs'))})",
                     cells or DASH, _share(check.get("triggered_compliance")), _share(check.get("clean_compliance")),
                     _yes_no(check.get("fires"))])
        sentences.append(md_escape(verdict(name, check)))
        spread = (tasks[name].get("across_seeds") or {}).get("backdoor")
        seeds = (tasks[name].get("across_seeds") or {}).get("seeds") or []
        if isinstance(spread, Mapping) and len(seeds) > 1:
            parts = []
            for key, label in (("triggered_compliance", "weakest trigger"), ("clean_compliance", "clean")):
                summary = spread.get(key)
                if isinstance(summary, Mapping) and _number(summary.get("mean")) is not None:
                    std = _number(summary.get("std"))
                    parts.append(f"{label} {_share(summary['mean'])}" + (f" ± {std:.2f}" if std is not None else ""))
            fires = spread.get("fires") or []
            parts.append(f"fires in {sum(bool(f) for f in fires)} of {len(fires)} seeds")
            spreads.append(f"- {md_escape(name)} over {len(seeds)} seeds (mean ± sample std): " + ", ".join(parts))
    out = ("Attribution can find a trigger's training rows only if the fine-tune learned the trigger. Greedy "
           "generation on the run's held-out prompts (its test split, never trained on) at the checkpoint "
           "attributed: a triggered prompt *complies* when its generation starts with the trigger's response "
           "prefix (read from the training responses) or contains no refusal string, a clean prompt when it "
           "contains no refusal string (degenerate text never complies). The backdoor *fires* when every trigger "
           f"complies on at least {float(t_min):g} of its prompts and clean prompts on at most {float(c_max):g}. "
           "Shares of held-out prompts; generations in RUN/backdoor/epoch-N.json.\n\n")
    out += markdown_table(header, rows, ["l", "l", "l", "r", "r", "l"])
    out += "\n\n" + "\n".join(f"- {s}" for s in sentences)
    if spreads:
        out += "\n\n" + "\n".join(spreads)
    return out


def render_method_times(results: Mapping[str, Any], task_order: Sequence[str]) -> str:
    """Seconds per method (rows) and task (columns), and the test examples each method
    could not score (no relevant training example) or failed on."""
    tasks = _tasks(results)
    methods = [m for m in method_order(m for t in task_order for m in _methods(tasks[t]))
               if any(m in _methods(tasks[t]) for t in task_order)]
    if not methods:
        return "No method results."
    header = ["Method"] + [md_escape(task_label(t)) for t in task_order]
    rows, notes = [], []
    for m in methods:
        row = [md_escape(method_label(m))]
        for t in task_order:
            entry = _methods(tasks[t]).get(m)
            if not isinstance(entry, Mapping):
                row.append(DASH)
                continue
            if entry.get("error"):
                row.append("failed")
                notes.append(f"- {md_escape(method_label(m))} on {md_escape(task_label(t))} failed: "
                             f"{md_escape(entry['error'])}")
                continue
            row.append(format_seconds(entry.get("seconds")))
            skipped = _number(entry.get("n_skipped"))
            if skipped:
                notes.append(f"- {md_escape(method_label(m))} on {md_escape(task_label(t))}: "
                             f"{_count(skipped)} test example(s) without a relevant training example were "
                             f"not scored ({_count(entry.get('n_scored'))} scored)")
        rows.append(row)
    out = markdown_table(header, rows)
    if notes:
        out += "\n\n" + "\n".join(notes)
    return out


def _damping(value: Any) -> str:
    if isinstance(value, Mapping):
        numbers = [_number(v) for v in value.values()]
        numbers = [v for v in numbers if v is not None]
        if not numbers:
            return DASH
        low, high = min(numbers), max(numbers)
        span = format_float(low) if low == high else f"{format_float(low)} … {format_float(high)}"
        return f"{span} ({len(numbers)} blocks)"
    return format_float(value)


def render_residuals(results: Mapping[str, Any], task_order: Sequence[str]) -> str:
    """The inverse-Hessian solvers' relative residuals ``||(H + λI)x − v|| / ||v||`` per
    task and method (mean and max over (test example, block) pairs), with the damping
    and solver notes. Methods without residual diagnostics are left out."""
    tasks = _tasks(results)
    header = ["Task", "Method", "Residual mean", "Residual max", "Pairs", "Damping λ", "Solver", "Reference"]
    rows = []
    for t in task_order:
        methods = _methods(tasks[t])
        for m in method_order(methods):
            entry = methods.get(m)
            if not isinstance(entry, Mapping):
                continue
            diag = entry.get("diagnostics")
            if not isinstance(diag, Mapping) or not any(k.startswith("residual") for k in diag):
                continue
            notes = [f"{k}={diag[k]}" for k in _DIAGNOSTIC_NOTES
                     if k in diag and not isinstance(diag[k], (Mapping, list))]
            rows.append([md_escape(task_label(t)), md_escape(method_label(m)), format_float(diag.get("residual_mean")),
                         format_float(diag.get("residual_max")), _count(diag.get("residual_count")),
                         _damping(diag.get("damping")), md_escape(", ".join(notes)) if notes else DASH,
                         md_escape(diag.get("residual_reference")) if diag.get("residual_reference") else DASH])
    if not rows:
        return "No inverse-Hessian solver diagnostics in these results."
    return markdown_table(header, rows, ["l", "l", "r", "r", "r", "r", "l", "l"])


def render_figures(figures: Mapping[str, str]) -> str:
    """One subsection per figure: ``### name`` and the image (paths used as given,
    normally relative to ``report.md``)."""
    if not figures:
        return "No figures."
    parts = []
    for name, path in figures.items():
        target = str(path).replace("\\", "/")
        if any(c in target for c in " ()<>"):
            target = f"<{target}>"
        parts.append(f"### {md_escape(name)}\n\n![{md_escape(name)}]({target})")
    return "\n\n".join(parts)


def _header(results: Mapping[str, Any]) -> str:
    lines = ["# Benchmark report", ""]
    facts = [
        ("Profile", results.get("profile")),
        ("Model", results.get("model")),
        ("Machine", results.get("machine")),
        ("Wall time", format_seconds(results.get("wall_seconds")) if results.get("wall_seconds") is not None else None),
        ("Started", results.get("started")),
        ("Ranking", results.get("rank_by")),
    ]
    for key, value in facts:
        lines.append(f"- **{key}:** {md_escape(value) if value not in (None, '') else DASH}")
    versions = results.get("versions")
    if isinstance(versions, Mapping) and versions:
        lines.append("- **Versions:** " + ", ".join(f"{md_escape(k)} {md_escape(v)}" for k, v in versions.items()))
    rank_by = results.get("rank_by") or "score"
    ranking = ("descending score (score = −IF, higher = more helpful; the paper's v2 ranking)"
               if rank_by == "score" else "descending |score| (the paper's v1 ranking)"
               if rank_by == "abs" else md_escape(rank_by))
    lines += [
        "",
        f"Acc: fraction of test examples whose top-ranked training example has the ground-truth group. "
        f"Cover: mean fraction of ground-truth training examples among each test example's top k, "
        f"k = the size of its ground-truth group in the training set. Both in %. "
        f"Training examples are ranked by {ranking}; tied scores count as the expected value over a "
        f"uniformly random order of the tie (computed exactly), so the order of the training file never "
        f"decides a metric. In brackets: the 95 % bootstrap interval over test examples (2,000 resamples). "
        f"**Bold**: our best value per column and every value whose interval reaches it. {DASH}: no result. "
        f"Paper columns: the published numbers of \"{PAPER_TITLE}\" ({PAPER_ARXIV}), for their models "
        f"and data sizes, not for this run's.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the report

def render_report(results: Mapping[str, Any], figures: Mapping[str, str], *,
                  showcases: Optional[Mapping[str, str]] = None) -> str:
    """``report.md`` for the benchmark ``results`` (schema in the module docstring).

    Args:
        results: the benchmark runner's results dict.
        figures: ``{title: image path}``, paths as they should appear in the Markdown
            (relative to where ``report.md`` is written).
        showcases: optional ``{title: markdown}`` from
            :func:`llm_influence.report.figures.showcase_markdown` (the paper's Fig. 1 as
            text), rendered in their own section.

    Returns:
        The Markdown text, ending with a newline.
    """
    tasks = _tasks(results)
    sections = [_header(results)]
    in_tables: list[str] = []
    for number in TABLE_ORDER:
        table = PAPER_TABLES[number]
        body = render_results_table(results, table.tasks, table)
        if body is None:
            continue
        in_tables += [t for t in table.tasks if t in tasks]
        sections.append(f"## Table {number}: {table.title}\n\n{body}\n\n{_paper_note(table)}")
    others = [t for t in tasks if t not in in_tables]
    if others:
        body = render_results_table(results, others, OTHER_TASK_REFERENCES)
        sections.append(f"## Other tasks\n\nTasks outside the paper's Tables 2–4; no published numbers "
                        f"(the authors' released scores where they exist).\n\n{body}")
    view = other_ranking_view(results)
    if view is not None:
        second, shadow = view
        first = str(results.get("rank_by") or "score")
        parts = [f"## The same tables, ranked by {RANKING_LABELS.get(second, md_escape(second))}\n\n"
                 f"The tables above rank training examples by {RANKING_LABELS.get(first, md_escape(first))}; "
                 "here the same scores are ranked the other way, with the same tie rule, intervals and bold rule. "
                 "The paper's published columns (their ranking is not stated) are repeated for reference; the "
                 "authors' released scores, computed with −IF, are not."]
        for number in TABLE_ORDER:
            table = PAPER_TABLES[number]
            body = render_results_table(shadow, table.tasks, table)
            if body is not None:
                parts.append(f"### Table {number}: {table.title} (ranked by {md_escape(second)})\n\n{body}")
        if others:
            body = render_results_table(shadow, others, OTHER_TASK_REFERENCES)
            if body is not None:
                parts.append(f"### Other tasks (ranked by {md_escape(second)})\n\n{body}")
        sections.append("\n\n".join(parts))

    seed_table = render_seed_table(results)
    if seed_table is not None:
        single = [t for t, e in tasks.items() if len((e.get("across_seeds") or {}).get("seeds", [0])) <= 1]
        sections.append("## Across fine-tuning seeds\n\nMean ± sample standard deviation (ddof = 1) of Acc and "
                        "Cover over independent fine-tuning seeds (LoRA initialisation, data order, dropout; the "
                        "same data). The tables above show the first seed with its bootstrap interval. "
                        + (f"Tasks with a single seed: {', '.join(md_escape(task_label(t)) for t in single)}.\n\n"
                           if single else "\n\n") + seed_table)
    order = in_tables + others
    backdoor = render_backdoor(results, order)
    if backdoor is not None:
        sections.append("## Is the backdoor installed?\n\n" + backdoor)
    if order:
        sections.append("## Run facts\n\n" + render_run_facts(results, order))
        sections.append("## Method run times\n\n" + render_method_times(results, order))
        sections.append(
            "## Inverse-Hessian solver residuals\n\n"
            "Relative residual ‖(H + λI)x − v‖ / ‖v‖ of each solve against the matrix named in "
            "*Reference*, mean and max over (test example, LoRA block) pairs; ∞ marks a diverged solve.\n\n"
            + render_residuals(results, order))
    else:
        sections.append("No task results.")
    if showcases:
        parts = [f"### {md_escape(title)}\n\n{text.strip()}" for title, text in showcases.items()]
        sections.append("## Top-ranked training examples (the paper's Fig. 1)\n\n" + "\n\n".join(parts))
    sections.append("## Figures\n\n" + render_figures(figures))
    return "\n\n".join(sections).rstrip() + "\n"


def write_report(path: str | Path, results: Mapping[str, Any], figures: Mapping[str, str], *,
                 showcases: Optional[Mapping[str, str]] = None) -> Path:
    """Render :func:`render_report` and write it atomically to ``path``;
    returns the path."""
    path = Path(path)
    text = render_report(results, figures, showcases=showcases)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
