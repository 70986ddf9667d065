"""The ``evaluate`` stage: every scores file of a run -> Acc/Cover -> ``RUN/metrics.json``.

Scores are matched to the run's examples by id (the ids stored with the scores must equal
the run's train/test ids, else the scores are stale and it is an error). Ground truth is
the run's :class:`~llm_influence.data.TaskData` relevance (same group).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..attribute import read_scores
from ..errors import UserError
from ..io_utils import sha256_file, write_json
from ..rundir import EPOCH_RE, RunDir
from .metrics import RANK_BY_CHOICES, evaluate_scores, relevance_from_task

DIAGNOSTIC_SUMMARY_KEYS = ("residual_max", "residual_mean", "residual_reference", "iterations", "converged",
                           "scale", "damping_source")


def diagnostics_summary(diagnostics: dict[str, Any]) -> dict[str, Any]:
    """The scalar solver facts of a method's diagnostics (residuals, iterations, damping
    range); per-block details stay in the scores file."""
    out = {k: diagnostics[k] for k in DIAGNOSTIC_SUMMARY_KEYS
           if k in diagnostics and not isinstance(diagnostics[k], (dict, list))}
    damping = diagnostics.get("damping")
    if isinstance(damping, dict) and damping:
        values = [float(v) for v in damping.values()]
        out["damping_min"], out["damping_max"] = min(values), max(values)
    elif isinstance(damping, (int, float)):
        out["damping"] = float(damping)
    return out


def other_ranking(rank_by: str) -> str:
    """The ranking the tables show second: ``abs`` (|IF|, the paper's text and its ICLR-era
    code) beside ``score`` (-IF, its v2 code), and the other way round."""
    return "abs" if rank_by == "score" else "score"


#: what ``other_ranking`` keeps of the second ranking's metrics
OTHER_RANKING_KEYS = ("acc", "acc_ci95", "cover", "cover_ci95", "ties")


def evaluate_run(run_path: str | Path, rank_by: str = "score") -> dict[str, Any]:
    """Compute Acc/Cover for every ``RUN/scores/epoch-N/METHOD.safetensors`` and write
    ``RUN/metrics.json``: ``{"rank_by", "inputs_sha256", "checkpoints": {epoch-N: {method: {acc,
    cover, n_scored, n_skipped, seconds, feature_seconds, diagnostics, scores_sha256,
    other_ranking}}}}``. ``other_ranking`` holds Acc/Cover (with intervals) under the other
    ranking (:func:`other_ranking`: ``{"rank_by": "abs", "acc": ..., ...}`` for the default
    ``score``), so every table can be shown both ways.

    ``scores_sha256`` is the SHA-256 of the scores file a row was computed from and
    ``inputs_sha256`` hashes all of them with ``rank_by`` and the ground truth (ids and
    groups), so metrics.json names exactly what produced it. A scores file that holds NaN
    or Inf, or whose shape or ids do not match the run, stops with a one-line error before
    metrics.json is written: nothing non-finite reaches a table."""
    if rank_by not in RANK_BY_CHOICES:
        raise UserError(f"--rank-by {rank_by!r}: choose one of {', '.join(RANK_BY_CHOICES)}")
    run = RunDir(run_path)
    task = run.load_task()
    relevant = relevance_from_task(task)
    train_ids = [e.id for e in task.train]
    test_ids = [e.id for e in task.test]
    root = run.path / "scores"
    if not root.is_dir():
        raise UserError(f"{run.path}: no scores; run `llm-influence attribute --run {run.path}` first")
    checkpoints: dict[str, dict[str, Any]] = {}
    inputs: list[list[str]] = []
    for folder in sorted((p for p in root.iterdir() if EPOCH_RE.match(p.name)), key=lambda p: int(p.name[6:])):
        per_method: dict[str, Any] = {}
        for path in sorted(folder.glob("*.safetensors")):
            scores, meta = read_scores(path)
            if meta.get("train_ids") != train_ids or meta.get("test_ids") != test_ids:
                raise UserError(f"{path}: scores were computed for other examples than the run's; "
                                "re-run `llm-influence attribute --force`")
            if tuple(scores.shape) != (len(test_ids), len(train_ids)):
                raise UserError(f"{path}: scores have shape {list(scores.shape)}, the run has "
                                f"{len(test_ids)} test x {len(train_ids)} training examples; "
                                "re-run `llm-influence attribute --force`")
            bad = ~torch.isfinite(scores)
            if bad.any():
                i, j = (int(x) for x in bad.nonzero()[0])
                raise UserError(f"{path}: non-finite score {float(scores[i, j])} for test {test_ids[i]!r} x train "
                                f"{train_ids[j]!r} ({int(bad.sum())} entries); not evaluated "
                                "(re-run `llm-influence attribute --force`)")
            try:
                m = evaluate_scores(scores, relevant, rank_by=rank_by)
                second = evaluate_scores(scores, relevant, rank_by=other_ranking(rank_by)).to_dict()
            except ValueError as exc:  # NaN/Inf scores, wrong shape, no scorable test example
                raise UserError(f"{path}: {exc}; not evaluated (re-run `llm-influence attribute --force`)") from None
            digest = sha256_file(path)
            inputs.append([str(path.relative_to(run.path)), digest])
            per_method[meta.get("method", path.stem)] = {
                **m.to_dict(), "seconds": meta.get("seconds"), "feature_seconds": meta.get("feature_seconds"),
                "arguments": meta.get("arguments", {}), "diagnostics": diagnostics_summary(meta.get("diagnostics", {})),
                "scores_sha256": digest,
                "other_ranking": {"rank_by": other_ranking(rank_by), **{k: second[k] for k in OTHER_RANKING_KEYS}},
            }
        if per_method:
            checkpoints[folder.name] = per_method
    if not checkpoints:
        raise UserError(f"{root}: no scores files; run `llm-influence attribute --run {run.path}` first")
    producing = {"rank_by": rank_by, "scores": inputs,
                 "ground_truth": [[e.id, e.group] for e in task.train] + [[e.id, e.group] for e in task.test]}
    metrics = {"task": task.name, "rank_by": rank_by, "n_train": len(train_ids), "n_test": len(test_ids),
               "inputs_sha256": hashlib.sha256(json.dumps(producing, sort_keys=True).encode("utf-8")).hexdigest(),
               "checkpoints": checkpoints}
    write_json(run.metrics_path, metrics)
    return metrics


def metrics_table(metrics: dict[str, Any]) -> list[list[str]]:
    """Rows ``[checkpoint, method, acc %, cover %, seconds, residual max]`` for printing."""
    rows = []
    for checkpoint, per_method in metrics["checkpoints"].items():
        for method, m in per_method.items():
            res = m["diagnostics"].get("residual_max")
            rows.append([checkpoint, method, f"{100 * m['acc']:.1f}", f"{100 * m['cover']:.1f}",
                         "" if m["seconds"] is None else f"{m['seconds']:.2f}",
                         "" if res is None else f"{res:.2e}"])
    return rows
