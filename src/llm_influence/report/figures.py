"""The report's figures: score heatmaps (the paper's Fig. 2) and the top-ranked training
example per method for one test example (the paper's Fig. 1).

Conventions:

* Scores are ``[n_test, n_train]``, **higher = more helpful** (the project's convention);
  ``rank_by="abs"`` uses ``|score|`` instead, as the metrics do.
* Figures are drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas directly
  (no pyplot, no global backend switch) and written as PNG atomically (temporary file in
  the same folder, then rename), so an interrupted run never leaves a half-written image.
  The written file is mode 0644.
* Heatmap normalisation (``normalize="rank"``, the default): each test row is replaced by
  the ranks of its scores, scaled to ``[0, 1]``: 1 = the row's highest score (the
  top-ranked training example), 0 = its lowest, ties get their average rank. Ranks are
  what Acc and Cover are computed from, and they make methods whose scores differ by
  orders of magnitude comparable. ``normalize="minmax"`` scales each row linearly to
  ``[0, 1]`` instead (a constant row becomes 0.5).
* Heatmap column order (:func:`heatmap_column_order`): the relevant group's training
  examples first, then the other groups in order of first appearance; inside a group the
  original order is kept. A vertical line marks where the relevant group ends.
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.example import Example
from ..evaluation.metrics import rank_training, tie_ranks
from ..io_utils import atomic_path
from .markdown import md_escape, method_label

Relevance = Callable[[Example, Example], bool]


# --------------------------------------------------------------------------- helpers

def _as_array(scores: Any, name: str = "scores") -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().to(torch.float64).numpy()
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_test, n_train], got shape {tuple(arr.shape)}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"{name}[{i}, {j}] (test {i}, train {j}) is {arr[i, j]!r}; scores must be finite")
    return arr


def _save_png(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    with warnings.catch_warnings():
        # glyphs missing from the font (emoji, CJK in prompts) are drawn as boxes; not an error
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph.*missing.*")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _new_figure(width: float, height: float, layout: Optional[str] = None) -> Figure:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def group_order(groups: Sequence[str], first: Optional[str] = None) -> list[str]:
    """Distinct ``groups`` in order of first appearance, with ``first`` moved to the front
    when it occurs."""
    seen: list[str] = []
    for g in groups:
        if g not in seen:
            seen.append(g)
    if first is not None and first in seen:
        seen.remove(first)
        seen.insert(0, first)
    return seen


def heatmap_column_order(train_groups: Sequence[str], relevant_group: Optional[str] = None) -> list[int]:
    """Training indices in heatmap column order: ``relevant_group``'s examples first, then
    the other groups in order of first appearance; original order inside each group.

    With ``relevant_group=None`` (or a group absent from ``train_groups``) the columns are
    only grouped, in order of first appearance."""
    rank = {g: i for i, g in enumerate(group_order(train_groups, relevant_group))}
    return sorted(range(len(train_groups)), key=lambda j: (rank[train_groups[j]], j))


def group_spans(ordered_groups: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(group, start, stop)`` for each run of equal consecutive groups."""
    spans: list[tuple[str, int, int]] = []
    start = 0
    for i in range(1, len(ordered_groups) + 1):
        if i == len(ordered_groups) or ordered_groups[i] != ordered_groups[start]:
            spans.append((ordered_groups[start], start, i))
            start = i
    return spans


def _average_ranks(row: np.ndarray) -> np.ndarray:
    """0-based ranks of ``row`` ascending, ties given their average rank."""
    n = row.shape[0]
    order = np.argsort(row, kind="stable")
    sorted_vals = row[order]
    starts = np.concatenate(([0], np.flatnonzero(sorted_vals[1:] != sorted_vals[:-1]) + 1))
    stops = np.concatenate((starts[1:], [n]))
    out = np.empty(n, dtype=np.float64)
    out[order] = np.repeat((starts + stops - 1) / 2.0, stops - starts)
    return out


def normalize_rows(scores: Any, normalize: str = "rank", rank_by: str = "score") -> np.ndarray:
    """Each test row of ``scores`` mapped to ``[0, 1]``, 1 = most helpful (see the module
    docstring). ``normalize``: ``"rank"`` or ``"minmax"``; ``rank_by``: ``"score"`` or
    ``"abs"`` (normalise ``|score|``)."""
    if normalize not in ("rank", "minmax"):
        raise ValueError(f"normalize must be 'rank' or 'minmax', got {normalize!r}")
    if rank_by not in ("score", "abs"):
        raise ValueError(f"rank_by must be 'score' or 'abs', got {rank_by!r}")
    arr = _as_array(scores)
    key = np.abs(arr) if rank_by == "abs" else arr
    n_train = arr.shape[1]
    if normalize == "rank":
        if n_train == 1:
            return np.ones_like(key)
        return np.stack([_average_ranks(r) for r in key]) / (n_train - 1) if key.shape[0] else key.copy()
    low = key.min(axis=1, keepdims=True) if n_train else key
    span = key.max(axis=1, keepdims=True) - low if n_train else key
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(span > 0, (key - low) / np.where(span > 0, span, 1.0), 0.5)
    return out


# --------------------------------------------------------------------------- Fig. 2

def heatmap_figure(scores_by_method: Mapping[str, Any], train_groups: Sequence[str],
                   relevant_group: Optional[str], path: str | Path, *,
                   test_groups: Optional[Sequence[str]] = None, normalize: str = "rank",
                   rank_by: str = "score", title: Optional[str] = None, dpi: int = 120) -> Path:
    """The paper's Fig. 2: one panel per method showing its ``[n_test, n_train]`` scores as
    an image, training examples on the x axis, test examples on the y axis.

    Args:
        scores_by_method: ``{method: scores}`` (tensor or array), all of one shape
            ``[n_test, n_train]``, columns following ``train_groups``.
        train_groups: the ground-truth group of every training example.
        relevant_group: the group whose columns come first (e.g. ``"harmful"``), with a
            vertical line where it ends; ``None`` only groups the columns.
        path: the PNG to write (atomically).
        test_groups: the test examples' groups; when given, rows are grouped the same way
            (in the column groups' order) with horizontal lines between groups.
        normalize: per-row normalisation, ``"rank"`` (default) or ``"minmax"``.
        rank_by: ``"score"`` or ``"abs"``.
        title: the figure's title.
        dpi: resolution.

    Returns:
        ``path``.
    """
    if not scores_by_method:
        raise ValueError("heatmap_figure needs at least one method's scores")
    arrays = {m: _as_array(s, f"scores of {m}") for m, s in scores_by_method.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"all score matrices must have one shape, got {sorted(shapes)}")
    n_test, n_train = next(iter(shapes))
    if n_test == 0 or n_train == 0:
        raise ValueError(f"cannot draw an empty score matrix (shape {(n_test, n_train)})")
    if len(train_groups) != n_train:
        raise ValueError(f"train_groups has {len(train_groups)} entries but the scores have {n_train} columns")
    if test_groups is not None and len(test_groups) != n_test:
        raise ValueError(f"test_groups has {len(test_groups)} entries but the scores have {n_test} rows")

    cols = heatmap_column_order(train_groups, relevant_group)
    ordered_groups = [train_groups[j] for j in cols]
    col_spans = group_spans(ordered_groups)
    if test_groups is not None:
        first = group_order(list(ordered_groups) + list(test_groups))
        rank = {g: i for i, g in enumerate(first)}
        rows = sorted(range(n_test), key=lambda i: (rank[test_groups[i]], i))
        row_spans = group_spans([test_groups[i] for i in rows])
    else:
        rows = list(range(n_test))
        row_spans = []

    n = len(arrays)
    ncols = 2 if n == 4 else min(n, 3)
    nrows = (n + ncols - 1) // ncols
    fig = _new_figure(4.2 * ncols + 1.2, 3.9 * nrows + (0.4 if title else 0.0), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    # the relevant group's block ends at the first span's stop (a red line), when it leads
    relevant_stop = col_spans[0][2] if relevant_group is not None and col_spans and \
        col_spans[0][0] == relevant_group else None
    for k, (method, arr) in enumerate(arrays.items()):
        ax = axes[k // ncols][k % ncols]
        data = normalize_rows(arr, normalize, rank_by)[np.ix_(rows, cols)]
        image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(method_label(method), fontsize=11)
        for _, _, stop in col_spans[:-1]:
            relevant_edge = stop == relevant_stop
            ax.axvline(stop - 0.5, color="red" if relevant_edge else "white",
                       linewidth=1.6 if relevant_edge else 0.5)
        for _, _, stop in row_spans[:-1]:
            ax.axhline(stop - 0.5, color="white", linewidth=0.5)
        if len(col_spans) <= 12:
            ax.set_xticks([(a + b - 1) / 2 for _, a, b in col_spans])
            ax.set_xticklabels([textwrap.shorten(g, 18, placeholder="…") for g, _, _ in col_spans],
                               rotation=45 if len(col_spans) > 2 else 0, ha="right" if len(col_spans) > 2 else "center",
                               fontsize=7)
        else:
            ax.set_xticks([])
        if row_spans and len(row_spans) <= 12:
            ax.set_yticks([(a + b - 1) / 2 for _, a, b in row_spans])
            ax.set_yticklabels([textwrap.shorten(g, 14, placeholder="…") for g, _, _ in row_spans], fontsize=7)
        else:
            ax.set_yticks([])
        ax.set_xlabel(f"training examples ({n_train})", fontsize=8)
        ax.set_ylabel(f"test examples ({n_test})", fontsize=8)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    label = ("per-row rank (1 = top-ranked)" if normalize == "rank" else "per-row min-max (1 = highest)")
    if rank_by == "abs":
        label += ", |score|"
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.85, label=label)
    if title:
        fig.suptitle(title, fontsize=12)
    return _save_png(fig, path, dpi)


# --------------------------------------------------------------------------- Fig. 1

def _excerpt(text: str, max_chars: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= max_chars else flat[: max_chars - 1].rstrip() + "…"


def _relevant(relevant: Optional[Relevance], test_example: Example, train_example: Example) -> bool:
    return bool(relevant(test_example, train_example)) if relevant is not None else \
        test_example.group == train_example.group


class TopExamples(dict):
    """``{method: top-ranked training example}`` (a dict) whose ``tied_with[method]`` counts
    the other training examples sharing that top score (0 = no tie)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tied_with: dict[str, int] = {}


def top_by_method(scores_by_method: Mapping[str, Any], train: Sequence[Example], test_index: int,
                  rank_by: str = "score") -> TopExamples:
    """Each method's top-ranked training example for test example ``test_index``
    (ranking as in :func:`llm_influence.evaluation.metrics.rank_training`: descending score,
    ties to the lower training index), with how many others tie with it
    (:attr:`TopExamples.tied_with`, shown by :func:`showcase_markdown`)."""
    out = TopExamples()
    for method, scores in scores_by_method.items():
        arr = _as_array(scores, f"scores of {method}")
        if arr.shape[1] != len(train):
            raise ValueError(f"scores of {method} have {arr.shape[1]} columns but there are {len(train)} "
                             "training examples")
        if not 0 <= test_index < arr.shape[0]:
            raise ValueError(f"test_index {test_index} out of range for {arr.shape[0]} test examples")
        row = arr[test_index:test_index + 1]
        out[method] = train[int(rank_training(row, rank_by)[0, 0])]
        out.tied_with[method] = int((tie_ranks(row, rank_by)[0] == 1).sum()) - 1
    return out


def _tie_note(top_by_method: Mapping[str, Example], method: str) -> str:
    n = getattr(top_by_method, "tied_with", {}).get(method, 0)
    return f" (tied with {n} other{'s' if n > 1 else ''}; the first in training-file order is shown)" if n else ""


def showcase_markdown(test_example: Example, top_by_method: Mapping[str, Example], *,
                      relevant: Optional[Relevance] = None, max_chars: int = 160) -> str:
    """The paper's Fig. 1 as Markdown: the test example (prompt and response excerpts,
    group) and a table with each method's top-ranked training example (prompt excerpt,
    group, whether it is relevant: by default, same group as the test example), noting a
    top score tied with other training examples (a :class:`TopExamples` from
    :func:`top_by_method`)."""
    lines = [
        f"Test example `{md_escape(test_example.id)}` (group: {md_escape(test_example.group)})",
        "",
        f"> **Prompt:** {md_escape(_excerpt(test_example.prompt, max_chars))}",
        ">",
        f"> **Response:** {md_escape(_excerpt(test_example.response, max_chars))}",
        "",
        "| Method | Top-ranked training example (prompt) | Group | Correct |",
        "|:---|:---|:---|:---|",
    ]
    for method, ex in top_by_method.items():
        ok = _relevant(relevant, test_example, ex)
        lines.append(f"| {md_escape(method_label(method))} | {md_escape(_excerpt(ex.prompt, max_chars))}"
                     f"{_tie_note(top_by_method, method)} | {md_escape(ex.group)} | {'yes' if ok else 'no'} |")
    return "\n".join(lines) + "\n"


def showcase_figure(test_example: Example, top_by_method: Mapping[str, Example], path: str | Path, *,
                    relevant: Optional[Relevance] = None, max_chars: int = 300, width_chars: int = 125,
                    dpi: int = 120) -> str:
    """The paper's Fig. 1 as a PNG: a box with the test example (prompt and response
    excerpts), then one box per method with its top-ranked training example (prompt
    excerpt and group), green edge and "correct" when relevant (default: same group as
    the test example), red and "incorrect" otherwise, with the tie note of
    :func:`showcase_markdown`. Written atomically to ``path``.

    Returns:
        The same content as Markdown (:func:`showcase_markdown`), for the report.
    """
    boxes: list[tuple[str, str]] = []  # (text, edge colour)
    test_text = (f"TEST EXAMPLE  {test_example.id}  (group: {test_example.group})\n"
                 + textwrap.fill("Prompt: " + _excerpt(test_example.prompt, max_chars), width_chars) + "\n"
                 + textwrap.fill("Response: " + _excerpt(test_example.response, max_chars), width_chars))
    boxes.append((test_text, "#333333"))
    for method, ex in top_by_method.items():
        ok = _relevant(relevant, test_example, ex)
        head = f"{method_label(method)}: top-ranked training example {ex.id}  (group: {ex.group})  " \
               f"{'correct' if ok else 'incorrect'}{_tie_note(top_by_method, method)}"
        boxes.append((head + "\n" + textwrap.fill("Prompt: " + _excerpt(ex.prompt, max_chars), width_chars),
                      "#2e7d32" if ok else "#c62828"))
    heights = [t.count("\n") + 1.6 for t, _ in boxes]
    line_in = 0.165
    fig = _new_figure(9.5, line_in * sum(heights) + 0.3)
    axes = fig.subplots(len(boxes), 1, squeeze=False, gridspec_kw={"height_ratios": heights, "hspace": 0.08})
    for ax, (text, colour) in zip(axes[:, 0], boxes):
        ax.set_axis_off()
        ax.text(0.005, 0.92, text, transform=ax.transAxes, va="top", ha="left", fontsize=8.5, family="DejaVu Sans",
                parse_math=False, wrap=False,
                bbox={"boxstyle": "round,pad=0.4", "facecolor": "white", "edgecolor": colour, "linewidth": 1.5})
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01)
    _save_png(fig, path, dpi)
    return showcase_markdown(test_example, top_by_method, relevant=relevant, max_chars=max_chars)
