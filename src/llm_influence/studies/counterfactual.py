"""Study ``counterfactual``: do the methods predict what retraining does?

The paper judges attribution by an intuitive ground truth (Acc/Cover: is the top training
example of the test example's group?). This study puts beside it, for the same runs and the
same scores files, the counterfactual ground truth the field uses
(:mod:`llm_influence.evaluation.counterfactual`): the **LDS** over random half-subsets with
its **noise ceiling** (a second training seed), **leave-top-k-out** (remove the method's
top-k for a test example and retrain) and **tail-patch** (one more optimiser step on the
method's top-k from the final model), each against random training examples. Retraining is
the harness of :mod:`llm_influence.training.retrain` (the run's model, seed,
hyper-parameters, epochs and initial adapter; the full mask reproduces the run's adapter
bitwise).

Per task (default ``mixed-small`` and ``backdoor-1``), on the run of the profile (the
``reproduce`` run is reused, option ``runs``):

1. scores: every method of ``methods`` at the last checkpoint from the run's scores file or,
   when the run has none (``compute_missing``), scored as the attribute stage would with the
   run's attribute settings (:func:`compute_scores`) into ``OUT/counterfactual-scores/TASK/``
   (the run's ``scores/`` stay as they are, so the benchmark's report and explorer keep
   their methods); plus every other scores file of the run (TracIn, plugins). Each is
   referenced by path and SHA-256;
2. Acc / Cover (:func:`~llm_influence.evaluation.metrics.evaluate_scores`, ``rank_by``);
3. LDS: ``masks`` subsets of fraction ``alpha`` (seed ``sample_seed``), retrained with the
   run's seed; the first ``noise_masks`` of them retrained again with ``noise_seed`` (-1 =
   the run's seed + 1) for the noise ceiling;
4. leave-top-k-out on ``n_leave_out_tests`` sampled test examples (seed ``sample_seed + 1``)
   for the tasks in ``leave_out_tasks``, k = ``topk_fractions`` of ``n_train`` (at least 1),
   against ``leave_out_random`` random k-sets (seed ``sample_seed + 3 + k``); every distinct
   removal is retrained once;
5. tail-patch on ``n_tail_tests`` sampled test examples (seed ``sample_seed + 2``), against
   ``tail_random`` random k-sets.

Every subset retrain is kept in ``OUT/counterfactual-cache/TASK/KEY.json`` (option
``retrain_cache``, :mod:`~llm_influence.training.retrain_cache`; the key covers the run,
its initial adapter, the harness's code, torch's version and thread count, the mask and the
seed), so a study that was interrupted, or run again, only retrains what is missing; the
cost figures are the seconds each retrain took when it ran.

``check_full_mask`` (smoke default) also retrains the full mask and records whether the
adapter equals the run's final checkpoint bitwise and the test losses equal the final
adapter's.

Writes ``counterfactual.json`` (per task: masks, losses per training seed, noise masks and
losses, per method the scores reference, Acc/Cover, LDS with per-test correlations,
leave-top-k-out removals and losses, tail-patch rows and losses; the lines of numpy that
recompute an LDS are in :mod:`llm_influence.evaluation.counterfactual`),
``counterfactual.md`` (one table per task: Acc / Cover / LDS / leave-top-k-out / tail-patch
per method with 95 % intervals, and the noise ceiling) and ``counterfactual.png``.

Cost (cpu profile, 2 cores)
---------------------------
A retrain costs ``|S| * epochs`` example-epochs of training plus one forward pass over the
test split; :func:`estimate_seconds` bounds a task's cost from the run's own measured seconds
per example-epoch (logged before the task starts). Measured in ``make reproduce`` on this
project's 2-core machine with nothing else running (``benchmarks/README.md``, section 7), all
12 methods of :data:`METHODS`:

=====================================  =============================  ==========
item (cpu defaults)                    retrains                       measured
=====================================  =============================  ==========
mixed-small LDS + noise (20 x 5 each)  8 + 4 half-subsets, 55.5 s     11.1 min
mixed-small leave-top-k-out (36 x 5)   2 tests, k = 4: 18 distinct    28.2 min
                                       sets (of 25 possible), 94 s
mixed-small tail-patch (k = 4)         6 tests x 12 methods + random  3.0 min
backdoor-1 LDS + noise (50 x 4 each)   8 + 4 half-subsets, 109.8 s    21.3 min
backdoor-1 tail-patch (k = 10)         6 tests x 12 methods + random  5.4 min
whole study (both tasks)                                              ~70 min
=====================================  =============================  ==========

(backdoor-1's whole task took 26.9 min, model loads and the scoring of EK-FAC, TracIn and
LESS included; its retrains ran partly beside a low-priority test run, yet its 0.549 s per
example-epoch matches mixed-small's 0.555 s.) Methods that rank alike share a removal set
(LiSSA (authors') and GradSim always do); with 12 methods and no sharing the leave-out would
be 25 retrains. The cpu
defaults (M = 8 masks, not the issue's 32; 4 noise masks; k = 10 % only; leave-top-k-out on
mixed-small only, since a backdoor-1 leave-out retrain is 90 x 4 example-epochs; tail-patch
on 6 test examples) were sized for the hour with 7 methods; with all 12 the study takes ~70
min, of which the leave-out's 28 min; ``leave_out_tasks=`` (empty) brings it to ~42 min.
M = 32 with 8 noise masks on both tasks would take ~2 hours of LDS retrains alone. The base
model's frozen activations cannot be cached: LoRA sits on q/v of every layer, so only the
embeddings are frozen.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..attribute import AttributeArgs, read_scores
from ..errors import UserError
from ..evaluation.counterfactual import (k_of, lds, leave_top_k_out, noise_ceiling, plan_removals, random_masks,
                                         sample_tests, subset_size, tail_patch, without)
from ..evaluation.metrics import evaluate_scores, relevance_from_task
from ..io_utils import sha256_file
from ..progress import log
from ..rundir import RunDir
from ..training.log import read_train_log
from ..training.retrain import LoraRetrainer, retrain_masks
from ..training.retrain_cache import CachedRetrainer
from .base import (StudyResult, fmt, markdown_table, new_figure, register_study, resolve_options, save_figure,
                   with_interval)
from .llm_runs import LLM_STUDY_DEFAULTS, method_spec, profile_task_run, run_tasks

NAME = "counterfactual"
TASKS = ("mixed-small", "backdoor-1")
METHODS = ("datainf", "lissa", "lissa-paper", "gradsim", "repsim", "exact", "ekfac", "tracin", "rept", "dra",
           "trackstar", "less")
LABELS = {"datainf": "DataInf", "lissa": "LiSSA", "lissa-paper": "LiSSA (authors')", "gradsim": "GradSim",
          "gradsim-cos": "GradSim (cos)", "repsim": "RepSim", "exact": "Exact", "exact-full": "Exact (full)",
          "ekfac": "EK-FAC", "tracin": "TracIn", "projected": "Projected", "rept": "RepT", "dra": "DRA",
          "trackstar": "TrackStar", "less": "LESS"}
#: ``OUT/CACHE_FOLDER/TASK/``: one JSON file per retrain (:mod:`~llm_influence.training.retrain_cache`)
CACHE_FOLDER = "counterfactual-cache"
#: seconds per example-epoch of training and per test forward, assumed when a run has no timed epochs
EXAMPLE_EPOCH_S = 0.65
EVAL_S = 0.15


def _defaults(profile: str) -> dict[str, Any]:
    common = {"tasks": TASKS, "methods": METHODS, "alpha": 0.5, "sample_seed": 0, "noise_seed": -1,
              "compute_missing": True, "retrain_cache": True, **LLM_STUDY_DEFAULTS}
    if profile == "smoke":
        return {**common, "masks": 4, "noise_masks": 2, "topk_fractions": (0.1,), "leave_out_tasks": ("mixed-small",),
                "n_leave_out_tests": 2, "leave_out_random": 1, "n_tail_tests": 2, "tail_random": 2,
                "check_full_mask": True}
    if profile == "cpu":
        return {**common, "masks": 8, "noise_masks": 4, "topk_fractions": (0.1,), "leave_out_tasks": ("mixed-small",),
                "n_leave_out_tests": 2, "leave_out_random": 1, "n_tail_tests": 6, "tail_random": 4,
                "check_full_mask": False}
    return {**common, "masks": 32, "noise_masks": 8, "topk_fractions": (0.05, 0.1), "leave_out_tasks": TASKS,
            "n_leave_out_tests": 8, "leave_out_random": 2, "n_tail_tests": 32, "tail_random": 4,
            "check_full_mask": False}


def _check_options(opts: dict) -> None:
    checks = [("masks", int(opts["masks"]) >= 2), ("alpha", 0.0 < float(opts["alpha"]) < 1.0),
              ("noise_masks", 0 <= int(opts["noise_masks"]) <= int(opts["masks"])
               and int(opts["noise_masks"]) != 1),
              ("topk_fractions", bool(opts["topk_fractions"]) and all(0.0 < float(f) < 1.0
                                                                        for f in opts["topk_fractions"])),
              ("n_leave_out_tests", int(opts["n_leave_out_tests"]) >= 0),
              ("leave_out_random", int(opts["leave_out_random"]) >= 1),
              ("n_tail_tests", int(opts["n_tail_tests"]) >= 0), ("tail_random", int(opts["tail_random"]) >= 1)]
    for name, ok in checks:
        if not ok:
            raise UserError(f"study {NAME!r}: invalid option {name}={opts[name]!r} (masks >= 2, 0 < alpha < 1, "
                            "noise_masks 0 or 2..masks, fractions in (0, 1), counts >= 0, random sets >= 1)")


# ---------------------------------------------------------------------------------------
# cost


def estimate_seconds(n_train: int, n_test: int, epochs: int, opts: dict, n_methods: int, *, leave_out: bool,
                     example_epoch_s: float = EXAMPLE_EPOCH_S, eval_s: float = EVAL_S) -> dict[str, float]:
    """Seconds the retraining of one task costs under ``opts`` (upper bound for the
    leave-out and tail-patch parts: no two methods sharing a top-k set).

    A retrain of ``s`` examples costs ``s * epochs * example_epoch_s + n_test * eval_s``; a
    tail-patch step on ``k`` examples ``k * example_epoch_s`` plus one forward per test it
    is evaluated on."""
    half = subset_size(n_train, float(opts["alpha"]))
    retrain = lambda s: s * epochs * example_epoch_s + n_test * eval_s  # noqa: E731
    ks = sorted({k_of(float(f), n_train) for f in opts["topk_fractions"]})
    out = {"lds": (int(opts["masks"]) + int(opts["noise_masks"])) * retrain(half), "leave_out": 0.0, "tail_patch": 0.0}
    n_lo = min(int(opts["n_leave_out_tests"]), n_test)
    if leave_out and n_lo:
        out["leave_out"] = sum((n_lo * n_methods + int(opts["leave_out_random"])) * retrain(n_train - k) for k in ks)
    n_tail = min(int(opts["n_tail_tests"]), n_test)
    if n_tail:
        out["tail_patch"] = sum(n_tail * n_methods * (k * example_epoch_s + eval_s)
                                + int(opts["tail_random"]) * (k * example_epoch_s + n_tail * eval_s) for k in ks)
    out["total"] = sum(out.values())
    return out


def measured_example_epoch_seconds(run: RunDir, n_train: int) -> Optional[float]:
    """The run's own training seconds per example-epoch (epoch rows of its training log,
    validation passes included), or None without them."""
    rows = [r for r in read_train_log(run.train_log) if r.get("kind") == "epoch" and int(r.get("epoch", 0)) >= 1]
    seconds = sum(float(r.get("seconds") or 0.0) for r in rows)
    return seconds / (n_train * len(rows)) if rows and seconds > 0 else None


# ---------------------------------------------------------------------------------------
# scores


#: the attribute-stage settings a run's ``config.json`` records that shape the features
FEATURE_SETTINGS = ("extract_batch_size", "dtype", "rep_layer", "rep_pooling", "chunk_size", "project_dim",
                    "project_seed", "project_kind")


def ensure_scores(run: RunDir, checkpoint: str, methods: Sequence[str], opts: dict,
                  folder: Path) -> dict[str, Path]:
    """``{method: scores file}`` at ``checkpoint``: each of ``methods`` from the run's scores
    (``RUN/scores/CHECKPOINT/METHOD.safetensors``) or, when it is missing and
    ``compute_missing`` is on, from :func:`compute_scores` into ``folder``; then every other
    scores file of the run's checkpoint (e.g. TracIn, plugins)."""
    run_folder = run.scores_dir(checkpoint)
    found = {m: run_folder / f"{m}.safetensors" for m in methods if (run_folder / f"{m}.safetensors").is_file()}
    missing = [m for m in methods if m not in found]
    if missing and opts["compute_missing"]:
        found.update(compute_scores(run, checkpoint, missing, opts, folder))
    elif missing:
        log(f"{NAME}: no scores for {', '.join(missing)} in {run_folder} (compute_missing is off); left out")
    for path in sorted(run_folder.glob("*.safetensors")) if run_folder.is_dir() else []:
        found.setdefault(path.stem, path)
    return {m: found[m] for m in [*methods, *sorted(found)] if m in found}


def compute_scores(run: RunDir, checkpoint: str, names: Sequence[str], opts: dict, folder: Path) -> dict[str, Path]:
    """Score ``names`` at ``checkpoint`` as the attribute stage would, without writing into
    the run (its feature cache aside): the run's recorded attribute settings
    (:data:`FEATURE_SETTINGS`), each method's declared defaults with ``damping_ratio``, the
    attribute stage's feature extraction and chunked scoring
    (:func:`~llm_influence.attribute.score_matrix`). Each ``[n_test, n_train]`` float64
    matrix goes to ``folder/METHOD.safetensors`` in the attribute stage's format (tensor
    ``scores``, JSON metadata; :func:`~llm_influence.attribute.read_scores` reads it) with a
    key over the method, its arguments and source digest, the adapter, the examples and the
    settings; a file with the same key is reused."""
    import hashlib
    import json

    import torch
    from safetensors.torch import save_file

    from ..attribute import build_methods, features_for, score_matrix
    from ..features import store as feature_store
    from ..io_utils import atomic_path
    from ..methods import SCORE_CONVENTION, implementation_digest

    previous = run.config().get("attribute", {})
    settings = {k: previous[k] for k in FEATURE_SETTINGS if k in previous}
    settings.setdefault("extract_batch_size", int(opts["extract_batch_size"]))
    args = AttributeArgs(methods=tuple(names), checkpoint=checkpoint,
                         method_args={m: method_spec(m, float(opts["damping_ratio"]))[1] for m in names}, **settings)
    methods = build_methods(list(names), args)
    task = run.load_task()
    common = {"adapter": feature_store.adapter_digest(run.checkpoints_root / checkpoint),
              "train": feature_store.examples_digest(task.train), "test": feature_store.examples_digest(task.test),
              "settings": settings, "checkpoint": checkpoint}
    out: dict[str, Path] = {}
    todo: list[tuple[str, str, Path]] = []
    for name, method in methods.items():
        key = hashlib.sha256(json.dumps({**common, "method": name, "arguments": method.arguments(),
                                         "implementation": implementation_digest(type(method))},
                                        sort_keys=True, default=str).encode()).hexdigest()
        path = folder / f"{name}.safetensors"
        try:
            reusable = path.is_file() and read_scores(path)[1].get("key") == key
        except UserError:
            reusable = False
        if reusable:
            out[name] = path
        else:
            todo.append((name, key, path))
    if not todo:
        return out
    log(f"{NAME}: scoring {', '.join(n for n, _, _ in todo)} at {checkpoint} (not in the run; written to {folder})")
    train, test = features_for(run, checkpoint, [methods[name] for name, _, _ in todo], args)
    folder.mkdir(parents=True, exist_ok=True)
    for name, key, path in todo:
        method = methods[name]
        t0 = time.perf_counter()
        scores = score_matrix(method, train, test, chunk_size=args.chunk_size).to(torch.float64)
        meta = {"convention": SCORE_CONVENTION, "method": name, "checkpoint": checkpoint,
                "arguments": method.arguments(), "diagnostics": method.diagnostics,
                "seconds": time.perf_counter() - t0, "shape": list(scores.shape), "key": key,
                "train_ids": train.ids, "test_ids": test.ids, "run": str(run.path), "computed_by": f"study {NAME}"}
        with atomic_path(path) as tmp:
            save_file({"scores": scores.contiguous()}, str(tmp),
                      metadata={k: json.dumps(v, default=str) for k, v in meta.items()})
        out[name] = path
    return out


def _load_scores(path: Path, train_ids: list[str], test_ids: list[str]) -> np.ndarray:
    scores, meta = read_scores(path)
    if meta.get("train_ids", train_ids) != train_ids or meta.get("test_ids", test_ids) != test_ids:
        raise UserError(f"{path}: scores were computed for other examples than the run's; "
                        "re-run `llm-influence attribute --force`")
    arr = scores.numpy()
    if arr.shape != (len(test_ids), len(train_ids)) or not np.all(np.isfinite(arr)):
        raise UserError(f"{path}: scores are not a finite [{len(test_ids)}, {len(train_ids)}] matrix")
    return arr


# ---------------------------------------------------------------------------------------
# one task


def _full_mask_check(retrainer: LoraRetrainer, final_losses: np.ndarray) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    losses = retrainer.retrain(np.ones(retrainer.n_train, dtype=bool))
    final = load_file(str(retrainer.run.checkpoints_root / retrainer.final_checkpoint / "adapter_model.safetensors"))
    state = retrainer.adapter_state()
    same = sorted(final) == sorted(state) and all(torch.equal(final[k], state[k]) for k in final)
    return {"adapter_bitwise_equal": bool(same), "test_losses_equal": bool(np.array_equal(losses, final_losses))}


def _path_from(out_dir: Path, path: Path) -> str:
    """``path`` relative to the study's output folder when it lies inside it (so the JSON stays
    valid when that folder is copied, e.g. ``runs/cpu`` to ``results/cpu``), else absolute."""
    path, out_dir = Path(path).resolve(), Path(out_dir).resolve()
    try:
        return path.relative_to(out_dir).as_posix()
    except ValueError:
        return str(path)


def run_task(task_name: str, profile: str, out_dir: Path, data_dir: Optional[Path], opts: dict) -> dict[str, Any]:
    """Every counterfactual measurement of one task (module docstring); JSON-serialisable."""
    t_task = time.perf_counter()
    tr = profile_task_run(NAME, task_name, profile, out_dir, data_dir, opts["runs"] or None)
    task = tr.task
    train_ids, test_ids = [e.id for e in task.train], [e.id for e in task.test]
    n_train, n_test = len(train_ids), len(test_ids)
    checkpoint = tr.run.resolve_checkpoints("last")[0]
    paths = ensure_scores(tr.run, checkpoint, list(opts["methods"]), opts, out_dir / f"{NAME}-scores" / task_name)
    scores = {m: _load_scores(p, train_ids, test_ids) for m, p in paths.items()}
    if not scores:
        raise UserError(f"study {NAME!r}: no scores for {task_name} in {tr.run.scores_dir(checkpoint)}")
    relevant = relevance_from_task(task)

    retrainer = LoraRetrainer(tr.run.path)
    # every subset retrain goes through the cache, so an interrupted study resumes; the
    # full-mask check below retrains for real (it compares the adapter itself)
    cached = CachedRetrainer(retrainer, out_dir / CACHE_FOLDER / task_name) if opts["retrain_cache"] else retrainer
    leave_out = task_name in tuple(opts["leave_out_tasks"])
    measured = measured_example_epoch_seconds(tr.run, n_train)
    est = estimate_seconds(n_train, n_test, retrainer.epochs, opts, len(scores), leave_out=leave_out,
                           example_epoch_s=measured or EXAMPLE_EPOCH_S)
    log(f"{NAME}: {task_name}: {n_train} train / {n_test} test, {retrainer.epochs} epochs, {len(scores)} methods; "
        f"estimated at most {est['total'] / 60:.1f} min ({'measured' if measured else 'assumed'} "
        f"{measured or EXAMPLE_EPOCH_S:.2f} s per example-epoch)")
    noise_seed = int(opts["noise_seed"]) if int(opts["noise_seed"]) >= 0 else retrainer.seed + 1
    if noise_seed == retrainer.seed:
        raise UserError(f"study {NAME!r}: noise_seed {noise_seed} is the run's own training seed; the noise ceiling "
                        "needs a second seed (-1 = the run's seed + 1)")
    sample_seed = int(opts["sample_seed"])
    base_losses = retrainer.final_losses()

    # LDS and its noise ceiling
    masks = random_masks(n_train, int(opts["masks"]), float(opts["alpha"]), sample_seed)
    losses = retrain_masks(cached, masks)
    lds_seconds = sum(cached.retrain_seconds)  # measured seconds, also for retrains read from the cache
    noise_idx = list(range(int(opts["noise_masks"])))
    noise_losses = retrain_masks(cached, masks[noise_idx], noise_seed) if noise_idx else np.zeros((0, n_test))
    ceiling = noise_ceiling(losses[noise_idx], noise_losses).to_dict() if noise_idx else None

    methods: dict[str, Any] = {}
    for m, arr in scores.items():
        metrics = evaluate_scores(arr, relevant, rank_by=opts["rank_by"])
        methods[m] = {"scores": {"path": _path_from(out_dir, paths[m]), "sha256": sha256_file(paths[m])},
                      **{k: v for k, v in metrics.to_dict().items() if k in ("acc", "acc_ci95", "cover", "cover_ci95")},
                      "lds": lds(arr, masks, losses).to_dict()}

    ks = sorted({k_of(float(f), n_train) for f in opts["topk_fractions"]})
    leave = None
    n_lo = min(int(opts["n_leave_out_tests"]), n_test)
    if leave_out and n_lo:
        plan = plan_removals(scores, sample_tests(n_test, n_lo, sample_seed + 1), ks, int(opts["leave_out_random"]),
                             sample_seed + 3)
        log(f"{NAME}: {task_name}: leave-top-k-out, {len(plan.unique)} distinct removals")
        before = len(cached.retrain_seconds)
        removal_losses = retrain_masks(cached, np.stack([without(n_train, rows) for rows in plan.unique]))
        leave = {**leave_top_k_out(plan, dict(zip(plan.unique, removal_losses)), base_losses),
                 "retrains": [{"removed": list(rows), "losses": removal_losses[i].tolist()}
                              for i, rows in enumerate(plan.unique)],
                 "seconds": sum(cached.retrain_seconds[before:])}

    tail = None
    n_tail = min(int(opts["n_tail_tests"]), n_test)
    if n_tail:
        tests = sample_tests(n_test, n_tail, sample_seed + 2)
        t0 = time.perf_counter()
        tail = tail_patch(retrainer.tail_patch, retrainer.final_losses(tests, batch_size=1), scores, tests, ks,
                          int(opts["tail_random"]), sample_seed + 3)
        tail["seconds"] = time.perf_counter() - t0
        tail["lr"] = retrainer.final_lr

    check = _full_mask_check(retrainer, base_losses) if opts["check_full_mask"] else None
    half = subset_size(n_train, float(opts["alpha"]))
    return {
        "task": task_name, **tr.info(), "checkpoint": checkpoint, "epochs": retrainer.epochs,
        "train_seed": retrainer.seed, "noise_seed": noise_seed, "ks": ks, "subset_size": half,
        "leave_out": leave_out, "base_losses": base_losses.tolist(),
        "lds": {"masks": masks.astype(int).tolist(), "losses": losses.tolist(), "noise_masks": noise_idx,
                "noise_losses": noise_losses.tolist(), "noise_ceiling": ceiling},
        "methods": methods, "leave_top_k_out": leave, "tail_patch": tail, "full_mask_check": check,
        "cost": {"seconds_per_half_retrain": lds_seconds / len(masks),
                 "seconds_per_example_epoch": lds_seconds / (len(masks) * half * retrainer.epochs),
                 "retrains": len(cached.retrain_seconds), "retrain_seconds": sum(cached.retrain_seconds),
                 "retrains_from_cache": getattr(cached, "hits", 0),
                 "seconds_per_leave_out_retrain": leave["seconds"] / len(leave["retrains"]) if leave else None,
                 "tail_patch_seconds": tail["seconds"] if tail else None,
                 "measured_finetune_seconds_per_example_epoch": measured, "estimate": est,
                 "task_seconds": time.perf_counter() - t_task},
    }


# ---------------------------------------------------------------------------------------
# output


def _label(m: str) -> str:
    return LABELS.get(m, m)


def _cell(value: Optional[float], ci: Optional[Sequence[float]], digits: int = 3) -> str:
    return with_interval({"v": value, "v_ci95": list(ci) if ci else None}, "v", digits)


def _method_rows(r: dict, k: int) -> list[list[str]]:
    rows = []
    for m, e in r["methods"].items():
        lo = (r["leave_top_k_out"] or {}).get("k", {}).get(str(k), {}).get("methods", {}).get(m)
        tp = (r["tail_patch"] or {}).get("k", {}).get(str(k), {}).get("methods", {}).get(m)
        rows.append([_label(m), with_interval(e, "acc"), with_interval(e, "cover"),
                     _cell(e["lds"]["lds"], e["lds"]["ci95"]),
                     _cell(lo["vs_random_mean"], lo["vs_random_ci95"], 4) if lo else "—",
                     _cell(tp["vs_random_mean"], tp["vs_random_ci95"], 5) if tp else "—"])
    return rows


def _markdown(results: list[dict], opts: dict, fig_name: str, profile: str) -> str:
    parts = [
        "## Counterfactual ground truth: LDS, leave-top-k-out, tail-patch beside Acc/Cover",
        "",
        f"Profile {profile}. For each method's scores file (score = −IF, higher = more helpful): Acc and Cover "
        "(the paper's intuitive ground truth); the **LDS** — per test example the Spearman correlation, over "
        f"{opts['masks']} random subsets of {100 * float(opts['alpha']):.0f} % of the training set, between the "
        "predicted loss −Σ_{i∈S} score and the loss after retraining on S (same model, seed, hyper-parameters, "
        "epochs and initial adapter), averaged over test examples; **leave-top-k-out** — the increase of a "
        "sampled test example's loss when its top-k training examples are removed and the model retrained, minus "
        "the increase when k random ones are (positive = the method blames examples that matter); **tail-patch** "
        "— the loss drop of a test example after one more optimiser step (the run's AdamW state and last "
        "learning rate) on its top-k, minus the drop from k random examples (positive = better than random). "
        "Losses are mean token cross-entropies in nats. In brackets 95 % bootstrap intervals over test "
        "examples. The **noise ceiling** is the LDS of one training seed's retrained losses predicting a second "
        "seed's on the same subsets: no method can be expected to exceed it.",
        "",
    ]
    for r in results:
        nc = r["lds"]["noise_ceiling"]
        for k in r["ks"]:
            parts += [f"### {r['task']} ({r['n_train']} train / {r['n_test']} test, {r['epochs']} epochs; k = {k})",
                      "",
                      markdown_table(["method", "Acc", "Cover", "LDS", f"leave-top-{k}-out Δloss − random",
                                      f"tail-patch top-{k} vs random"], _method_rows(r, k)),
                      ""]
        notes = []
        if nc:
            notes.append(f"noise ceiling {_cell(nc['lds'], nc['ci95'])} over {nc['n_masks']} subsets "
                         f"(training seeds {r['train_seed']} and {r['noise_seed']})")
        else:
            notes.append("no noise ceiling (noise_masks = 0)")
        nan = {m: e["lds"]["n_nan"] for m, e in r["methods"].items() if e["lds"]["n_nan"]}
        if nan:
            notes.append("test examples without a correlation (constant prediction or loss): "
                         + ", ".join(f"{_label(m)} {n}" for m, n in nan.items()))
        lo = r["leave_top_k_out"]
        if lo:
            for k, e in lo["k"].items():
                notes.append(f"leave-out, random {k} removed: loss increase "
                             f"{_cell(e['random']['delta_mean'], e['random']['delta_ci95'], 4)} over "
                             f"{len(lo['tests'])} test examples, {len(lo['retrains'])} distinct retrains")
        elif not r["leave_out"]:
            notes.append("leave-top-k-out not run for this task (option leave_out_tasks)")
        tp = r["tail_patch"]
        if tp:
            for k, e in tp["k"].items():
                notes.append(f"tail-patch, {k} random examples: loss change "
                             f"{_cell(e['random']['delta_mean'], e['random']['delta_ci95'], 5)} over "
                             f"{len(tp['tests'])} test examples (lr {tp['lr']:.3g})")
        c = r["cost"]
        notes.append(f"cost: {fmt(c['seconds_per_half_retrain'], 1)} s per half-subset retrain "
                     f"({fmt(c['seconds_per_example_epoch'], 3)} s per example-epoch incl. the test pass), "
                     f"{c['retrains']} retrains, task {fmt(c['task_seconds'] / 60, 1)} min")
        if r["full_mask_check"]:
            fc = r["full_mask_check"]
            notes.append(f"full-mask retrain: adapter bitwise equal to the run's {fc['adapter_bitwise_equal']}, "
                         f"test losses equal {fc['test_losses_equal']}")
        parts += [f"{r['task']}: " + "; ".join(notes) + ".", ""]
    parts += [f"![LDS, leave-top-k-out and tail-patch per method and task]({fig_name})", ""]
    return "\n".join(parts)


def _figure(results: list[dict], path: Path, profile: str) -> Path:
    k_rows = ("LDS (Spearman)", "leave-top-k-out Δloss − random", "tail-patch: random − top-k Δloss")
    fig, axes = new_figure(3, len(results), figsize=(4.2 * len(results), 8.0), squeeze=False)
    for c, r in enumerate(results):
        names = list(r["methods"])
        y = np.arange(len(names))
        k = str(max(r["ks"]))
        series = [
            [(e["lds"]["lds"], e["lds"]["ci95"]) for e in r["methods"].values()],
            [((r["leave_top_k_out"] or {}).get("k", {}).get(k, {}).get("methods", {}).get(m, {}).get("vs_random_mean"),
              (r["leave_top_k_out"] or {}).get("k", {}).get(k, {}).get("methods", {}).get(m, {}).get("vs_random_ci95"))
             for m in names],
            [((r["tail_patch"] or {}).get("k", {}).get(k, {}).get("methods", {}).get(m, {}).get("vs_random_mean"),
              (r["tail_patch"] or {}).get("k", {}).get(k, {}).get("methods", {}).get(m, {}).get("vs_random_ci95"))
             for m in names],
        ]
        for row, values in enumerate(series):
            ax = axes[row][c]
            ax.axvline(0.0, color="0.6", lw=0.8)
            shown = [(i, v, ci) for i, (v, ci) in enumerate(values) if v is not None and math.isfinite(v)]
            if not shown:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="0.4")
            for i, v, ci in shown:
                err = [[v - ci[0]], [ci[1] - v]] if ci and None not in ci else None
                ax.errorbar([v], [i], xerr=err, fmt="o", color="#1f77b4", capsize=3, ms=4)
            if row == 0 and r["lds"]["noise_ceiling"]:
                nc = r["lds"]["noise_ceiling"]
                ax.axvline(nc["lds"], color="#d62728", ls="--", lw=1, label="noise ceiling")
                if None not in nc["ci95"]:
                    ax.axvspan(nc["ci95"][0], nc["ci95"][1], color="#d62728", alpha=0.12)
                ax.legend(fontsize=7, loc="best")
            ax.set_yticks(y)
            ax.set_yticklabels([_label(m) for m in names], fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(k_rows[row] + (f", k = {k}" if row else ""), fontsize=8)
            if row == 0:
                ax.set_title(f"{r['task']} ({r['n_train']} train / {r['n_test']} test)", fontsize=9)
    fig.suptitle(f"Counterfactual ground truth per method (profile {profile}; 95 % bootstrap intervals)",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


@register_study(NAME, "LDS with noise ceiling, leave-top-k-out and tail-patch beside Acc/Cover, per method, on "
                      "mixed-small and backdoor-1 (retraining on subsets)")
def counterfactual_study(profile: str, out_dir: Path, data_dir: Optional[Path], options: dict) -> StudyResult:
    """Run the counterfactual study (module docstring) and write ``counterfactual.png``.

    Options: ``tasks``, ``methods`` (computed when missing if ``compute_missing``; other
    scores files present are added), ``masks`` (M), ``alpha``, ``noise_masks``,
    ``noise_seed`` (-1 = run seed + 1), ``sample_seed``, ``topk_fractions``,
    ``leave_out_tasks``, ``n_leave_out_tests``, ``leave_out_random``, ``n_tail_tests``,
    ``tail_random``, ``check_full_mask``, ``retrain_cache`` (keep every subset retrain in
    ``OUT/counterfactual-cache/TASK/`` and reuse it, so an interrupted study resumes), and
    the LLM studies' ``damping_ratio``,
    ``rank_by``, ``extract_batch_size``, ``runs``.
    """
    opts = resolve_options(NAME, options, _defaults(profile))
    _check_options(opts)
    results = run_tasks(NAME, opts["tasks"], lambda task_name: run_task(task_name, profile, out_dir, data_dir, opts))
    fig = _figure(results, out_dir / f"{NAME}.png", profile)
    data = {
        "options": opts,
        "conventions": {
            "scores": "[n_test, n_train], higher = the training example helped the test example more (-IF)",
            "losses": "mean cross-entropy over each test example's supervised tokens (nats), eval mode",
            "lds": "mean over test examples of Spearman(pred[:, j], losses[:, j]) over the masks, "
                   "pred = -masks @ scores.T; NaN (excluded, counted in n_nan) for constant columns",
            "noise_ceiling": "the same mean Spearman between the training seed's and noise_seed's losses on the "
                             "masks lds.noise_masks",
            "leave_top_k_out": "delta = loss(retrained without the rows) - loss(all rows); vs_random = delta - "
                               "mean delta of the random sets (positive = the method's rows matter more)",
            "tail_patch": "delta = loss(after one step on the rows) - loss(final model); vs_random = random delta - "
                          "delta (positive = the method's rows lower the loss more)",
            "intervals": "95 % percentile bootstrap over test examples, 2,000 seeded resamples",
        },
        "tasks": results,
    }
    return StudyResult(NAME, data, [fig], _markdown(results, opts, fig.name, profile))
