"""Every Acc/Cover pair in the README's results tables is a value of results/cpu/results.json.

A table counts when its header has cells ``<task> Acc / Cover`` for a task of the results.
Each body cell is ``ACC / COVER`` (percent, one decimal), optionally bold, optionally with a
``[low, high]`` interval after each number and the paper's numbers in parentheses after
the pair; ``mean ± std`` cells are compared with the across-seed summary. A table preceded
(within three lines) by ``<!-- results: PATH -->`` is compared with that results file
(relative to the repository root) instead."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llm_influence.report.markdown import METHOD_LABELS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "results" / "cpu" / "results.json"
LABEL_TO_METHOD = {**{v: k for k, v in METHOD_LABELS.items()}, "Exact (block)": "exact"}
NUMBER = r"(\d+(?:\.\d+)?)"
CELL = re.compile(rf"^{NUMBER}(?:\s*±\s*{NUMBER})?(?:\s*\[{NUMBER},\s*{NUMBER}\])?\s*/\s*"
                  rf"{NUMBER}(?:\s*±\s*{NUMBER})?(?:\s*\[{NUMBER},\s*{NUMBER}\])?")


def _results_section(text: str) -> str:
    start = text.index("\n## Results")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _tables(section: str):
    """Yield ``(results path, header cells, [row cells])`` of every Markdown table in ``section``."""
    lines = section.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            source = RESULTS
            for back in lines[max(0, i - 3):i]:
                m = re.match(r"^<!-- results: (\S+) -->$", back.strip())
                if m:
                    source = ROOT / m.group(1)
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            yield source, header, rows
        else:
            i += 1


def _pairs():
    section = _results_section(README.read_text(encoding="utf-8"))
    found = []
    for source, header, rows in _tables(section):
        results = json.loads(source.read_text(encoding="utf-8"))
        columns = {}
        for j, cell in enumerate(header):
            m = re.match(r"^(\S+) Acc / Cover", cell)
            if m and m.group(1) in results["tasks"]:
                columns[j] = m.group(1)
        for row in rows:
            method = LABEL_TO_METHOD.get(row[0].replace("*", "").strip())
            for j, task in columns.items():
                if method is None or j >= len(row):
                    continue
                cell = row[j].replace("*", "").strip()
                m = CELL.match(cell)
                assert m, f"README table cell {cell!r} ({task}, {row[0]}) is not 'ACC / COVER'"
                found.append((task, method, m, results["tasks"][task]))
    return found


def test_readme_has_results_tables():
    assert len(_pairs()) >= 10


@pytest.mark.parametrize("task,method,match,entry", _pairs() if RESULTS.is_file() else [])
def test_readme_pair_equals_results_json(task, method, match, entry):
    acc, acc_std, acc_lo, acc_hi, cov, cov_std, cov_lo, cov_hi = match.groups()
    if acc_std is not None:  # mean ± std over seeds
        summary = entry["across_seeds"]["methods"][method]
        assert float(acc) == pytest.approx(round(100 * summary["acc"]["mean"], 1), abs=0.05)
        assert float(acc_std) == pytest.approx(round(100 * summary["acc"]["std"], 1), abs=0.05)
        assert float(cov) == pytest.approx(round(100 * summary["cover"]["mean"], 1), abs=0.05)
        assert float(cov_std) == pytest.approx(round(100 * summary["cover"]["std"], 1), abs=0.05)
        return
    m = entry["methods"][method]
    assert float(acc) == pytest.approx(round(100 * m["acc"], 1), abs=0.05), f"{task} {method} Acc"
    assert float(cov) == pytest.approx(round(100 * m["cover"], 1), abs=0.05), f"{task} {method} Cover"
    for low, high, key in ((acc_lo, acc_hi, "acc_ci95"), (cov_lo, cov_hi, "cover_ci95")):
        if low is not None:
            assert [float(low), float(high)] == pytest.approx([round(100 * v, 1) for v in m[key]], abs=0.05)
