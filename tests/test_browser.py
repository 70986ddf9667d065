"""The HTML explorer in a real browser: Debian's chromium (``/usr/bin/chromium``) driven by
playwright's Python API (no downloaded browser, headless, no sandbox, no network).

Opens the report from ``file://``, picks task/checkpoint/method, clicks a test example and a
heatmap cell, checks the top-k list shows exactly the expected training ids in order, that
``<script>`` in the dataset text is inert and shown literally, and saves a screenshot (its
path is printed; also copied to ``$LLM_INFLUENCE_SCREENSHOT_DIR`` when set).

Skipped only when ``/usr/bin/chromium`` or the ``playwright`` package is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from llm_influence.report.html import write_html_report
from test_report_html import EXPECTED_TOP3, PWN_PROMPT, PWN_RESPONSE, make_output

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-default-apps", "--disable-sync", "--no-default-browser-check"]


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.skip(f"browser test skipped: {CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser test skipped: the Python package 'playwright' is missing (pip install -e '.[test]')")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000}, offline=True)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = make_output(tmp_path_factory.mktemp("browser"))
    return write_html_report(out, top_k=3)


def _open(context, path: Path):
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    requests: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=15_000)
    return page, errors, requests


def _topk_ids(page) -> list[str]:
    return page.eval_on_selector_all("#topk-list li", "els => els.map(e => e.dataset.trainId)")


def _choose(page, task: str, checkpoint: str, method: str) -> None:
    page.select_option("#task-select", label=task)
    page.select_option("#checkpoint-select", label=checkpoint)
    page.select_option("#method-select", label=method)
    assert page.get_attribute("body", "data-task") == task
    assert page.get_attribute("body", "data-checkpoint") == checkpoint
    assert page.get_attribute("body", "data-method") == method


def test_click_test_example_shows_expected_top_k(browser_page, report, tmp_path, capsys):
    page, errors, requests = _open(browser_page, report)
    try:
        assert page.get_attribute("body", "data-task") == "toy-b"     # results.json's task order
        page.select_option("#task-select", label="toy-a")
        assert page.get_attribute("body", "data-checkpoint") == "epoch-2"   # the last checkpoint by default
        assert page.get_attribute("body", "data-method") == "hand"          # kept from toy-b
        assert page.eval_on_selector_all("#method-select option", "os => os.map(o => o.textContent)") == \
            ["other", "hand"]                                               # results.json's method order
        _choose(page, "toy-a", "epoch-2", "hand")
        for index, test_id in enumerate(("test-0", "test-1", "test-2")):
            page.click(f'.test-row[data-test-id="{test_id}"]')
            assert page.text_content("#selected-test-id") == test_id
            assert _topk_ids(page) == EXPECTED_TOP3[("epoch-2", "hand")][index]
        # ground-truth marks and scores of test-0's list: beta, beta, alpha
        page.click('.test-row[data-test-id="test-0"]')
        marks = page.eval_on_selector_all("#topk-list li", "els => els.map(e => e.dataset.relevant)")
        assert marks == ["1", "1", "0"]
        assert "score 2.000" in page.text_content('#topk-list li[data-rank="1"]')
        # train-1 and train-3 tie at 2.0: both show the shared rank "#1=" and "tied"; train-0 is #3
        ranks = page.eval_on_selector_all("#topk-list .rank", "els => els.map(e => e.textContent)")
        assert ranks == ["#1=", "#1=", "#3"]
        assert page.eval_on_selector_all("#topk-list li", "els => els.map(e => e.dataset.tied)") == ["1", "1", "0"]
        assert page.eval_on_selector_all("#topk-list .tie", "els => els.length") == 2
        assert "training-file order" in page.text_content("#tie-rule")
        # another checkpoint reorders the list (scores negated there)
        page.select_option("#checkpoint-select", label="epoch-1")
        page.click('.test-row[data-test-id="test-1"]')
        assert _topk_ids(page) == EXPECTED_TOP3[("epoch-1", "hand")][1]
        # the Acc/Cover table shows the embedded numbers with their 95 % intervals: hand at epoch-2
        # has Acc 100% (test-2 skipped), other 50% [0, 100]
        cell = '#overview-table td[data-task="toy-a"][data-method="{}"][data-metric="acc"]'
        assert page.text_content(cell.format("hand")) == "100.0 [100.0, 100.0]"
        assert page.text_content(cell.format("other") + " .value") == "50.0"
        assert page.text_content(cell.format("other") + " .ci") == "[0.0, 100.0]"

        # the <script> payload is inert and shown literally
        page.select_option("#checkpoint-select", label="epoch-2")
        page.click('.test-row[data-test-id="test-1"]')
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.text_content("#selected-test-prompt") == PWN_PROMPT
        assert page.text_content("#selected-test-response") == PWN_RESPONSE
        assert page.evaluate("[...document.images].every(i => i.src.startsWith('data:image/png;base64,'))")
        assert page.evaluate("document.querySelectorAll('b, #test-detail script, #topk-list script').length") == 0
        assert PWN_RESPONSE in page.text_content('#topk-list li[data-train-id="train-4"]')

        # a heatmap cell selects its test example and names the training example
        geom = json.loads(page.get_attribute("#heatmap", "data-geom"))
        # rows/columns are in group order: row 2 = test-2 (delta); column 3 = train-1 (first beta)
        x = geom["left"] + (3 + 0.5) * geom["cellW"]
        y = geom["top"] + (2 + 0.5) * geom["cellH"]
        page.click("#heatmap", position={"x": x, "y": y})
        assert page.text_content("#selected-test-id") == "test-2"
        assert page.get_attribute("#cell-info [data-cell-train]", "data-cell-train") == "train-1"
        assert _topk_ids(page) == EXPECTED_TOP3[("epoch-2", "hand")][2]
        page.click('.test-row[data-test-id="test-1"]')

        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=False)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        copies = [shot]
        if os.environ.get("LLM_INFLUENCE_SCREENSHOT_DIR"):
            dest = Path(os.environ["LLM_INFLUENCE_SCREENSHOT_DIR"])
            dest.mkdir(parents=True, exist_ok=True)
            copies.append(Path(shutil.copy2(shot, dest / "report_browser_test.png")))
        with capsys.disabled():
            print("\nbrowser test screenshot: " + ", ".join(str(p) for p in copies))
        assert errors == []
        assert all(u.startswith(("file:", "data:")) for u in requests), requests
    finally:
        page.close()


def test_script_in_data_is_inert_without_the_csp(browser_page, report, tmp_path):
    """Escaping alone keeps the payload inert: the same page without its
    Content-Security-Policy meta tag."""
    html = report.read_text(encoding="utf-8")
    bare, n = re.subn(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html)
    assert n == 1
    path = tmp_path / "no-csp.html"
    path.write_text(bare, encoding="utf-8")
    page, errors, _ = _open(browser_page, path)
    try:
        _choose(page, "toy-a", "epoch-2", "hand")
        page.click('.test-row[data-test-id="test-1"]')
        assert page.text_content("#selected-test-prompt") == PWN_PROMPT
        page.click("#figures-section details summary")
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.evaluate("document.scripts.length") == 2
        assert errors == []
    finally:
        page.close()
