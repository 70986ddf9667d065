"""Study ``paper-gap``: which of our settings accounts for the gap between our Acc/Cover and
the paper's? One factor at a time, from our defaults toward the paper's setting (issue 14).

For each task (default ``mixed-small`` and ``backdoor-1``) the **baseline** is the profile's
own run (the one ``reproduce`` fine-tunes and this study reuses, option ``runs``), scored at
its last checkpoint with DataInf, LiSSA, GradSim, RepSim and Exact (``datainf``, ``lissa``,
``gradsim``, ``repsim``, ``exact``; attribute-stage defaults, damping ratio 0.1), ranked by
score (−IF, descending). Each factor then changes exactly one thing:

* **(a)** LiSSA → ``lissa-paper``, the authors' recursion (scale 1000, their damping sign,
  10 steps, r_T undivided): same run and gradients, another method; only the LiSSA column.
* **(b)** ranking −IF → |IF| (``rank_by="abs"``, the paper's older ranking): the baseline's
  own score matrices ranked by absolute value; every method.
* **(c)** loss on the response → on every token, padding included (``loss_on="all-padded"``,
  the authors' v2 code: left-padded with EOS to ``max_length``, labels = input ids; see
  :mod:`llm_influence.models.formatting` for what the pad positions contribute): a new
  fine-tune and extraction; every method.
* **(d)** max length → the paper's 128 tokens (option ``paper_max_length``): a new fine-tune
  and extraction (training and gradients see the longer responses); every method.
* **(e)** training length → the paper's epochs (option ``paper_epochs``: 15 under ``cpu``
  and ``paper``, the authors' v1 scripts for backdoor and mixed; 4 under ``smoke``), read
  against the profile's own epochs (never hard-coded). Early stopping is off in this run
  by default (``long_early_stopping=false``): with it the run could end before the paper's
  length, and the authors' HF ``Trainer`` runs had none. A new fine-tune and extraction;
  every method. The learning rate's linear decay stretches over the longer run.
* **(f)** RepSim's hidden state: the last layer → a middle one (option ``rep_layer``,
  default ``middle`` = index ``L // 2`` of the ``L + 1`` hidden states, i.e. after half of
  the ``L`` decoder layers; an integer picks another index). The same run, other
  representations, computed in memory (the run's cached last-layer representations are left
  as they are). Only the RepSim column. The authors' ``repsim.py`` reads the last layer, as
  our baseline does, so (f) is a sensitivity check rather than a step toward the paper.

A factor whose setting equals the baseline's (e.g. (d) under a profile that already uses 128
tokens) is reported as not applicable, with the reason, and nothing is run for it.

**Table layout.** Per task one Acc table and one Cover table: rows = ``ours (baseline)``,
(a)-(f), then reference rows (the paper's published Table 4 for ``backdoor-1``,
:func:`~llm_influence.report.paper_numbers.paper_value`; the authors' released-score
Acc/Cover for ``mixed-small``, labelled as such); columns = the methods. A factor row shows
only the columns the factor changes, as ``value [95 % interval] (Δ vs baseline)``, with
``†`` when the factor's and the baseline's intervals do not overlap; a column the factor does
not change shows ``=`` (its numbers are the baseline's, not recomputed). The paper's LiSSA
(the authors' recursion) sits in the LiSSA column of the reference row; reference numbers are
converted from the paper's percentages to fractions.

**What moves.** For every applicable (factor, method, metric) the JSON records the delta
(factor − baseline), whether the two 95 % bootstrap intervals overlap, and a paired 95 %
bootstrap interval of the delta (per-test-example differences resampled; every factor run
attributes the same test examples, which is checked). The Markdown states per task and
factor which method's Acc or Cover moved *beyond the intervals* = the two intervals are
disjoint (a conservative rule; the paired interval is given beside it), computed from the
numbers, never written by hand.

Acc and Cover are in [0, 1] against the task's ground truth (same group), ties as expected
values, intervals 95 % percentile bootstrap over test examples (2,000 seeded resamples).

**Cost under ``cpu``** (measured on 2 cores, ``make reproduce``'s pass: 2,058 s in all):
the baseline reuses ``reproduce``'s runs and feature caches (seconds); (a), (b), (f) cost
seconds (f: ~17 s of representations); (c)'s fine-tunes took 112 s (mixed-small) and 239 s
(backdoor-1) plus 36 s and 66 s of extraction; (d) and (e) fine-tune anew as well, the
15-epoch runs of (e) being most of the study; each backdoor check ~15 s of generation.

The helpers shared with the other LLM studies are in :mod:`.llm_runs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .. import distributed
from ..errors import UserError
from ..evaluation.backdoor import is_backdoor_task, result_entry, run_backdoor_check
from ..evaluation.metrics import AttributionMetrics, evaluate_scores, relevance_from_task
from ..evaluation.run_metrics import diagnostics_summary
from ..evaluation.uncertainty import bootstrap_ci
from ..features.extract import extract_features
from ..features.gradients import compute_features
from ..features.types import Features
from ..methods import available_methods, make_method
from ..progress import log
from ..report.paper_numbers import paper_value, released_for
from ..rundir import RunDir
from .base import (StudyResult, fmt, markdown_table, new_figure, register_study, resolve_options, save_figure,
                   with_interval)
from .llm_runs import LLM_STUDY_DEFAULTS, TaskRun, epoch_log, method_spec, profile_task_run, run_tasks

NAME = "paper-gap"
TASKS = ("mixed-small", "backdoor-1")
METHODS = ("datainf", "lissa", "gradsim", "repsim", "exact")
LABELS = {"datainf": "DataInf", "lissa": "LiSSA", "gradsim": "GradSim", "repsim": "RepSim", "exact": "Exact"}
METRICS = ("acc", "cover")
BASELINE = "baseline"
PAPER_TABLE = 4  # the paper's table with published numbers for these tasks (backdoor-1)


@dataclass(frozen=True)
class Factor:
    """One change toward the paper's setting.

    ``key``: ``"a"``..``"f"``. ``title``: what changes. ``kind``: ``"method"`` (another
    method on the same features), ``"ranking"`` (the same scores ranked otherwise),
    ``"finetune"`` (a new fine-tune with a training override) or ``"representation"``
    (RepSim on another hidden state of the same run). ``columns``: the methods whose numbers
    the factor changes (``None`` = every method).
    """

    key: str
    title: str
    kind: str
    columns: Optional[tuple[str, ...]] = None

    def applies_to(self, method: str) -> bool:
        return self.columns is None or method in self.columns


FACTORS: tuple[Factor, ...] = (
    Factor("a", "LiSSA → lissa-paper (the authors' recursion)", "method", ("lissa",)),
    Factor("b", "ranking −IF → |IF|", "ranking"),
    Factor("c", "loss on response → on all tokens", "finetune"),
    Factor("d", "max length → the paper's", "finetune"),
    Factor("e", "epochs → the paper's", "finetune"),
    Factor("f", "RepSim last layer → a middle layer", "representation", ("repsim",)),
)
FACTOR_BY_KEY = {f.key: f for f in FACTORS}


# =======================================================================================
# options
# =======================================================================================


def _defaults(profile: str) -> dict[str, Any]:
    shared = {k: v for k, v in LLM_STUDY_DEFAULTS.items() if k != "rank_by"}  # the ranking is factor (b)
    return {
        "tasks": TASKS,
        "methods": METHODS,
        "factors": tuple(f.key for f in FACTORS),
        "paper_epochs": 4 if profile == "smoke" else 15,
        "paper_max_length": 128,
        "long_early_stopping": False,
        "rep_layer": "middle",
        **shared,
    }


def _check_options(opts: dict) -> None:
    """Reject unknown factors/methods, methods needing other features, bad sizes."""
    unknown = sorted(set(opts["factors"]) - set(FACTOR_BY_KEY))
    if unknown or not opts["factors"]:
        raise UserError(f"study {NAME!r}: factors must be among {', '.join(FACTOR_BY_KEY)}; got {opts['factors']!r}")
    for m in opts["methods"]:
        if m not in available_methods():
            raise UserError(f"study {NAME!r}: unknown method {m!r}")
        if set(make_method(m).required_features()) - {"grads", "reps"}:
            raise UserError(f"study {NAME!r}: method {m!r} needs features other than gradients and representations")
    if not opts["methods"] or not opts["tasks"]:
        raise UserError(f"study {NAME!r}: tasks and methods must not be empty")
    if int(opts["paper_epochs"]) < 1 or int(opts["paper_max_length"]) < 8:
        raise UserError(f"study {NAME!r}: paper_epochs must be >= 1 and paper_max_length >= 8")
    if str(opts["rep_layer"]) != "middle":
        try:
            int(opts["rep_layer"])
        except ValueError:
            raise UserError(f"study {NAME!r}: rep_layer must be 'middle' or an integer, "
                            f"got {opts['rep_layer']!r}") from None


def resolve_rep_layer(option: str | int, n_decoder_layers: int) -> int:
    """The ``hidden_states`` index for factor (f): ``"middle"`` = ``n_decoder_layers // 2``
    (index 0 = embeddings, index i = output of decoder layer i-1), else ``int(option)``."""
    return n_decoder_layers // 2 if str(option) == "middle" else int(option)


# =======================================================================================
# scoring and comparing
# =======================================================================================


@dataclass
class Scored:
    """One method's score matrix on one run: ``scores`` ``[n_test, n_train]`` float64, higher =
    more helpful; ``seconds`` fit + score; ``diagnostics`` the solver's scalar facts."""

    method: str
    scores: torch.Tensor
    seconds: float
    diagnostics: dict[str, Any]


def fit_and_score(method: str, kwargs: dict[str, Any], train: Features, test: Features) -> Scored:
    """Fit ``method`` on the training features and score the test features (in memory)."""
    m = make_method(method, **kwargs)
    t0 = time.perf_counter()
    m.fit(train)
    scores = m.score(test)
    return Scored(method, scores.double(), time.perf_counter() - t0, diagnostics_summary(m.diagnostics))


def cell(scored: Scored, relevant: torch.Tensor, rank_by: str) -> tuple[dict[str, Any], AttributionMetrics]:
    """``(JSON cell, metrics)``: Acc/Cover with intervals, per-test hits and covers, seconds."""
    m = evaluate_scores(scored.scores, relevant, rank_by=rank_by)
    entry = {"applies": True, "method": scored.method, "rank_by": rank_by, "acc": m.acc, "cover": m.cover,
             "acc_ci95": list(m.acc_ci95), "cover_ci95": list(m.cover_ci95), "n_scored": m.n_scored,
             "n_skipped": m.n_skipped, "per_test_acc": m.per_test_hit.tolist(),
             "per_test_cover": m.per_test_cover.tolist(), "seconds": scored.seconds,
             "diagnostics": scored.diagnostics}
    return entry, m


def intervals_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether the closed intervals ``[a0, a1]`` and ``[b0, b1]`` share a point."""
    return not (a[0] > b[1] or b[0] > a[1])


def compare(base: dict[str, Any], new: dict[str, Any], paired: bool) -> dict[str, Any]:
    """Per metric: ``delta_M`` = new − base, ``overlap_M`` (the two 95 % intervals share a
    point), ``moved_M`` = not overlap, and ``delta_M_ci95``: the paired bootstrap interval of
    the mean per-test difference (``None`` unless ``paired``: the same test examples in the
    same order)."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        overlap = intervals_overlap(base[f"{metric}_ci95"], new[f"{metric}_ci95"])
        out[f"delta_{metric}"] = new[metric] - base[metric]
        out[f"overlap_{metric}"] = overlap
        out[f"moved_{metric}"] = not overlap
        ci = None
        if paired:
            diff = (np.asarray(new[f"per_test_{metric}"], dtype=float)
                    - np.asarray(base[f"per_test_{metric}"], dtype=float))
            ci = list(bootstrap_ci(diff[np.isfinite(diff)]))
        out[f"delta_{metric}_ci95"] = ci
    return out


def not_applicable(reason: str) -> dict[str, Any]:
    """A cell the factor does not change: the baseline's numbers stand (``reason`` says why)."""
    return {"applies": False, "same_as": BASELINE, "reason": reason}


# =======================================================================================
# features
# =======================================================================================


def run_features(run: RunDir, checkpoint: str, need: set[str], batch_size: int) -> tuple[Features, Features, float]:
    """``(train, test, seconds)``: cached features of the run (extracted once when missing),
    exactly as :func:`~llm_influence.studies.llm_runs.score_checkpoint` reads them."""
    t0 = time.perf_counter()
    train = extract_features(run, checkpoint, "train", need=need, batch_size=batch_size)
    test = extract_features(run, checkpoint, "test", need=need, batch_size=batch_size)
    return train, test, time.perf_counter() - t0


def layer_representations(run: RunDir, checkpoint: str, layer_option: str | int, batch_size: int
                          ) -> tuple[Features, Features, int, int, float]:
    """RepSim inputs at another hidden state, computed in memory (the cache keeps the
    last-layer ones): ``(train, test, layer, n_decoder_layers, seconds)``, ``reps``
    ``[n, hidden]`` float32, last prompt token, model in eval mode as the extraction stage
    loads it (:func:`~llm_influence.features.extract.extract_features`)."""
    from ..training.load import load_finetuned

    t0 = time.perf_counter()
    model, formatter, _ = load_finetuned(run, checkpoint)
    model = model.to(device=distributed.current().device(), dtype=torch.float32)
    model.eval()
    n_layers = int(model.get_base_model().config.num_hidden_layers)
    layer = resolve_rep_layer(layer_option, n_layers)
    task = run.load_task()
    out = []
    for split, examples in (("train", task.train), ("test", task.test)):
        encoded = [formatter.encode(ex) for ex in examples]
        res = compute_features(model, encoded, formatter.tokenizer.pad_token_id, grads=False, reps=True,
                               rep_layer=layer, batch_size=batch_size,
                               description=f"{split} representations, hidden state {layer}")
        out.append(Features(ids=[ex.id for ex in examples], reps=res.reps.float()))
    del model
    return out[0], out[1], layer, n_layers, time.perf_counter() - t0


# =======================================================================================
# one task
# =======================================================================================


def _run_facts(tr: TaskRun, out_dir: Path, data_dir: Optional[Path]) -> dict[str, Any]:
    """The run's facts (path, reuse, sizes) plus its training settings and epochs trained;
    for a backdoor task also ``"backdoor"``: whether the backdoor fires at the scored (last)
    checkpoint (:func:`~llm_influence.evaluation.backdoor.run_backdoor_check`, greedy
    generation on the held-out prompts, reused from ``RUN/backdoor/`` when its key matches)."""
    train = tr.run.config()["finetune"]["train"]
    log_rows = epoch_log(tr.run)
    facts = {**tr.info(), "checkpoint": tr.run.resolve_checkpoints("last")[0],
             "epochs": train["epochs"], "max_length": train["max_length"], "loss_on": train["loss_on"],
             "early_stopping": train["early_stopping"], "epochs_trained": max(tr.run.epochs()),
             "final_train_loss": log_rows[-1]["train_loss"] if log_rows else None,
             "final_val_loss": log_rows[-1]["val_loss"] if log_rows else None}
    if is_backdoor_task(tr.task):
        record = run_backdoor_check(tr.run.path, "last", data_dir=data_dir)
        facts["backdoor"] = result_entry(record, relative_to=out_dir)
    return facts


def _score_run(tr: TaskRun, specs: list[tuple[str, str, dict]], opts: dict
               ) -> tuple[dict[str, Scored], float, list[str]]:
    """``({label: Scored}, features_seconds, test_ids)`` of ``specs`` at the run's last checkpoint."""
    checkpoint = tr.run.resolve_checkpoints("last")[0]
    need: set[str] = set()
    for _, name, kwargs in specs:
        need |= set(make_method(name, **kwargs).required_features())
    train, test, seconds = run_features(tr.run, checkpoint, need, int(opts["extract_batch_size"]))
    return {label: fit_and_score(name, kwargs, train, test) for label, name, kwargs in specs}, seconds, test.ids


def _row(key: str, title: str, setting: str, cells: dict[str, dict], run: Optional[dict],
         seconds: dict[str, float], skipped: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    """One table row: ``setting`` (short text of the change), ``cells`` ``{method: cell}``,
    ``run`` the facts of the run it fine-tuned (``None`` when it reuses the baseline run),
    ``seconds`` (fine-tune, features, scoring and their total), ``skipped`` (why the factor
    does not apply, else ``None``) and any ``extra`` facts."""
    return {"key": key, "title": title, "setting": setting, "run": run, "cells": cells,
            "seconds": {**seconds, "total": sum(seconds.values())}, "skipped": skipped, **extra}


def _finetune_override(factor: Factor, base_args: dict[str, Any], opts: dict) -> tuple[dict[str, Any], str]:
    """``(train override, setting text)`` of a fine-tune factor; an empty override when the
    baseline already has the paper's setting."""
    if factor.key == "c":
        target = {"loss_on": "all-padded"}
        text = f"loss on {base_args['loss_on']} → all tokens, padding included (all-padded)"
    elif factor.key == "d":
        target = {"max_length": int(opts["paper_max_length"])}
        text = f"max length {base_args['max_length']} → {target['max_length']} tokens"
    else:
        target = {"epochs": int(opts["paper_epochs"])}
        if not opts["long_early_stopping"]:
            target["early_stopping"] = False
        text = (f"epochs {base_args['epochs']} → {target['epochs']}"
                + ("" if opts["long_early_stopping"] else " (no early stopping)"))
    main = {"c": "loss_on", "d": "max_length", "e": "epochs"}[factor.key]
    if base_args[main] == target[main]:
        return {}, text
    return target, text


def _factor_cells(scored: dict[str, Scored], base_cells: dict[str, dict], methods: Sequence[str],
                  relevant: torch.Tensor, rank_by: str, paired: bool, factor: Factor) -> dict[str, dict]:
    """Cells of a factor row: the changed methods scored and compared, the others ``=``."""
    cells: dict[str, dict] = {}
    for m in methods:
        if not factor.applies_to(m) or m not in scored:
            cells[m] = not_applicable(f"factor ({factor.key}) does not change {m}")
            continue
        entry, _ = cell(scored[m], relevant, rank_by)
        cells[m] = {**entry, **compare(base_cells[m], entry, paired)}
    return cells


def run_task(task_name: str, profile: str, out_dir: Path, data_dir: Optional[Path], opts: dict) -> dict[str, Any]:
    """Every row of one task (module docstring); JSON-serialisable."""
    methods = list(opts["methods"])
    ratio = float(opts["damping_ratio"])
    factors = [FACTOR_BY_KEY[k] for k in opts["factors"]]
    runs = opts["runs"] or None
    base_tr = profile_task_run(NAME, task_name, profile, out_dir, data_dir, runs)
    base_facts = _run_facts(base_tr, out_dir, data_dir)
    relevant = relevance_from_task(base_tr.task)
    specs = [(m, *method_spec(m, ratio)) for m in methods]
    with_paper_lissa = "lissa" in methods and "a" in opts["factors"]
    if with_paper_lissa:
        specs.append(("lissa-paper", *method_spec("lissa-paper", ratio)))
    log(f"{NAME}: {task_name} baseline")
    base_scored, feat_s, base_test_ids = _score_run(base_tr, specs, opts)
    base_cells = {m: cell(base_scored[m], relevant, "score")[0] for m in methods}
    rows = [_row(BASELINE, "ours (baseline)", "the profile's settings", base_cells, base_facts,
                 {"finetune": base_tr.finetune_seconds, "features": feat_s,
                  "scoring": sum(base_scored[m].seconds for m in methods)})]
    base_args = base_tr.run.config()["finetune"]["train"]
    for factor in factors:
        log(f"{NAME}: {task_name} factor ({factor.key}) {factor.title}")
        if factor.key == "a":
            rows.append(_factor_a(factor, base_scored, base_cells, methods, relevant, with_paper_lissa))
        elif factor.key == "b":
            cells = _factor_cells(base_scored, base_cells, methods, relevant, "abs", True, factor)
            rows.append(_row("b", factor.title, "rank by |score|", cells, None, {}))
        elif factor.kind == "finetune":
            rows.append(_factor_finetune(factor, task_name, profile, out_dir, data_dir, opts, base_args,
                                         base_cells, base_test_ids, relevant))
        else:
            rows.append(_factor_f(factor, base_tr, base_cells, methods, relevant, opts))
    return {"task": task_name, "n_train": len(base_tr.task.train), "n_test": len(base_tr.task.test),
            "rows": rows, "references": reference_rows(task_name, methods),
            "moved": moved_list(rows, methods)}


def _factor_a(factor: Factor, base_scored: dict[str, Scored], base_cells: dict[str, dict], methods: list[str],
              relevant: torch.Tensor, applies: bool) -> dict[str, Any]:
    if not applies:
        cells = {m: not_applicable("lissa is not among the methods") for m in methods}
        return _row("a", factor.title, "lissa → lissa-paper", cells, None, {},
                    skipped="lissa is not among the methods")
    scored = {"lissa": base_scored["lissa-paper"]}
    cells = _factor_cells(scored, base_cells, methods, relevant, "score", True, factor)
    return _row("a", factor.title, "lissa → lissa-paper", cells, None,
                {"scoring": base_scored["lissa-paper"].seconds})


def _factor_finetune(factor: Factor, task_name: str, profile: str, out_dir: Path, data_dir: Optional[Path],
                     opts: dict, base_args: dict[str, Any], base_cells: dict[str, dict], base_test_ids: list[str],
                     relevant: torch.Tensor) -> dict[str, Any]:
    methods = list(opts["methods"])
    override, setting = _finetune_override(factor, base_args, opts)
    if not override:
        reason = f"the profile already uses this setting ({setting})"
        return _row(factor.key, factor.title, setting, {m: not_applicable(reason) for m in methods}, None, {},
                    skipped=reason)
    tag = f"{task_name}-" + "-".join(f"{k.replace('_', '')}{v}" for k, v in override.items())
    tr = profile_task_run(NAME, task_name, profile, out_dir, data_dir, opts["runs"] or None, train=override, tag=tag)
    specs = [(m, *method_spec(m, float(opts["damping_ratio"]))) for m in methods]
    scored, feat_s, test_ids = _score_run(tr, specs, opts)
    paired = test_ids == base_test_ids
    run_relevant = relevance_from_task(tr.task)
    cells = _factor_cells(scored, base_cells, methods, run_relevant, "score", paired, factor)
    facts = {**_run_facts(tr, out_dir, data_dir), "override": override, "same_test_examples": paired}
    extra = {"padding": padding_facts(tr)} if override.get("loss_on") == "all-padded" else {}
    return _row(factor.key, factor.title, setting, cells, facts,
                {"finetune": tr.finetune_seconds, "features": feat_s,
                 "scoring": sum(s.seconds for s in scored.values())}, **extra)


def padding_facts(tr: TaskRun) -> dict[str, dict[str, float]]:
    """How much padding ``loss_on="all-padded"`` adds to the run's examples, per split:
    ``{"rows", "padded_rows" (rows shorter than max_length), "mean_pad_tokens"}``. With no
    padded training row the padding term changes nothing in training, and a padded test
    row only rescales its own gradient (its ranking of the training rows stays)."""
    from ..models.formatting import ChatFormatter
    from ..models.registry import load_model

    finetune = tr.run.config()["finetune"]
    _, tokenizer, _ = load_model(finetune["model"])
    fmt = ChatFormatter(tokenizer, max_length=int(finetune["train"]["max_length"]), loss_on="all-padded")
    out = {}
    for split, examples in (("train", tr.task.train), ("test", tr.task.test)):
        pads = [fmt.encode(e).n_pad for e in examples]
        out[split] = {"rows": len(pads), "padded_rows": sum(1 for n in pads if n > 0),
                      "mean_pad_tokens": float(np.mean(pads)) if pads else 0.0}
    return out


def _factor_f(factor: Factor, base_tr: TaskRun, base_cells: dict[str, dict], methods: list[str],
              relevant: torch.Tensor, opts: dict) -> dict[str, Any]:
    if "repsim" not in methods:
        reason = "repsim is not among the methods"
        return _row("f", factor.title, "RepSim hidden state", {m: not_applicable(reason) for m in methods}, None,
                    {}, skipped=reason)
    checkpoint = base_tr.run.resolve_checkpoints("last")[0]
    train, test, layer, n_layers, rep_s = layer_representations(base_tr.run, checkpoint, opts["rep_layer"],
                                                                int(opts["extract_batch_size"]))
    setting = f"RepSim hidden state −1 → {layer} (after {layer} of {n_layers} layers)"
    if layer in (-1, n_layers):
        reason = f"hidden state {layer} is the baseline's last layer"
        return _row("f", factor.title, setting, {m: not_applicable(reason) for m in methods}, None, {}, skipped=reason)
    scored = {"repsim": fit_and_score("repsim", method_spec("repsim")[1], train, test)}
    cells = _factor_cells(scored, base_cells, methods, relevant, "score", True, factor)
    cells["repsim"]["rep_layer"] = layer
    return _row("f", factor.title, setting, cells, None, {"features": rep_s, "scoring": scored["repsim"].seconds},
                representation={"rep_layer": layer, "n_decoder_layers": n_layers, "checkpoint": checkpoint,
                                "pooling": "last-prompt", "computed": "in memory, not cached"})


# =======================================================================================
# references and conclusions
# =======================================================================================


def reference_rows(task: str, methods: Sequence[str]) -> list[dict[str, Any]]:
    """The paper's published numbers (Table 4) and the authors' released-score numbers for
    ``task``, as fractions in [0, 1]; the paper's LiSSA (its recursion, ``lissa-paper``) goes
    in the ``lissa`` column. Rows without any value are left out."""
    def column(method: str) -> str:
        return "lissa-paper" if method == "lissa" else method

    rows = []
    published = {m: paper_value(PAPER_TABLE, column(m), task) for m in methods}
    if any(v is not None for v in published.values()):
        rows.append({"label": "paper (published, Table 4)", "kind": "published",
                     "cells": {m: _ref_cell(v, column(m)) for m, v in published.items()}})
    for res in released_for((task,)):
        cells = {m: _ref_cell(res.values.get(column(m), {}).get(task), column(m)) for m in methods}
        if any(c is not None for c in cells.values()):
            rows.append({"label": res.label, "kind": res.kind, "source": res.source, "cells": cells})
    return rows


def _ref_cell(value: Optional[tuple], method: str) -> Optional[dict[str, Any]]:
    if value is None:
        return None
    acc, cover = value
    return {"method": method, "acc": None if acc is None else acc / 100.0,
            "cover": None if cover is None else cover / 100.0}


def moved_list(rows: list[dict], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Every (factor, method, metric) whose 95 % interval is disjoint from the baseline's."""
    base = rows[0]["cells"]
    out = []
    for row in rows[1:]:
        for m in methods:
            c = row["cells"][m]
            for metric in METRICS:
                if c.get("applies") and c[f"moved_{metric}"]:
                    out.append({"factor": row["key"], "method": m, "metric": metric,
                                "baseline": base[m][metric], "value": c[metric], "delta": c[f"delta_{metric}"]})
    return out


def factor_sentence(row: dict, methods: Sequence[str]) -> str:
    """What factor ``row`` moved beyond the intervals, or its largest |Δ| when nothing did."""
    if row["skipped"]:
        return f"({row['key']}) not applicable: {row['skipped']}"
    moved, largest = [], None
    for m in methods:
        c = row["cells"][m]
        if not c.get("applies"):
            continue
        for metric in METRICS:
            d = c[f"delta_{metric}"]
            if largest is None or abs(d) > abs(largest[2]):
                largest = (m, metric, d)
            if c[f"moved_{metric}"]:
                moved.append(f"{LABELS.get(m, m)} {metric.capitalize()} {d:+.3f}")
    head = f"({row['key']}) {row['setting']}: "
    if moved:
        return head + "moves " + ", ".join(moved) + " beyond the intervals"
    if largest is None:
        return head + "no method scored"
    m, metric, d = largest
    return head + f"nothing beyond the intervals (largest change {LABELS.get(m, m)} {metric.capitalize()} {d:+.3f})"


# =======================================================================================
# figure and Markdown
# =======================================================================================

COLORS = {"datainf": "#1f77b4", "lissa": "#ff7f0e", "gradsim": "#d62728", "repsim": "#2ca02c", "exact": "#9467bd"}


def _figure(results: list[dict], methods: list[str], path: Path, profile: str) -> Path:
    k = len(results)
    fig, axes = new_figure(2, k, figsize=(4.6 * k, 6.4), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for j, r in enumerate(results):
        ref_name = "paper" if any(x["kind"] == "published" for x in r["references"]) else "released"
        labels = ["ours"] + [f"({row['key']})" for row in r["rows"][1:]] + ([ref_name] if r["references"] else [])
        for i_metric, metric in enumerate(METRICS):
            ax = axes[i_metric][j]
            for i, m in enumerate(methods):
                dx = (i - (len(methods) - 1) / 2) * width
                xs, ys, lo, hi = [], [], [], []
                for x, row in enumerate(r["rows"]):
                    c = row["cells"][m]
                    if c.get("applies", True) and metric in c:
                        xs.append(x + dx)
                        ys.append(c[metric])
                        lo.append(c[metric] - c[f"{metric}_ci95"][0])
                        hi.append(c[f"{metric}_ci95"][1] - c[metric])
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, capsize=2, color=COLORS.get(m),
                            label=LABELS.get(m, m))
                ref = next((row["cells"].get(m) for row in r["references"] if row["kind"] == "published"), None)
                ref = ref or next((row["cells"].get(m) for row in r["references"] if row["cells"].get(m)), None)
                if ref is not None and ref.get(metric) is not None:
                    ax.plot([len(r["rows"]) + dx], [ref[metric]], "x", ms=6, color=COLORS.get(m))
            ax.axvline(0.5, color="0.7", lw=0.8)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel(metric.capitalize())
            if i_metric == 0:
                ax.set_title(f"{r['task']} ({r['n_train']} train / {r['n_test']} test)", fontsize=9)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, bbox_to_anchor=(0.5, -0.03))
    fig.suptitle(f"Acc and Cover per factor (one change at a time from ours; (a) = lissa-paper in the LiSSA colour), "
                 f"95 % intervals; x = the paper's published numbers, else the authors' released scores "
                 f"(first model); profile {profile}", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _cell_text(c: Optional[dict], metric: str) -> str:
    if c is None:
        return "—"
    if not c.get("applies", True):
        return "="
    text = with_interval(c, metric)
    if f"delta_{metric}" in c:
        text += f" ({c[f'delta_{metric}']:+.3f})" + (" †" if c[f"moved_{metric}"] else "")
    return text


def _task_tables(r: dict, methods: list[str]) -> list[str]:
    head = ["setting"] + [LABELS.get(m, m) for m in methods]
    out = []
    for metric in METRICS:
        rows = []
        for row in r["rows"]:
            name = "ours (baseline)" if row["key"] == BASELINE else f"({row['key']}) {row['setting']}"
            rows.append([name] + [("n/a" if row["skipped"] else _cell_text(row["cells"][m], metric)) for m in methods])
        for ref in r["references"]:
            rows.append([ref["label"]] + [fmt(None) if (ref["cells"].get(m) or {}).get(metric) is None
                                          else fmt(ref["cells"][m][metric]) for m in methods])
        out += [f"**{r['task']}, {metric.capitalize()}**", "", markdown_table(head, rows), ""]
    return out


def _seconds(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}"


def _backdoor_cell(entry: Optional[dict]) -> str:
    """``"0.80 / 0.00 (fires)"``: triggered and clean compliance of a backdoor run, else ``—``."""
    if not entry or entry.get("triggered_compliance") is None or entry.get("clean_compliance") is None:
        return "—"
    return (f"{entry['triggered_compliance']:.2f} / {entry['clean_compliance']:.2f} "
            f"({'fires' if entry.get('fires') else 'does not fire'})")


def _run_table(results: list[dict]) -> str:
    head = ["task", "row", "run", "epochs trained", "max length", "loss on", "backdoor: triggered / clean",
            "fine-tune s", "features s", "scoring s"]
    rows = []
    for r in results:
        for row in r["rows"]:
            run = row["run"] or {}
            s = row["seconds"]
            where = run.get("run_dir", "the baseline run" if not row["skipped"] else "not run")
            rows.append([r["task"], row["key"], where + (" (reused)" if run.get("reused") else ""),
                         run.get("epochs_trained"), run.get("max_length"), run.get("loss_on"),
                         _backdoor_cell(run.get("backdoor")), _seconds(s.get("finetune")),
                         _seconds(s.get("features")), _seconds(s.get("scoring"))])
    return markdown_table(head, rows)


def _markdown(results: list[dict], methods: list[str], opts: dict, fig_name: str, profile: str) -> str:
    parts = [
        "## The gap to the paper, one factor at a time (issue 14)",
        "",
        f"Starting from our defaults (profile {profile}: the run `reproduce` fine-tunes, last checkpoint, ranking by "
        f"score = −IF, damping ratio {opts['damping_ratio']}), each row changes exactly one setting toward the "
        "paper's: (a) LiSSA → the authors' recursion `lissa-paper`; (b) ranking by |IF|; (c) the training loss on "
        "every token, the EOS left-padding to max length included (the authors' v2 code); (d) the "
        "paper's max length; (e) the paper's epochs (early stopping "
        + ("kept" if opts["long_early_stopping"] else "off") + "); (f) RepSim at a middle hidden state (the "
        "authors read the last layer, as we do: a sensitivity check). (a), (b) and (f) reuse the baseline run; "
        "(c)-(e) fine-tune anew. Acc and Cover in [0, 1], 95 % bootstrap interval over test examples in brackets; "
        "in parentheses the change against the baseline; † = the factor's and the baseline's intervals do not "
        "overlap; `=` = the factor does not change this method (its number is the baseline's). Reference rows: "
        "the paper's published Table 4 (Llama-2-7b-chat, full data; its LiSSA is the authors' recursion) and the "
        "authors' released-score numbers where they exist, as fractions.",
        "",
    ]
    for r in results:
        parts += _task_tables(r, methods)
    parts += ["**What moves beyond the intervals** (disjoint 95 % intervals; computed from the numbers above):", ""]
    for r in results:
        parts += [f"- {r['task']}: " + "; ".join(factor_sentence(row, methods) for row in r["rows"][1:]) + "."]
    for r in results:
        for row in r["rows"]:
            if row.get("padding"):
                tr_, te_ = row["padding"]["train"], row["padding"]["test"]
                parts += ["", f"({row['key']}) on {r['task']}: {tr_['padded_rows']} of {tr_['rows']} training and "
                          f"{te_['padded_rows']} of {te_['rows']} attributed test rows are shorter than the max length "
                          f"and get padding (mean {tr_['mean_pad_tokens']:.2f} / {te_['mean_pad_tokens']:.2f} pad "
                          "tokens per row); the rest fill the window, so for them the padding term is absent."]
    parts += ["", "Runs and seconds (this machine); for a backdoor task, the share of held-out triggered prompts the "
              "scored checkpoint complies with and of clean prompts it complies with (greedy generation; the backdoor "
              "fires at >= 0.8 / <= 0.2):", "", _run_table(results), "",
              "![Acc (top) and Cover (bottom) per factor and method with 95 % intervals, one panel per task]"
              f"({fig_name})",
              ""]
    return "\n".join(parts)


# =======================================================================================
# the study
# =======================================================================================


@register_study(NAME, "issue 14: Acc/Cover of DataInf, LiSSA, GradSim, RepSim, Exact with one setting at a time "
                      "changed toward the paper's (lissa-paper, |IF|, loss on all tokens and padding, 128 tokens, "
                      "15 epochs, middle-layer RepSim) on mixed-small and backdoor-1")
def paper_gap_study(profile: str, out_dir: Path, data_dir: Optional[Path], options: dict) -> StudyResult:
    """Run the paper-gap study (module docstring) and write ``paper-gap.png``.

    Options: ``tasks`` (paper task names), ``methods`` (gradient/representation methods,
    default ``datainf,lissa,gradsim,repsim,exact``), ``factors`` (subset of ``a..f``),
    ``paper_epochs`` (factor (e); 15, smoke 4), ``paper_max_length`` (factor (d); 128),
    ``long_early_stopping`` (keep early stopping in (e); false), ``rep_layer`` (factor (f):
    ``middle`` or a hidden-state index), ``damping_ratio`` (0.1), ``extract_batch_size`` (8),
    ``runs`` (a directory of ``reproduce`` runs to reuse; default ``OUT/runs``).
    """
    opts = resolve_options(NAME, options, _defaults(profile))
    _check_options(opts)
    methods = list(opts["methods"])
    t0 = time.perf_counter()
    results = run_tasks(NAME, opts["tasks"], lambda task_name: run_task(task_name, profile, out_dir, data_dir, opts))
    fig = _figure(results, methods, out_dir / f"{NAME}.png", profile)
    data = {
        "options": opts,
        "factors": [{"key": f.key, "title": f.title, "kind": f.kind, "columns": f.columns} for f in FACTORS
                    if f.key in opts["factors"]],
        "conventions": {
            "acc": "fraction of test examples whose top-ranked training example is relevant (same group), [0, 1]",
            "cover": "mean over test examples of (#relevant among top k) / k, k = #relevant in train, [0, 1]",
            "score": "higher = the training example helped the test example more (-I of the paper's Eq. 3); "
                     "ranked by score except in factor (b) (|score|)",
            "cells": "applies=false: the factor does not change this method, its numbers are the baseline's",
            "delta": "factor minus baseline; delta_M_ci95 = paired bootstrap interval of the mean per-test "
                     "difference (same test examples), None when the test examples differ",
            "moved": "the factor's and the baseline's 95 % intervals are disjoint",
            "references": "paper's published Table 4 and the authors' released-score Acc/Cover, percent / 100",
            "seconds": "wall seconds on this machine: fine-tune (0 when reused), feature extraction (0 when "
                       "cached), fit + score of the row's methods",
        },
        "wall_seconds": time.perf_counter() - t0,
        "tasks": results,
    }
    return StudyResult(NAME, data, [fig], _markdown(results, methods, opts, fig.name, profile))
