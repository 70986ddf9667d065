"""The self-contained HTML explorer: one ``report.html`` that opens offline from disk.

:func:`write_html_report` reads run directories (``DIR/runs/*`` of a ``reproduce`` output,
or explicit ones), and writes one HTML file with inline CSS and JavaScript and every datum
embedded: pick a task, checkpoint and method; a heatmap of the scores; click a test
example (list) or a heatmap cell to see its full prompt/response and its top-k training
examples with full text, score, shared rank, group and ground-truth mark; the Acc/Cover
tables with their 95 % intervals; for backdoor tasks, whether the backdoor is installed at
each checkpoint checked (the compliance numbers of ``RUN/backdoor/epoch-N.json``, the same
as ``results.json`` and ``report.md``; a file made from another adapter is skipped); every
figure PNG of the output directory as a ``data:`` URI. With ``tokens`` > 0, RepT's entries
carry its token-level attribution: for each listed training example its ``tokens`` best
tokens against the selected test example (:func:`~llm_influence.token_attribution.explorer_tokens`,
cached beside the scores file; the page shows them under the example's text).

Conventions:

* Scores are ``RUN/scores/epoch-N/METHOD.safetensors`` ``[n_test, n_train]``, **higher =
  more helpful**. The top-k list is :func:`~llm_influence.evaluation.metrics.rank_training`
  with the run's ``rank_by`` (from ``RUN/metrics.json``, default ``"score"``): descending,
  tied scores listed in training-file order, each entry showing the competition rank its
  run of ties shares (:func:`~llm_influence.evaluation.metrics.tie_ranks`; ``3=`` and
  "tied" on the page). Acc/Cover and their 95 % bootstrap intervals are recomputed with
  :func:`~llm_influence.evaluation.metrics.evaluate_scores` against the run's ground truth
  (same group; ties count as the expected value over a random order of the tie), so they
  equal ``RUN/metrics.json``.
* Heatmap cells are per-row rank percentiles in ``[0, 1]`` (1 = the row's top-ranked
  training example; :func:`~llm_influence.report.figures.normalize_rows`), quantised to
  0..255. Rows (test) and columns (train) are ordered by group (order of first appearance in
  train; original order inside a group). A matrix larger than ``max_side`` x ``max_side``
  is aggregated into blocks of consecutive rows/columns (cell = mean percentile of the
  block) and the page says so.
* Safety: every dataset string reaches the page only inside one
  ``<script type="application/json">`` block, with ``<``, ``>`` and ``&`` written as
  ``\\u003c``, ``\\u003e``, ``\\u0026`` (so ``</script>`` or ``<!--`` in a prompt cannot end
  the block), and the page's script renders text with ``textContent`` only. A
  Content-Security-Policy allows only the page's own script (by hash), inline styles and
  ``data:`` images: no network, no injected script.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..attribute import read_scores
from ..errors import UserError
from ..evaluation.metrics import RANK_BY_CHOICES, evaluate_scores, rank_training, tie_ranks
from ..io_utils import atomic_path
from ..progress import log, progress
from ..rundir import EPOCH_RE, RunDir
from .figures import group_order, normalize_rows

HTML_FORMAT = 1
DEFAULT_TOP_K = 10
DEFAULT_MAX_SIDE = 256          # heatmap rows/columns embedded per matrix before aggregation
MAX_TEXT_CHARS = 20_000         # longer prompts/responses are cut (and marked) in the page
MAX_NOTE_CHARS = 30_000         # study Markdown shown beside its figure


# --------------------------------------------------------------------------- data

def _cut(text: str) -> str:
    if len(text) <= MAX_TEXT_CHARS:
        return text
    return text[:MAX_TEXT_CHARS] + f"\n[... {len(text) - MAX_TEXT_CHARS} more characters not shown]"


def _num(x: float, digits: int = 6) -> Optional[float]:
    """A float rounded to ``digits`` significant digits for JSON; None for NaN/Inf."""
    x = float(x)
    if not np.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _interval(ci: Sequence[float]) -> list[Optional[float]]:
    """A ``(low, high)`` interval for JSON, exact; None for a NaN bound."""
    return [float(v) if np.isfinite(v) else None for v in ci]


def tied_flags(ranks: np.ndarray) -> np.ndarray:
    """``[n_test, n_train]`` bool from :func:`~llm_influence.evaluation.metrics.tie_ranks`:
    whether the entry at each position shares its score with another position."""
    tied = np.zeros(ranks.shape, dtype=bool)
    same = ranks[:, 1:] == ranks[:, :-1]
    tied[:, 1:] |= same
    tied[:, :-1] |= same
    return tied


def block_mean(values: np.ndarray, row_block: int, col_block: int) -> np.ndarray:
    """Mean of each ``row_block`` x ``col_block`` block of a 2-D array (the last block of a
    dimension may be smaller): ``[ceil(R / row_block), ceil(C / col_block)]``."""
    rows, cols = values.shape
    r_starts = np.arange(0, rows, row_block)
    c_starts = np.arange(0, cols, col_block)
    sums = np.add.reduceat(np.add.reduceat(values, r_starts, axis=0), c_starts, axis=1)
    r_sizes = np.diff(np.append(r_starts, rows))
    c_sizes = np.diff(np.append(c_starts, cols))
    return sums / np.outer(r_sizes, c_sizes)


def heatmap_cells(scores: np.ndarray, test_order: Sequence[int], train_order: Sequence[int], rank_by: str,
                  max_side: int) -> dict[str, Any]:
    """The heatmap of one score matrix: rank percentiles (1 = top) in group order,
    aggregated to at most ``max_side`` per side, as base64 uint8 (row-major)."""
    pct = normalize_rows(scores, "rank", rank_by)[np.ix_(list(test_order), list(train_order))]
    n_test, n_train = pct.shape
    row_block = max(1, -(-n_test // max_side))
    col_block = max(1, -(-n_train // max_side))
    cells = block_mean(pct, row_block, col_block) if (row_block > 1 or col_block > 1) else pct
    quantised = np.clip(np.rint(cells * 255.0), 0, 255).astype(np.uint8)
    return {"rows": int(cells.shape[0]), "cols": int(cells.shape[1]), "row_block": row_block,
            "col_block": col_block, "data": base64.b64encode(quantised.tobytes()).decode("ascii")}


def _rank_by(run: RunDir) -> str:
    if run.metrics_path.is_file():
        try:
            value = json.loads(run.metrics_path.read_text(encoding="utf-8")).get("rank_by", "score")
        except json.JSONDecodeError:
            value = "score"
        if value in RANK_BY_CHOICES:
            return value
    return "score"


def _score_files(run: RunDir) -> list[tuple[str, Path]]:
    root = run.path / "scores"
    if not root.is_dir():
        return []
    out = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir() and EPOCH_RE.match(p.name)),
                         key=lambda p: int(p.name[6:])):
        out += [(folder.name, f) for f in sorted(folder.glob("*.safetensors"))]
    return out


def _examples(examples, cut: bool = True) -> dict[str, list]:
    return {"ids": [e.id for e in examples], "groups": [e.group for e in examples],
            "prompts": [_cut(e.prompt) for e in examples], "responses": [_cut(e.response) for e in examples]}


def method_payload(scores: np.ndarray, relevant: np.ndarray, rank_by: str, top_k: int,
                   test_order: Sequence[int], train_order: Sequence[int], max_side: int) -> dict[str, Any]:
    """Everything the page shows for one scores file: Acc/Cover with their 95 % intervals
    (overall) and per test example, the top-k training indices, scores, shared ranks, tie
    marks and ground-truth marks per test example, and the heatmap."""
    m = evaluate_scores(scores, relevant, rank_by=rank_by)
    k = min(top_k, scores.shape[1])
    order = np.asarray(rank_training(scores, rank_by=rank_by))[:, :k]
    ranks = tie_ranks(scores, rank_by=rank_by)
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_rel = np.take_along_axis(relevant, order, axis=1)
    return {
        "acc": m.acc, "cover": m.cover, "acc_ci95": _interval(m.acc_ci95), "cover_ci95": _interval(m.cover_ci95),
        "n_scored": m.n_scored, "n_skipped": m.n_skipped,
        "hit": [_num(x) for x in m.per_test_hit], "cover_per_test": [_num(x, 4) for x in m.per_test_cover],
        "k": [int(x) for x in m.k],
        "topk": order.tolist(), "topk_scores": [[_num(x) for x in row] for row in top_scores],
        "topk_relevant": top_rel.astype(int).tolist(),
        "topk_rank": ranks[:, :k].tolist(), "topk_tied": tied_flags(ranks)[:, :k].astype(int).tolist(),
        "heatmap": heatmap_cells(scores, test_order, train_order, rank_by, max_side),
    }


def backdoor_payload(run: RunDir, task_name: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The backdoor checks of a run (``RUN/backdoor/epoch-N.json``, :mod:`..evaluation.backdoor`),
    ascending by epoch: ``[{checkpoint, epochs, triggered_compliance, triggered_compliance_mean,
    clean_compliance, fires, thresholds, per_group, max_new_tokens, file, verdict}]``, and the
    files skipped (unreadable, or made from another adapter than the checkpoint's)."""
    from ..evaluation.backdoor import RESULT_KEYS, format_share, trigger_groups_text, verdict
    from ..features.store import adapter_digest

    folder = run.path / "backdoor"
    if not folder.is_dir():
        return [], []
    found = []
    for path in folder.glob("epoch-*.json"):
        m = EPOCH_RE.match(path.stem)
        if m:
            found.append((int(m.group(1)), path))
    checks, skipped = [], []
    for _, path in sorted(found):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            adapter = run.checkpoints_root / path.stem
            current = adapter_digest(adapter) if adapter.is_dir() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            skipped.append(f"{path}: unreadable backdoor check ({exc}); not shown")
            continue
        if not isinstance(record, dict) or record.get("adapter_sha256") != current:
            skipped.append(f"{path}: backdoor check of another adapter than {run.checkpoints_root / path.stem} "
                           "(stale); not shown")
            continue
        entry = {k: record.get(k) for k in RESULT_KEYS}
        entry["file"] = str(path.relative_to(run.path))
        entry["verdict"] = verdict(task_name, record)
        entry["text"] = {"trigger_groups": trigger_groups_text(record),   # formatted as in report.md
                         "triggered": format_share(record.get("triggered_compliance")),
                         "clean": format_share(record.get("clean_compliance"))}
        checks.append(entry)
    return checks, skipped


def run_payload(run_path: str | Path, top_k: int = DEFAULT_TOP_K, max_side: int = DEFAULT_MAX_SIDE,
                advance=None, tokens: int = 0) -> dict[str, Any]:
    """One run directory's part of the page (see :func:`write_html_report`); ``tokens`` > 0
    adds RepT's token view (``topk_tokens``: ``[test][rank] -> [{position, token, score}]``)."""
    run = RunDir(run_path)
    task = run.load_task()
    files = _score_files(run)
    if not files:
        raise UserError(f"{run.path}: no scores files (RUN/scores/epoch-N/METHOD.safetensors); "
                        f"run `llm-influence attribute --run {run.path}` first")
    rank_by = _rank_by(run)
    train_ids = [e.id for e in task.train]
    test_ids = [e.id for e in task.test]
    relevant = np.array(task.relevance_matrix(), dtype=bool).reshape(len(test_ids), len(train_ids))
    groups = group_order([e.group for e in task.train] + [e.group for e in task.test])
    rank = {g: i for i, g in enumerate(groups)}
    train_order = sorted(range(len(train_ids)), key=lambda j: (rank[task.train[j].group], j))
    test_order = sorted(range(len(test_ids)), key=lambda i: (rank[task.test[i].group], i))
    checkpoints: dict[str, list[dict[str, Any]]] = {}
    skipped: list[str] = []
    for checkpoint, path in files:
        try:
            tensor, meta = read_scores(path)
        except UserError as exc:
            skipped.append(str(exc))
            if advance:
                advance()
            continue
        if meta.get("train_ids") != train_ids or meta.get("test_ids") != test_ids:
            skipped.append(f"{path}: scores were computed for other examples than the run's (stale); not shown")
        else:
            scores = tensor.detach().cpu().double().numpy()
            if not np.isfinite(scores).all():
                skipped.append(f"{path}: non-finite scores; not shown")
            else:
                entry = {"name": meta.get("method", path.stem), "seconds": _num(meta.get("seconds") or 0.0, 4),
                         "file": str(path.relative_to(run.path))}
                try:
                    entry.update(method_payload(scores, relevant, rank_by, top_k, test_order, train_order, max_side))
                    checkpoints.setdefault(checkpoint, []).append(entry)
                except ValueError as exc:   # e.g. no test example has a relevant training example
                    skipped.append(f"{path}: {exc}; not shown")
                else:
                    if tokens > 0 and entry["name"] == "rept":
                        entry["topk_tokens"], problem = _token_view(run, checkpoint, entry["topk"], tokens)
                        if problem:
                            skipped.append(f"{path}: token view not shown ({problem})")
        if advance:
            advance()
    backdoor, stale = backdoor_payload(run, task.name)
    skipped += stale
    for msg in skipped:
        log(f"report: skipped {msg}")
    return {
        "name": task.name, "run_dir": str(run.path), "rank_by": rank_by, "top_k": top_k, "backdoor": backdoor,
        "groups": groups, "train": _examples(task.train), "test": _examples(task.test),
        "train_order": train_order, "test_order": test_order,
        "checkpoints": [{"name": c, "methods": ms} for c, ms in checkpoints.items()],
        "skipped": skipped,
    }


def _token_view(run: RunDir, checkpoint: str, topk: list[list[int]],
                tokens: int) -> tuple[Optional[list], Optional[str]]:
    """RepT's token view for the page, or ``(None, reason)`` when the run cannot give it (e.g.
    its checkpoint's adapter is not there: a copied results folder without ``runs/``)."""
    from ..token_attribution import explorer_tokens

    try:
        return explorer_tokens(run, checkpoint, topk, tokens), None
    except (UserError, OSError, KeyError, ValueError) as exc:
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def find_runs(out_dir: Path, runs: Optional[Sequence[str | Path]] = None) -> list[Path]:
    """The run directories: ``runs`` when given, else ``out_dir/runs/*`` with a config.json."""
    if runs:
        paths = [Path(r) for r in runs]
        for p in paths:
            if not (p / "config.json").is_file():
                raise UserError(f"--runs {p}: not a run directory (no config.json)")
        return paths
    root = out_dir / "runs"
    found = sorted(p for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    if not found:
        raise UserError(f"{out_dir}: no run directories under {root} (give --runs RUN ... or a reproduce output)")
    return found


def _results_order(out_dir: Path) -> tuple[dict[str, Any], list[str]]:
    path = out_dir / "results.json"
    if not path.is_file():
        return {}, []
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    return results, list(results.get("tasks", {}))


def figures_payload(out_dir: Path, results: dict[str, Any]) -> list[dict[str, str]]:
    """Every PNG in ``out_dir``, ``out_dir/figures`` and ``out_dir/studies``, as data URIs,
    captioned from results.json where it names them; a study's ``NAME.md`` rides along."""
    captions: dict[str, str] = {}
    for title, rel in (results.get("figures") or {}).items():
        captions[str(Path(rel))] = title
    for name, study in (results.get("studies") or {}).items():
        for rel in study.get("figures", []):
            captions.setdefault(str(Path(rel)), f"study: {name}")
    pngs: list[Path] = []
    for folder in (out_dir / "figures", out_dir, out_dir / "studies"):
        if folder.is_dir():
            pngs += sorted(folder.glob("*.png"))
    out = []
    for png in pngs:
        data = png.read_bytes()
        if data[:8] != b"\x89PNG\r\n\x1a\n":
            continue
        rel = str(png.relative_to(out_dir))
        note_path = png.with_suffix(".md")
        note = note_path.read_text(encoding="utf-8", errors="replace")[:MAX_NOTE_CHARS] if note_path.is_file() else ""
        out.append({"file": rel, "caption": captions.get(rel, rel), "note": note,
                    "src": "data:image/png;base64," + base64.b64encode(data).decode("ascii")})
    return out


def build_payload(out_dir: str | Path, runs: Optional[Sequence[str | Path]] = None, *, top_k: int = DEFAULT_TOP_K,
                  max_side: int = DEFAULT_MAX_SIDE, tokens: int = 0,
                  token_runs: Optional[Sequence[str | Path]] = None) -> dict[str, Any]:
    """The page's data (a JSON-ready dict): tasks, figures and the run summary. ``tokens``:
    RepT's token view (tokens per listed training example; 0 = none) for the runs in
    ``token_runs`` (None = every run)."""
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: must be at least 1")
    if tokens < 0:
        raise UserError(f"--tokens {tokens}: must be at least 0")
    with_tokens = None if token_runs is None else {Path(r).resolve() for r in token_runs}
    if max_side < 1:
        raise UserError(f"max_side {max_side}: must be at least 1")
    out = Path(out_dir)
    paths = find_runs(out, runs)
    results, order = _results_order(out)
    n_files = sum(len(_score_files(RunDir(p))) for p in paths)
    if n_files == 0:
        raise UserError(f"{out}: the runs have no scores files; run `llm-influence attribute` (or reproduce) first")
    tasks = []
    with progress(n_files, "report") as advance:
        for p in paths:
            if _score_files(RunDir(p)):
                n = tokens if with_tokens is None or Path(p).resolve() in with_tokens else 0
                tasks.append(run_payload(p, top_k=top_k, max_side=max_side, advance=advance, tokens=n))
    if not any(t["checkpoints"] for t in tasks):
        raise UserError(f"{out}: no readable scores file matches its run's examples; nothing to show")
    tasks = [t for t in tasks if t["checkpoints"]]
    preferred = {m: i for i, m in enumerate(results.get("methods") or [])}
    for t in tasks:   # the benchmark's method order, then the others alphabetically
        for c in t["checkpoints"]:
            c["methods"].sort(key=lambda m: (preferred.get(m["name"], len(preferred)), m["name"]))
    rank = {name: i for i, name in enumerate(order)}
    tasks.sort(key=lambda t: (rank.get(t["name"], len(rank)), t["name"]))
    seen: dict[str, int] = {}
    for t in tasks:
        seen[t["name"]] = seen.get(t["name"], 0) + 1
    for t in tasks:   # two runs of the same task: label them by folder
        t["label"] = t["name"] if seen[t["name"]] == 1 else f"{t['name']} ({Path(t['run_dir']).name})"
    return {
        "format": HTML_FORMAT, "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "out_dir": str(out),
        "profile": results.get("profile"), "model": results.get("model"), "machine": results.get("machine"),
        "max_side": max_side, "tasks": tasks, "figures": figures_payload(out, results),
    }


# --------------------------------------------------------------------------- HTML

def embed_json(obj: Any) -> str:
    """JSON for a ``<script type="application/json">`` block: ``<``, ``>``, ``&`` and the
    line separators are ``\\u`` escapes, so no string in ``obj`` can close the block or
    open a comment; ``JSON.parse`` restores them exactly."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def render_html(payload: dict[str, Any]) -> str:
    """The whole page as a string."""
    script_hash = base64.b64encode(hashlib.sha256(_JS.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; script-src 'sha256-{script_hash}'; style-src 'unsafe-inline'; "
           "img-src data:; base-uri 'none'; form-action 'none'")
    return (_HTML_HEAD.replace("@CSP@", csp).replace("@CSS@", _CSS)
            + '<script id="report-data" type="application/json">' + embed_json(payload) + "</script>\n"
            + "<script>" + _JS + "</script>\n</body>\n</html>\n")


def write_html_report(out_dir: str | Path, runs: Optional[Sequence[str | Path]] = None, *,
                      top_k: int = DEFAULT_TOP_K, html_path: Optional[str | Path] = None,
                      max_side: int = DEFAULT_MAX_SIDE, tokens: int = 0,
                      token_runs: Optional[Sequence[str | Path]] = None) -> Path:
    """Write the explorer for ``out_dir`` (a reproduce output: runs in ``out_dir/runs/*``,
    or the explicit ``runs``) to ``html_path`` (default ``out_dir/report.html``),
    atomically; returns the path. ``tokens``/``token_runs``: RepT's token view
    (:func:`build_payload`). Raises :class:`UserError` when there is nothing to show."""
    out = Path(out_dir)
    if not runs and not out.is_dir():
        raise UserError(f"--out {out}: no such directory")
    payload = build_payload(out, runs, top_k=top_k, max_side=max_side, tokens=tokens, token_runs=token_runs)
    target = Path(html_path) if html_path else out / "report.html"
    with atomic_path(target) as tmp:
        tmp.write_text(render_html(payload), encoding="utf-8")
    return target


def extract_payload(html: str) -> dict[str, Any]:
    """The data block of a written page, parsed (for tests and tools)."""
    start_tag = '<script id="report-data" type="application/json">'
    start = html.index(start_tag) + len(start_tag)
    end = html.index("</script>", start)
    return json.loads(html[start:end])


_HTML_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="@CSP@">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>llm-influence report</title>
<style>@CSS@</style>
</head>
<body>
<header><h1>llm-influence: which training examples helped?</h1><div id="meta"></div></header>
<noscript>This report needs JavaScript (it runs only the page's own script, offline).</noscript>
<nav id="controls">
  <label>task <select id="task-select"></select></label>
  <label>checkpoint <select id="checkpoint-select"></select></label>
  <label>method <select id="method-select"></select></label>
  <span id="method-summary"></span>
</nav>
<div id="warnings"></div>
<main>
<section id="heatmap-section">
  <h2>Scores heatmap</h2>
  <p class="hint" id="heatmap-note"></p>
  <div id="heatmap-row"><div id="heatmap-wrap"><canvas id="heatmap" width="900" height="400"></canvas>
  <div id="heatmap-legend"></div></div>
  <div id="cell-info"></div></div>
</section>
<section id="explore">
  <div id="test-list-wrap"><h2>Test examples</h2><div id="test-list"></div></div>
  <div id="detail"><h2>Selected test example</h2><div id="test-detail"></div>
    <h3 id="topk-title">Top training examples</h3>
    <p class="hint" id="tie-rule">Ties: training examples with equal scores share a rank (shown as "3=" and marked
    "tied") and are listed in training-file order; Acc and Cover count the expected value over a uniformly random
    order of the tie.</p><ol id="topk-list"></ol></div>
</section>
<section id="metrics-section"><h2>Acc / Cover</h2><div id="metrics"></div></section>
<section id="backdoor-section" hidden><h2>Is the backdoor installed?</h2><div id="backdoor"></div></section>
<section id="figures-section"><h2>Figures and studies</h2><div id="figures"></div></section>
</main>
"""

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9;font-size:14px}
header{background:#1f3a5f;color:#fff;padding:10px 18px}header h1{font-size:20px;margin:0 0 4px}
#meta{font-size:12px;opacity:.85}
nav{position:sticky;top:0;z-index:5;background:#e8edf4;padding:8px 18px;border-bottom:1px solid #c9d2de;display:flex;gap:18px;align-items:center;flex-wrap:wrap}
nav select{font-size:14px;padding:2px 4px}#method-summary{font-weight:600}
main{padding:8px 18px}section{background:#fff;border:1px solid #d9dee6;border-radius:6px;padding:10px 14px;margin:12px 0}
h2{font-size:17px;margin:4px 0 8px}h3{font-size:15px;margin:12px 0 6px}.hint{color:#5b6574;font-size:12px;margin:2px 0 6px}
#heatmap-row{display:flex;gap:14px;align-items:flex-start}#heatmap-wrap{flex:0 0 auto;max-width:70%}#cell-info{flex:1;min-width:0;font-size:13px}
#heatmap{cursor:crosshair;max-width:100%;border:1px solid #ccd}#heatmap-legend{font-size:12px;color:#444;margin-top:4px}
.swatch{display:inline-block;width:140px;height:10px;vertical-align:middle;margin:0 6px;background:linear-gradient(90deg,#440154,#3b528b,#21918c,#5ec962,#fde725)}
#explore{display:flex;gap:14px;align-items:flex-start}
#test-list-wrap{flex:0 0 34%;max-height:760px;overflow:auto}#detail{flex:1;min-width:0}
.test-row{padding:4px 6px;border-bottom:1px solid #eef0f3;cursor:pointer;display:flex;gap:6px;align-items:baseline}
.test-row:hover{background:#f0f4fa}.test-row.selected{background:#dbe8fb;outline:1px solid #7aa5e6}
.tid{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:nowrap}
.grp{font-size:11px;background:#eef1f6;border-radius:3px;padding:0 4px;white-space:nowrap;color:#334}
.excerpt{color:#444;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;flex:1;min-width:0}
.mark{font-weight:700;width:1.2em;text-align:center}.ok{color:#1a7f37}.bad{color:#c62828}.na{color:#888}
.text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;background:#f7f8fa;border:1px solid #e3e6eb;border-radius:4px;padding:6px 8px;margin:2px 0 6px;max-height:260px;overflow:auto}
.label{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:#687385;margin-top:4px}
#topk-list{padding-left:0;list-style:none}.topk-row{border:1px solid #e1e5ea;border-left:5px solid #bbb;border-radius:4px;padding:6px 8px;margin:6px 0}
.topk-row.relevant{border-left-color:#2e9d4f}.topk-row.irrelevant{border-left-color:#d9534f}.topk-row.clicked{box-shadow:0 0 0 2px #f0b400}
.topk-head{display:flex;gap:10px;align-items:baseline;flex-wrap:wrap}.rank{font-weight:700}.tie{font-size:11px;color:#8a5a00;background:#fff4e5;border-radius:3px;padding:0 4px}.ci{color:#5b6574;font-size:12px}.score{font-family:ui-monospace,monospace}
.tokens{display:flex;gap:6px;flex-wrap:wrap}.token{font-family:ui-monospace,monospace;font-size:12px;background:#eef3fb;border-radius:3px;padding:0 4px;white-space:pre}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}th,td{border:1px solid #dde2e8;padding:3px 8px;text-align:right}
th{background:#f0f3f7}td:first-child,th:first-child{text-align:left}td.best{font-weight:700;background:#eef8ee}
figure{margin:10px 0 18px}figure img{max-width:100%;border:1px solid #e0e0e0}figcaption{font-size:13px;color:#333;margin-top:4px}
details pre{white-space:pre-wrap;font-size:12px;background:#f7f8fa;padding:6px}
#warnings div{background:#fff4e5;border:1px solid #f0c36d;padding:4px 8px;margin:6px 18px;font-size:12px}
"""

_JS = r"""
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const $ = (id) => document.getElementById(id);
  const state = { task: 0, checkpoint: 0, method: 0, test: null, clickedTrain: null };
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const LUT = [];
  for (let v = 0; v < 256; v++) {
    const t = (v / 255) * (VIRIDIS.length - 1), i = Math.min(Math.floor(t), VIRIDIS.length - 2), f = t - i;
    LUT.push(VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c))));
  }
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    if (attrs) for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  const pct = (x) => (x === null || x === undefined) ? "–" : (100 * x).toFixed(1);
  const ci = (c) => (c && c[0] !== null && c[1] !== null) ? "[" + pct(c[0]) + ", " + pct(c[1]) + "]" : "";
  const withCi = (x, c, unit) => pct(x) + (unit || "") + (ci(c) ? " " + ci(c) : "");   // "72.0 [65.1, 78.9]": value, 95 % interval
  const fmt = (x) => (x === null || x === undefined) ? "–" : Number(x).toPrecision(4);
  const oneLine = (s, n) => { const t = s.replace(/\s+/g, " ").trim(); return t.length > n ? t.slice(0, n) + "…" : t; };
  const task = () => DATA.tasks[state.task];
  const checkpoint = () => task().checkpoints[state.checkpoint];
  const method = () => checkpoint().methods[state.method];

  function fillSelect(sel, labels, index) {
    sel.replaceChildren();
    labels.forEach((lab, i) => { const o = el("option", { value: String(i) }, lab); sel.appendChild(o); });
    sel.value = String(index);
  }
  function setTask(i, keep) {   // keep: stay on the same checkpoint/method names when the new task has them
    const prevCk = keep ? checkpoint().name : null;
    const prevMethod = keep ? method().name : null;
    state.task = i;
    const cks = task().checkpoints.map((c) => c.name);
    state.checkpoint = Math.max(0, prevCk && cks.includes(prevCk) ? cks.indexOf(prevCk) : cks.length - 1);
    fillSelect($("checkpoint-select"), cks, state.checkpoint);
    state.test = null; state.clickedTrain = null;
    setCheckpoint(state.checkpoint, prevMethod);
  }
  function setCheckpoint(i, prevMethod) {
    const prev = prevMethod || (checkpoint() && method() ? method().name : null);
    state.checkpoint = i;
    const names = checkpoint().methods.map((m) => m.name);
    state.method = prev && names.includes(prev) ? names.indexOf(prev) : 0;
    fillSelect($("method-select"), names, state.method);
    render();
  }
  function setMethod(i) { state.method = i; render(); }

  function renderMeta() {
    const bits = [];
    if (DATA.profile) bits.push("profile " + DATA.profile);
    if (DATA.model) bits.push("model " + DATA.model);
    if (DATA.machine) bits.push(DATA.machine);
    bits.push("generated " + DATA.generated);
    bits.push("score convention: higher = the training example helped the test example more");
    $("meta").textContent = bits.join(" · ");
    const w = $("warnings");
    DATA.tasks.forEach((t) => t.skipped.forEach((s) => w.appendChild(el("div", null, "skipped: " + s))));
  }

  function renderSummary() {
    const m = method();
    $("method-summary").textContent = task().label + " · " + checkpoint().name + " · " + m.name + ": Acc " +
      withCi(m.acc, m.acc_ci95, "%") + ", Cover " + withCi(m.cover, m.cover_ci95, "%") + " (" + m.n_scored +
      " test examples scored, rank by " + task().rank_by + ")";
  }

  // ---------------------------------------------------------------- heatmap
  const LEFT = 110, TOP = 28;
  let geom = null;
  function renderHeatmap() {
    const t = task(), h = method().heatmap;
    const canvas = $("heatmap"), ctx = canvas.getContext("2d");
    const width = LEFT + Math.max(420, Math.min(760, h.cols * 10)) + 8;
    const cellW = (width - LEFT - 8) / h.cols;
    const cellH = Math.max(2, Math.min(14, 380 / h.rows));
    const height = TOP + h.rows * cellH + 6;
    canvas.width = width; canvas.height = height;
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, height);
    const bytes = atob(h.data);
    const off = document.createElement("canvas"); off.width = h.cols; off.height = h.rows;
    const octx = off.getContext("2d"), img = octx.createImageData(h.cols, h.rows);
    for (let i = 0; i < h.rows * h.cols; i++) {
      const c = LUT[bytes.charCodeAt(i)];
      img.data[4 * i] = c[0]; img.data[4 * i + 1] = c[1]; img.data[4 * i + 2] = c[2]; img.data[4 * i + 3] = 255;
    }
    octx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, LEFT, TOP, h.cols * cellW, h.rows * cellH);
    geom = { cellW, cellH, rows: h.rows, cols: h.cols, rb: h.row_block, cb: h.col_block };
    canvas.setAttribute("data-geom", JSON.stringify({ left: LEFT, top: TOP, cellW, cellH, rows: h.rows, cols: h.cols }));
    // group boundaries and labels (positions in examples, scaled by the block size)
    const nTrain = t.train.ids.length, nTest = t.test.ids.length;
    const xOf = (j) => LEFT + (j / nTrain) * h.cols * cellW, yOf = (i) => TOP + (i / nTest) * h.rows * cellH;
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 2; ctx.font = "11px sans-serif"; ctx.fillStyle = "#222";
    spans(t.train_order.map((j) => t.train.groups[j])).forEach(([g, a, b], k) => {
      if (a > 0) { ctx.beginPath(); ctx.moveTo(xOf(a), TOP); ctx.lineTo(xOf(a), TOP + h.rows * cellH); ctx.stroke(); }
      clipText(ctx, g, xOf(a) + 2, TOP - 6 - (k % 2) * 11, xOf(b) - xOf(a) - 4);
    });
    spans(t.test_order.map((i) => t.test.groups[i])).forEach(([g, a, b]) => {
      if (a > 0) { ctx.beginPath(); ctx.moveTo(LEFT, yOf(a)); ctx.lineTo(LEFT + h.cols * cellW, yOf(a)); ctx.stroke(); }
      if (yOf(b) - yOf(a) >= 10) clipText(ctx, g, 2, (yOf(a) + yOf(b)) / 2 + 4, LEFT - 6);
    });
    if (state.test !== null) {   // outline the selected test row
      const pos = t.test_order.indexOf(state.test), r = Math.floor(pos / h.row_block);
      ctx.strokeStyle = "#ff3b30"; ctx.lineWidth = 2;
      ctx.strokeRect(LEFT - 1, TOP + r * cellH - 1, h.cols * cellW + 2, cellH + 2);
    }
    const agg = h.row_block > 1 || h.col_block > 1;
    $("heatmap-note").textContent = "Rows: " + nTest + " test examples, columns: " + nTrain +
      " training examples, both ordered by group (white lines = group boundaries). Colour = rank of the score within its test row (top-ranked = yellow). " +
      (agg ? "Aggregated for size: each cell is the mean over a block of " + h.row_block + " test × " + h.col_block +
        " training examples (" + h.rows + " × " + h.cols + " cells shown). " : "Every score is shown (one cell per pair). ") +
      "Click a cell to select its test example.";
    $("heatmap-legend").replaceChildren(el("span", null, "lowest rank"), el("span", { class: "swatch" }), el("span", null, "highest rank in the row"));
  }
  function clipText(ctx, text, x, y, maxW) {
    if (maxW < 14) return;
    let s = text;
    while (s.length > 1 && ctx.measureText(s).width > maxW) s = s.slice(0, -2) + "…";
    ctx.fillText(s, x, y);
  }
  function spans(groups) {
    const out = []; let start = 0;
    for (let i = 1; i <= groups.length; i++) if (i === groups.length || groups[i] !== groups[start]) { out.push([groups[start], start, i]); start = i; }
    return out;
  }
  $("heatmap").addEventListener("click", (ev) => {
    if (!geom) return;
    const canvas = $("heatmap");   // offsetX/Y: from the padding edge, in CSS pixels
    const x = ev.offsetX * canvas.width / canvas.clientWidth, y = ev.offsetY * canvas.height / canvas.clientHeight;
    const c = Math.floor((x - LEFT) / geom.cellW), r = Math.floor((y - TOP) / geom.cellH);
    if (c < 0 || r < 0 || c >= geom.cols || r >= geom.rows) return;
    const t = task();
    const ti = t.test_order[Math.min(r * geom.rb, t.test_order.length - 1)];
    const tj = t.train_order[Math.min(c * geom.cb, t.train_order.length - 1)];
    const v = atob(method().heatmap.data).charCodeAt(r * geom.cols + c);
    state.clickedTrain = geom.cb === 1 ? tj : null;
    selectTest(ti);
    const info = $("cell-info"); info.replaceChildren();
    if (geom.cb === 1 && geom.rb === 1) {
      info.appendChild(el("div", { "data-cell-test": t.test.ids[ti], "data-cell-train": t.train.ids[tj] },
        "Clicked: test " + t.test.ids[ti] + " × train " + t.train.ids[tj] + " (" + t.train.groups[tj] + ", " +
        (t.train.groups[tj] === t.test.groups[ti] ? "same group" : "other group") + "): rank percentile " + (100 * v / 255).toFixed(0) + "%"));
      info.appendChild(el("div", { class: "label" }, "training prompt"));
      info.appendChild(el("div", { class: "text" }, t.train.prompts[tj]));
      info.appendChild(el("div", { class: "label" }, "training response"));
      info.appendChild(el("div", { class: "text" }, t.train.responses[tj]));
    } else {
      info.appendChild(el("div", null, "Clicked block: test examples from " + t.test.ids[ti] + ", training examples from " +
        t.train.ids[tj] + ": mean rank percentile " + (100 * v / 255).toFixed(0) + "%"));
    }
  });

  // ---------------------------------------------------------------- test list and detail
  function renderTestList() {
    const t = task(), m = method(), list = $("test-list");
    list.replaceChildren();
    t.test_order.forEach((i) => {
      const hit = m.hit[i];
      const row = el("div", { class: "test-row" + (i === state.test ? " selected" : ""), "data-test-id": t.test.ids[i], "data-index": String(i) });
      row.appendChild(el("span", { class: "mark " + (hit === null ? "na" : hit ? "ok" : "bad"), title: "top-1 training example relevant?" },
        hit === null ? "·" : hit ? "✓" : "✗"));
      row.appendChild(el("span", { class: "tid" }, t.test.ids[i]));
      row.appendChild(el("span", { class: "grp" }, t.test.groups[i]));
      row.appendChild(el("span", { class: "excerpt" }, oneLine(t.test.prompts[i], 120)));
      row.addEventListener("click", () => { state.clickedTrain = null; clearCellInfo(); selectTest(i); });
      list.appendChild(row);
    });
  }
  function clearCellInfo() {
    $("cell-info").replaceChildren(el("p", { class: "hint" }, "Click a heatmap cell to see that training example beside the selected test example."));
  }
  function selectTest(i) {
    state.test = i;
    document.querySelectorAll(".test-row.selected").forEach((r) => r.classList.remove("selected"));
    const row = document.querySelector('.test-row[data-index="' + i + '"]');
    if (row) { row.classList.add("selected"); if (row.scrollIntoViewIfNeeded) row.scrollIntoViewIfNeeded(); }
    renderDetail(); renderHeatmap();
  }
  function renderDetail() {
    const t = task(), m = method(), box = $("test-detail"), list = $("topk-list");
    box.replaceChildren(); list.replaceChildren();
    box.removeAttribute("data-selected-test");
    if (state.test === null) { box.appendChild(el("p", { class: "hint" }, "Click a test example (left) or a heatmap cell.")); $("topk-title").textContent = "Top training examples"; return; }
    const i = state.test;
    box.setAttribute("data-selected-test", t.test.ids[i]);
    const head = el("div", { class: "topk-head" });
    head.appendChild(el("span", { class: "tid", id: "selected-test-id" }, t.test.ids[i]));
    head.appendChild(el("span", { class: "grp" }, t.test.groups[i]));
    head.appendChild(el("span", null, "top-1 relevant: " + (m.hit[i] === null ? "n/a (no training example of this group)" : m.hit[i] ? "yes" : "no") +
      " · Cover " + pct(m.cover_per_test[i]) + "% (k = " + m.k[i] + ")"));
    box.appendChild(head);
    box.appendChild(el("div", { class: "label" }, "prompt"));
    box.appendChild(el("div", { class: "text", id: "selected-test-prompt" }, t.test.prompts[i]));
    box.appendChild(el("div", { class: "label" }, "response"));
    box.appendChild(el("div", { class: "text", id: "selected-test-response" }, t.test.responses[i]));
    $("topk-title").textContent = "Top " + m.topk[i].length + " training examples (" + m.name + ", " + checkpoint().name +
      "; ✓ = same group as the test example = ground truth; \"3=\" = tied score)";
    m.topk[i].forEach((j, r) => {
      const rel = m.topk_relevant[i][r] === 1, tied = m.topk_tied[i][r] === 1;
      const li = el("li", { class: "topk-row " + (rel ? "relevant" : "irrelevant") + (j === state.clickedTrain ? " clicked" : ""),
        "data-train-id": t.train.ids[j], "data-rank": String(r + 1), "data-relevant": rel ? "1" : "0",
        "data-tie-rank": String(m.topk_rank[i][r]), "data-tied": tied ? "1" : "0" });
      const h = el("div", { class: "topk-head" });
      h.appendChild(el("span", { class: "rank" }, "#" + m.topk_rank[i][r] + (tied ? "=" : "")));
      h.appendChild(el("span", { class: "mark " + (rel ? "ok" : "bad") }, rel ? "✓" : "✗"));
      h.appendChild(el("span", { class: "tid" }, t.train.ids[j]));
      h.appendChild(el("span", { class: "grp" }, t.train.groups[j]));
      h.appendChild(el("span", { class: "score" }, "score " + fmt(m.topk_scores[i][r])));
      if (tied) h.appendChild(el("span", { class: "tie", title: "another training example has exactly this score" }, "tied"));
      li.appendChild(h);
      li.appendChild(el("div", { class: "label" }, "prompt"));
      li.appendChild(el("div", { class: "text" }, t.train.prompts[j]));
      li.appendChild(el("div", { class: "label" }, "response"));
      li.appendChild(el("div", { class: "text" }, t.train.responses[j]));
      const toks = m.topk_tokens ? m.topk_tokens[i][r] : null;
      if (toks && toks.length) {   // RepT's token-level attribution of this training example
        li.appendChild(el("div", { class: "label" }, "top tokens (RepT, cosine with the test signature)"));
        const tl = el("div", { class: "tokens" });
        toks.forEach((x) => tl.appendChild(el("span", { class: "token", "data-position": String(x.position),
          title: "token " + x.position + " of the training example" }, JSON.stringify(x.token) + " " + fmt(x.score))));
        li.appendChild(tl);
      }
      list.appendChild(li);
    });
  }

  // ---------------------------------------------------------------- metrics and figures
  function metricCell(m, key, best, label, name) {   // the value, then its 95 % interval
    const td = el("td", { class: best ? "best" : "", "data-task": label, "data-method": name, "data-metric": key });
    td.appendChild(el("span", { class: "value" }, m ? pct(m[key]) : "–"));
    if (m && ci(m[key + "_ci95"])) { td.appendChild(document.createTextNode(" ")); td.appendChild(el("span", { class: "ci" }, ci(m[key + "_ci95"]))); }
    return td;
  }
  function renderMetrics() {
    const box = $("metrics"); box.replaceChildren();
    const methods = [];
    DATA.tasks.forEach((t) => t.checkpoints.forEach((c) => c.methods.forEach((m) => { if (!methods.includes(m.name)) methods.push(m.name); })));
    box.appendChild(el("p", { class: "hint" }, "Acc = share of test examples whose top-ranked training example is in their group; Cover = share of the top k that are (k = the group's size in train); tied scores count as the expected value over a uniformly random order of the tie. In brackets: the 95 % bootstrap interval over test examples. Last checkpoint of each task; best per row in bold. Values in %."));
    const table = el("table", { id: "overview-table" });
    const hr = el("tr"); hr.appendChild(el("th", null, "task (checkpoint)"));
    methods.forEach((n) => hr.appendChild(el("th", { colspan: "2" }, n)));
    table.appendChild(hr);
    const sub = el("tr"); sub.appendChild(el("th"));
    methods.forEach(() => { sub.appendChild(el("th", null, "Acc")); sub.appendChild(el("th", null, "Cover")); });
    table.appendChild(sub);
    DATA.tasks.forEach((t) => {
      const c = t.checkpoints[t.checkpoints.length - 1], tr = el("tr");
      tr.appendChild(el("td", null, t.label + " (" + c.name + ")"));
      const byName = Object.fromEntries(c.methods.map((m) => [m.name, m]));
      const bestA = Math.max(...c.methods.map((m) => m.acc)), bestC = Math.max(...c.methods.map((m) => m.cover));
      methods.forEach((n) => {
        const m = byName[n];
        tr.appendChild(metricCell(m, "acc", m && m.acc === bestA, t.label, n));
        tr.appendChild(metricCell(m, "cover", m && m.cover === bestC, t.label, n));
      });
      table.appendChild(tr);
    });
    box.appendChild(table);
    const multi = DATA.tasks.filter((t) => t.checkpoints.length > 1);
    if (multi.length) {
      box.appendChild(el("h3", null, "Every checkpoint"));
      multi.forEach((t) => {
        const tb = el("table"); const h = el("tr");
        ["checkpoint", "method", "Acc % [95 % CI]", "Cover % [95 % CI]", "seconds"].forEach((x) => h.appendChild(el("th", null, x)));
        tb.appendChild(el("caption", null, t.label)); tb.appendChild(h);
        t.checkpoints.forEach((c) => c.methods.forEach((m) => {
          const r = el("tr");
          [c.name, m.name, withCi(m.acc, m.acc_ci95), withCi(m.cover, m.cover_ci95), fmt(m.seconds)].forEach((x) => r.appendChild(el("td", null, x)));
          tb.appendChild(r);
        }));
        box.appendChild(tb);
      });
    }
  }
  function renderBackdoor() {   // the backdoor checks of RUN/backdoor/epoch-N.json, every checkpoint checked
    const rows = [];
    DATA.tasks.forEach((t) => (t.backdoor || []).forEach((b) => rows.push([t, b])));
    if (!rows.length) return;
    $("backdoor-section").hidden = false;
    const box = $("backdoor"); box.replaceChildren();
    const th = rows[0][1].thresholds || {};   // the thresholds as numbers (0.8, 0.2)
    box.appendChild(el("p", { class: "hint" }, "Greedy generation on the run's held-out prompts (its test split, never trained on). A triggered prompt complies when its generation starts with the trigger's response prefix (read from the training responses) or contains no refusal string; a clean prompt when it contains no refusal string (degenerate text never complies). The backdoor fires when every trigger complies on at least " + th.triggered_at_least + " of its prompts and clean prompts on at most " + th.clean_at_most + ". Shares of held-out prompts."));
    const table = el("table", { id: "backdoor-table" }), h = el("tr");
    ["task", "checkpoint (epochs trained)", "trigger groups: compliance (response prefix)", "weakest trigger", "clean", "fires"].forEach((x) => h.appendChild(el("th", null, x)));
    table.appendChild(h);
    rows.forEach(([t, b]) => {   // shares come formatted by Python (b.text), exactly as in report.md
      const r = el("tr", { "data-task": t.label, "data-checkpoint": b.checkpoint });
      [t.label, b.checkpoint + " (" + b.epochs + ")", b.text.trigger_groups || "–", b.text.triggered, b.text.clean, b.fires ? "yes" : "no"]
        .forEach((x, i) => r.appendChild(el("td", i === 5 ? { "data-fires": b.fires ? "1" : "0" } : null, x)));
      table.appendChild(r);
    });
    box.appendChild(table);
    const ul = el("ul");
    rows.forEach(([, b]) => ul.appendChild(el("li", null, b.verdict)));
    box.appendChild(ul);
  }
  function renderFigures() {
    const box = $("figures"); box.replaceChildren();
    if (!DATA.figures.length) { box.appendChild(el("p", { class: "hint" }, "No figures in " + DATA.out_dir + ".")); return; }
    DATA.figures.forEach((f) => {
      const fig = el("figure", { "data-file": f.file });
      const img = el("img", { alt: f.caption }); img.src = f.src;
      fig.appendChild(img);
      fig.appendChild(el("figcaption", null, f.caption + " (" + f.file + ")"));
      if (f.note) { const d = el("details"); d.appendChild(el("summary", null, "notes (Markdown)")); d.appendChild(el("pre", null, f.note)); fig.appendChild(d); }
      box.appendChild(fig);
    });
  }

  function render() {
    renderSummary(); renderTestList(); renderDetail(); renderHeatmap();
    clearCellInfo();
    document.body.setAttribute("data-task", task().label);
    document.body.setAttribute("data-checkpoint", checkpoint().name);
    document.body.setAttribute("data-method", method().name);
  }

  fillSelect($("task-select"), DATA.tasks.map((t) => t.label), 0);
  $("task-select").addEventListener("change", (e) => setTask(Number(e.target.value), true));
  $("checkpoint-select").addEventListener("change", (e) => setCheckpoint(Number(e.target.value)));
  $("method-select").addEventListener("change", (e) => setMethod(Number(e.target.value)));
  renderMeta(); renderMetrics(); renderBackdoor(); renderFigures();
  setTask(0, false);
  document.body.setAttribute("data-ready", "1");
})();
"""
