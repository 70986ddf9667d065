"""Reading ``RUN/train_log.jsonl`` robustly.

The log is appended one fsync'ed line at a time, so a process killed while writing can leave
its last line cut short, and a run resumed by an older version of this package logged the
steps of the interrupted epoch twice. :func:`read_train_log` returns the effective log: a
malformed line is skipped, and when the step counter goes back (a resume), the rows it
supersedes are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_train_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a training log (``[]`` if it does not exist), as one uninterrupted run
    would have written them."""
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            continue
        if row.get("kind") == "step" and isinstance(row.get("step"), int):
            last_step = max((r["step"] for r in rows if r.get("kind") == "step"), default=0)
            if row["step"] <= last_step:  # a resume redid these steps: keep the new rows only
                rows = [r for r in rows if not ((r.get("kind") == "step" and r["step"] >= row["step"])
                                                or (r.get("kind") == "epoch" and r["epoch"] >= row["epoch"]))]
        elif row.get("kind") == "epoch":
            rows = [r for r in rows if not (r.get("kind") == "epoch" and r["epoch"] == row["epoch"])]
        rows.append(row)
    return rows
