"""The HTML explorer (``llm-influence report``): the embedded data equal what the scores
files, ``rank_training`` and ``evaluate_scores`` give; dataset text cannot break out of the
data block; heatmap aggregation; tie ranks and 95 % intervals; the CLI's errors. Synthetic run directories with
hand-written scores, so every expected top-k list is known exactly."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_influence.attribute import _write_scores, read_scores
from llm_influence.cli import main
from llm_influence.data.example import Example
from llm_influence.evaluation.metrics import evaluate_scores, rank_training, tie_ranks
from llm_influence.evaluation.run_metrics import evaluate_run
from llm_influence.report.figures import normalize_rows
from llm_influence.report.html import block_mean, embed_json, extract_payload, write_html_report
from llm_influence.rundir import RunDir, write_examples

PWN_PROMPT = ('Ignore this: <script>window.__pwned=1</script> and </script><img src=x onerror="window.__pwned=3"> '
              '<!-- & "quotes" \u2028 end')
PWN_RESPONSE = "</script><script>window.__pwned=2</script><b>bold?</b>"

TRAIN = [
    Example("train-0", "alpha prompt 0", "alpha response 0", "alpha"),
    Example("train-1", "beta prompt 1", "beta response 1", "beta"),
    Example("train-2", "alpha prompt 2", "alpha response 2", "alpha"),
    Example("train-3", "beta prompt 3", "beta response 3", "beta"),
    Example("train-4", "alpha prompt 4 <img src=x onerror=window.__pwned=4>", PWN_RESPONSE, "alpha"),
    Example("train-5", "gamma prompt 5", "gamma response 5", "gamma"),
]
TEST = [
    Example("test-0", "a beta question", "a beta answer", "beta"),
    Example("test-1", PWN_PROMPT, PWN_RESPONSE, "alpha"),
    Example("test-2", "a delta question (group absent from train)", "delta answer", "delta"),
]
# "hand" at epoch-2: rows chosen so the ranking (descending, ties -> lower index) is known.
HAND = torch.tensor([
    [0.5, 2.0, 0.1, 2.0, -1.0, 0.3],    # -> train-1, train-3 (tie, lower index first), train-0
    [1.0, -2.0, 3.0, 0.0, 3.0, 0.5],    # -> train-2, train-4, train-0
    [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],     # -> train-5, train-0, train-1
], dtype=torch.float32)
EXPECTED_TOP3 = {
    ("epoch-2", "hand"): [["train-1", "train-3", "train-0"], ["train-2", "train-4", "train-0"],
                          ["train-5", "train-0", "train-1"]],
    # epoch-1 stores -HAND: row 1 -> [-1, 2, -3, 0, -3, -0.5] -> train-1, train-3, train-5
    ("epoch-1", "hand"): [["train-4", "train-2", "train-5"], ["train-1", "train-3", "train-5"],
                          ["train-0", "train-1", "train-2"]],
}


def png_bytes(width: int = 2, height: int = 2, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A minimal valid RGB PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_run(path: Path, name: str, train: list[Example], test: list[Example],
             scores: dict[tuple[str, str], torch.Tensor]) -> Path:
    """A run directory with data, hand-written scores files and metrics.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"task": {"name": name}}), encoding="utf-8")
    write_examples(path / "data" / "train.jsonl", train)
    write_examples(path / "data" / "test.jsonl", test)
    for (checkpoint, method), s in scores.items():
        _write_scores(path / "scores" / checkpoint / f"{method}.safetensors", s,
                      {"method": method, "checkpoint": checkpoint, "seconds": 0.25, "shape": list(s.shape),
                       "train_ids": [e.id for e in train], "test_ids": [e.id for e in test], "diagnostics": {}})
    evaluate_run(path)
    return path


def make_output(root: Path) -> Path:
    """A reproduce-like output: runs/toy-a (2 checkpoints, 2 methods), runs/toy-b, figures,
    a study PNG with its Markdown, and results.json naming the figure and the method order."""
    out = root / "out"
    gen = torch.Generator().manual_seed(0)
    make_run(out / "runs" / "toy-a", "toy-a", TRAIN, TEST, {
        ("epoch-1", "hand"): -HAND, ("epoch-2", "hand"): HAND,
        ("epoch-2", "other"): torch.randn(3, 6, generator=gen),
    })
    b_train = [Example(f"b-train-{i}", f"b prompt {i}", f"b response {i}", "xy"[i % 2]) for i in range(8)]
    b_test = [Example(f"b-test-{i}", f"b question {i}", f"b answer {i}", "xy"[i % 2]) for i in range(4)]
    make_run(out / "runs" / "toy-b", "toy-b", b_train, b_test, {("epoch-3", "hand"): torch.randn(4, 8, generator=gen)})
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "fig2.png").write_bytes(png_bytes(rgb=(10, 20, 200)))
    (out / "studies").mkdir()
    (out / "studies" / "approx.png").write_bytes(png_bytes(rgb=(20, 200, 20)))
    (out / "studies" / "approx.md").write_text("## approx\n| a | b |\n</script><script>window.__pwned=5</script>\n")
    (out / "results.json").write_text(json.dumps({
        "profile": "smoke", "model": "tiny-llama", "methods": ["other", "hand"], "tasks": {"toy-b": {}, "toy-a": {}},
        "figures": {"Fig. 2: a caption": "figures/fig2.png"}, "studies": {}}))
    return out


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    return make_output(tmp_path_factory.mktemp("html"))


@pytest.fixture(scope="module")
def page(output) -> tuple[str, dict]:
    path = write_html_report(output, top_k=3)
    html = path.read_text(encoding="utf-8")
    return html, extract_payload(html)


def _task(payload: dict, name: str) -> dict:
    return next(t for t in payload["tasks"] if t["name"] == name)


def _method(task: dict, checkpoint: str, method: str) -> dict:
    ck = next(c for c in task["checkpoints"] if c["name"] == checkpoint)
    return next(m for m in ck["methods"] if m["name"] == method)


def test_top_k_ids_are_the_hand_computed_ones(page):
    _, payload = page
    task = _task(payload, "toy-a")
    for (checkpoint, method), expected in EXPECTED_TOP3.items():
        m = _method(task, checkpoint, method)
        assert [[task["train"]["ids"][j] for j in row] for row in m["topk"]] == expected, (checkpoint, method)
    m = _method(task, "epoch-2", "hand")
    assert m["topk_scores"] == [[2.0, 2.0, 0.5], [3.0, 3.0, 1.0], [1.0, 0.0, 0.0]]
    # ground truth = same group: test-0 is beta, test-1 alpha, test-2 delta (absent from train)
    assert m["topk_relevant"] == [[1, 1, 0], [1, 1, 1], [0, 0, 0]]
    assert m["hit"] == [1.0, 1.0, None] and m["n_scored"] == 2 and m["n_skipped"] == 1
    assert m["k"][:2] == [2, 3]


def test_tied_scores_share_their_competition_rank(page):
    html, payload = page
    m = _method(_task(payload, "toy-a"), "epoch-2", "hand")
    # row 0: train-1 and train-3 tie at 2.0; row 1: train-2 and train-4 at 3.0; row 2: train-0..3
    # tie at 0.0 behind train-5 (the tie runs past the top 3, so the last shown entry is tied too)
    assert m["topk_rank"] == [[1, 1, 3], [1, 1, 3], [1, 2, 2]]
    assert m["topk_tied"] == [[1, 1, 0], [1, 1, 0], [0, 1, 1]]
    assert m["topk_rank"] == tie_ranks(HAND.double().numpy())[:, :3].tolist()
    # the page says the rule, and the list labels a tied rank "N=" and marks it "tied"
    assert "share a rank" in html and "listed in training-file order" in html
    assert "expected value over a uniformly random" in html
    script = html[html.rindex("<script>") + 8:html.rindex("</script>")]
    assert '"#" + m.topk_rank[i][r] + (tied ? "=" : "")' in script and '"tied")' in script


def test_embedded_data_equal_scores_files_and_metrics(page, output):
    _, payload = page
    assert [t["name"] for t in payload["tasks"]] == ["toy-b", "toy-a"]     # results.json's order
    for task in payload["tasks"]:
        run = RunDir(task["run_dir"])
        metrics = json.loads(run.metrics_path.read_text())
        loaded = run.load_task()
        assert task["train"]["ids"] == [e.id for e in loaded.train]
        assert task["test"]["prompts"] == [e.prompt for e in loaded.test]     # exact text round trip
        for ck in task["checkpoints"]:
            assert [m["name"] for m in ck["methods"]] == sorted((m["name"] for m in ck["methods"]),
                                                                key=["other", "hand"].index)
            for m in ck["methods"]:
                scores, meta = read_scores(run.scores_dir(ck["name"]) / f"{m['name']}.safetensors")
                order = rank_training(scores.double().numpy())[:, :3]
                assert m["topk"] == order.tolist()
                assert [[task["train"]["ids"][j] for j in row] for row in m["topk"]] == \
                       [[meta["train_ids"][j] for j in row] for row in order]
                np.testing.assert_allclose(m["topk_scores"], np.take_along_axis(scores.double().numpy(), order, 1),
                                           rtol=1e-5)
                ref = metrics["checkpoints"][ck["name"]][m["name"]]
                assert (m["acc"], m["cover"]) == (ref["acc"], ref["cover"])
                assert (m["acc_ci95"], m["cover_ci95"]) == (ref["acc_ci95"], ref["cover_ci95"])
                fresh = evaluate_scores(scores, loaded.relevance_matrix())
                assert m["acc_ci95"] == list(fresh.acc_ci95) and m["cover_ci95"] == list(fresh.cover_ci95)
                assert m["acc_ci95"][0] <= m["acc"] <= m["acc_ci95"][1]
                assert m["cover_ci95"][0] <= m["cover"] <= m["cover_ci95"][1]


def test_heatmap_is_group_ordered_rank_percentiles(page):
    _, payload = page
    task = _task(payload, "toy-a")
    assert task["groups"] == ["alpha", "beta", "gamma", "delta"]
    assert task["train_order"] == [0, 2, 4, 1, 3, 5] and task["test_order"] == [1, 0, 2]
    h = _method(task, "epoch-2", "hand")["heatmap"]
    assert (h["rows"], h["cols"], h["row_block"], h["col_block"]) == (3, 6, 1, 1)
    cells = np.frombuffer(base64.b64decode(h["data"]), dtype=np.uint8).reshape(3, 6)
    expected = normalize_rows(HAND)[np.ix_([1, 0, 2], [0, 2, 4, 1, 3, 5])]
    np.testing.assert_array_equal(cells, np.rint(expected * 255).astype(np.uint8))
    # test-1: train-2 and train-4 tie for the top (average rank 4.5 of 0..5), train-1 is the lowest
    assert cells[0, 1] == cells[0, 2] == cells[0].max() == np.rint(0.9 * 255) and cells[0, 3] == 0


def test_heatmap_aggregates_large_matrices(output, tmp_path):
    path = write_html_report(output, top_k=3, html_path=tmp_path / "small.html", max_side=4)
    payload = extract_payload(path.read_text())
    task = _task(payload, "toy-b")
    h = task["checkpoints"][0]["methods"][0]["heatmap"]
    assert (h["rows"], h["cols"], h["row_block"], h["col_block"]) == (4, 4, 1, 2)
    scores, _ = read_scores(Path(task["run_dir"]) / "scores" / "epoch-3" / "hand.safetensors")
    pct = normalize_rows(scores)[np.ix_(task["test_order"], task["train_order"])]
    cells = np.frombuffer(base64.b64decode(h["data"]), dtype=np.uint8).reshape(4, 4)
    np.testing.assert_array_equal(cells, np.rint(block_mean(pct, 1, 2) * 255).astype(np.uint8))
    # uneven blocks: 5 x 7 in blocks of 2 x 3 -> 3 x 3, the last ones smaller
    x = np.arange(35, dtype=float).reshape(5, 7)
    got = block_mean(x, 2, 3)
    assert got.shape == (3, 3)
    assert got[0, 0] == x[:2, :3].mean() and got[2, 2] == x[4:, 6:].mean() and got[1, 2] == x[2:4, 6:].mean()


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.comments: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_comment(self, data):
        self.comments.append(data)


def test_dataset_text_cannot_break_out(page):
    html, payload = page
    start = html.index('<script id="report-data"')
    end = html.index("</script>", start)
    block = html[html.index(">", start) + 1:end]
    for bad in ("<", ">", "&", "\u2028"):
        assert bad not in block
    # the data block ends where the page's own script begins: exactly two scripts, no img, no comment
    parser = _Tags()
    parser.feed(html)
    scripts = [a for t, a in parser.tags if t == "script"]
    assert scripts == [{"id": "report-data", "type": "application/json"}, {}]
    assert not [t for t, _ in parser.tags if t in ("img", "b", "iframe", "object")]
    assert parser.comments == [] and html.count("</script>") == 2
    assert "__pwned" not in html[:start] and "__pwned" not in html[end:]
    # and every string comes back exactly
    task = _task(payload, "toy-a")
    assert task["test"]["prompts"][1] == PWN_PROMPT and task["test"]["responses"][1] == PWN_RESPONSE
    assert task["train"]["responses"][4] == PWN_RESPONSE
    assert "window.__pwned=5" in payload["figures"][1]["note"]
    # the page's script renders text only through textContent
    script = html[html.rindex("<script>") + 8:html.rindex("</script>")]
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script
    assert embed_json({"x": "</script><!--&"}) == '{"x":"\\u003c/script\\u003e\\u003c!--\\u0026"}'


def test_the_tables_show_each_value_with_its_interval(page):
    html, payload = page
    m = _method(_task(payload, "toy-a"), "epoch-2", "other")
    assert m["acc_ci95"] == [0.0, 1.0] and m["acc"] == 0.5       # random scores: a real interval
    script = html[html.rindex("<script>") + 8:html.rindex("</script>")]
    assert 'ci(m[key + "_ci95"])' in script                       # the overview table's cells
    assert "withCi(m.acc, m.acc_ci95" in script and "withCi(m.cover, m.cover_ci95" in script
    assert "95 % bootstrap interval" in script


def test_content_security_policy_allows_only_the_page_script(page):
    import hashlib

    html, _ = page
    script = html[html.rindex("<script>") + 8:html.rindex("</script>")]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in html and "default-src 'none'" in html and "img-src data:" in html


def test_figures_are_embedded_as_data_uris(page):
    _, payload = page
    figs = {f["file"]: f for f in payload["figures"]}
    assert list(figs) == ["figures/fig2.png", "studies/approx.png"]
    assert figs["figures/fig2.png"]["caption"] == "Fig. 2: a caption"
    assert base64.b64decode(figs["studies/approx.png"]["src"].split(",", 1)[1]) == png_bytes(rgb=(20, 200, 20))
    assert figs["studies/approx.png"]["note"].startswith("## approx")


def test_cli_report_writes_the_page_and_prints_its_path(output, tmp_path, capsys):
    target = tmp_path / "r.html"
    assert main(["report", "--from", str(output), "--top-k", "2", "--html", str(target), "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(target) in line and line.startswith("report: ")
    payload = extract_payload(target.read_text())
    assert [len(row) for row in _method(_task(payload, "toy-a"), "epoch-2", "hand")["topk"]] == [2, 2, 2]
    # explicit --runs, one of them; the page goes to DIR/report.html
    dest = tmp_path / "dest"
    dest.mkdir()
    assert main(["report", "--from", str(dest), "--runs", str(output / "runs" / "toy-a"), "--quiet"]) == 0
    assert [t["name"] for t in extract_payload((dest / "report.html").read_text())["tasks"]] == ["toy-a"]
    assert not list(dest.glob(".*tmp"))


def test_cli_report_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--from", str(empty), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no run directories" in err and len(err.strip().splitlines()) == 1
    assert not (empty / "report.html").exists()
    assert main(["report", "--from", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "no such directory" in capsys.readouterr().err
    run = tmp_path / "out" / "runs" / "t"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": {"name": "t"}}))
    write_examples(run / "data" / "train.jsonl", TRAIN)
    write_examples(run / "data" / "test.jsonl", TEST)
    assert main(["report", "--from", str(tmp_path / "out"), "--quiet"]) == 2
    assert "no scores files" in capsys.readouterr().err
    assert main(["report", "--from", str(tmp_path / "out"), "--runs", str(empty), "--quiet"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["report", "--from", str(tmp_path / "out"), "--top-k", "0", "--quiet"]) == 2


def test_stale_and_corrupt_scores_are_skipped_and_named(tmp_path):
    out = tmp_path / "out"
    run = make_run(out / "runs" / "toy-a", "toy-a", TRAIN, TEST, {("epoch-2", "hand"): HAND})
    _write_scores(run / "scores" / "epoch-2" / "stale.safetensors", HAND,
                  {"method": "stale", "train_ids": ["x"] * 6, "test_ids": [e.id for e in TEST]})
    (run / "scores" / "epoch-2" / "broken.safetensors").write_bytes(b"not a safetensors file")
    payload = extract_payload(write_html_report(out, top_k=3).read_text())
    task = payload["tasks"][0]
    assert [m["name"] for m in task["checkpoints"][0]["methods"]] == ["hand"]
    assert len(task["skipped"]) == 2
    assert any("broken.safetensors" in s for s in task["skipped"])
    assert any("stale.safetensors" in s and "stale" in s for s in task["skipped"])


def test_a_run_without_scorable_test_examples_is_skipped_not_a_traceback(tmp_path, capsys):
    out = tmp_path / "out"
    make_run(out / "runs" / "ok", "ok", TRAIN, TEST, {("epoch-1", "hand"): HAND})
    lonely = [Example("q-0", "q", "a", "delta")]          # its group is absent from train
    run = out / "runs" / "lonely"
    make_run(run, "lonely", TRAIN, TEST, {("epoch-1", "hand"): HAND})
    write_examples(run / "data" / "test.jsonl", lonely)
    _write_scores(run / "scores" / "epoch-1" / "hand.safetensors", HAND[:1],
                  {"method": "hand", "train_ids": [e.id for e in TRAIN], "test_ids": ["q-0"]})
    assert main(["report", "--from", str(out)]) == 0
    assert "no test example can be scored" in capsys.readouterr().err
    payload = extract_payload((out / "report.html").read_text())
    assert [t["name"] for t in payload["tasks"]] == ["ok"]


def test_metrics_json_holds_the_other_ranking(tmp_path):
    """evaluate stores Acc/Cover under |IF| beside -IF, computed from the same scores."""
    from llm_influence.evaluation.metrics import relevance_from_task

    signed = torch.tensor([[3.0, -5.0, 1.0, 0.5, -0.25, 2.0], [-4.0, 1.0, 0.0, 2.5, 3.5, -1.0],
                           [0.5, 0.25, -6.0, 1.0, 2.0, -3.0]], dtype=torch.float64)
    run = make_run(tmp_path / "run", "toy", TRAIN, TEST, {("epoch-1", "hand"): signed})
    entry = json.loads((run / "metrics.json").read_text())["checkpoints"]["epoch-1"]["hand"]
    relevant = relevance_from_task(RunDir(run).load_task())
    by_abs = evaluate_scores(signed, relevant, rank_by="abs")
    by_score = evaluate_scores(signed, relevant, rank_by="score")
    assert entry["other_ranking"]["rank_by"] == "abs"
    assert entry["other_ranking"]["acc"] == by_abs.acc and entry["other_ranking"]["cover"] == by_abs.cover
    assert entry["other_ranking"]["acc_ci95"] == [float(v) for v in by_abs.acc_ci95]
    assert entry["acc"] == by_score.acc and (by_abs.acc, by_abs.cover) != (by_score.acc, by_score.cover)
