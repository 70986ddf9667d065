"""The published numbers of "Do Influence Functions Work on Large Language Models?"
(Li, Zhao, Li, Sun; arXiv 2409.19998), for side-by-side comparison in the report.

Conventions:

* Numbers are **percentages** (Acc and Cover in %, as the paper prints them), not
  fractions. The report prints ours as percentages too.
* Keys are this project's task names (``mixed-small``, ``backdoor-3``, ...) and method
  names (``datainf``, ``lissa``, ``gradsim``, ``repsim``).
* Only numbers actually read in a source are recorded, each table with its source and
  caption. A table whose numbers could not be read is present with ``results=()`` and a
  ``note`` saying so; the report then shows no paper column for it. Nothing is filled in
  from memory or from the authors' released score matrices (those give different
  numbers; see ``shared/data/PAPER_CODE_NOTES.md``).

Provenance as of this module's writing:

* **Table 4** (backdoor trigger detection, 1 / 3 / 5 triggers): the values below were
  handed to this module's author in the project brief as the paper's Table 4. An attempt
  to re-read them from the stored copy of https://arxiv.org/html/2409.19998v2 found the
  page but no excerpt that contains the table, so they are marked ``verified=False``. The
  brief does not name the model of Table 4; it is recorded as ``None``, not guessed.
* **Table 2** (harmful data identification, Mixed small / large) and **Table 3** (class
  attribution: Grammars, MathQA, HarmfulCheck): searches of the stored arXiv v2 HTML
  page (https://arxiv.org/html/2409.19998v2), the arXiv v1 abstract page, the OpenReview
  forum (https://openreview.net/forum?id=hnsiuIcRT7), the ACL Anthology entry
  (2025.findings-emnlp.775) and the authors' repository
  (plumprc/Failures-of-Influence-Functions-in-LLMs, whose README has no results) returned
  no text of these tables. They are left empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

PAPER_TITLE = "Do Influence Functions Work on Large Language Models?"
PAPER_AUTHORS = "Zhe Li, Wei Zhao, Yige Li, Jun Sun"
PAPER_ARXIV = "arXiv 2409.19998"
PAPER_URL = "https://arxiv.org/abs/2409.19998"
PAPER_HTML_V2 = "https://arxiv.org/html/2409.19998v2"

#: The methods the paper compares, in the paper's order.
PAPER_METHODS: tuple[str, ...] = ("datainf", "lissa", "gradsim", "repsim")

AccCover = tuple[Optional[float], Optional[float]]


@dataclass(frozen=True)
class PaperResults:
    """One model's numbers in one of the paper's tables.

    Attributes:
        model: the model the paper ran (e.g. ``"Llama-2-7b-chat"``), or ``None`` when the
            source this was read from does not say.
        values: ``{method: {task: (acc_percent, cover_percent)}}``; either entry may be
            ``None`` when the paper leaves the cell empty.
        source: where the numbers were read (URL or description).
        verified: whether the numbers were checked against the source text in this
            project (``False``: recorded from a secondary statement, see ``note``).
        note: provenance details.
    """

    model: Optional[str]
    values: Mapping[str, Mapping[str, AccCover]]
    source: str
    verified: bool
    note: str = ""


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's result tables and the numbers known for it.

    Attributes:
        number: the table's number in the paper (2, 3 or 4).
        title: what the table measures.
        tasks: this project's task names for the table's columns, in the paper's order.
        caption: the table's caption where it was read, else ``None``.
        results: one :class:`PaperResults` per model; empty when no number was found.
        note: why the table is empty or partial, if it is.
    """

    number: int
    title: str
    tasks: tuple[str, ...]
    caption: Optional[str]
    results: tuple[PaperResults, ...] = field(default_factory=tuple)
    note: str = ""


_TABLE4_VALUES: dict[str, dict[str, AccCover]] = {
    # Acc / Cover in %, for 1 / 3 / 5 triggers.
    "datainf": {"backdoor-1": (94.0, 60.9), "backdoor-3": (52.0, 35.2), "backdoor-5": (36.0, 23.3)},
    "lissa": {"backdoor-1": (53.0, 49.8), "backdoor-3": (31.0, 24.8), "backdoor-5": (16.3, 16.6)},
    "gradsim": {"backdoor-1": (78.0, 63.7), "backdoor-3": (37.0, 35.3), "backdoor-5": (37.7, 23.1)},
    "repsim": {"backdoor-1": (100.0, 99.4), "backdoor-3": (96.0, 57.4), "backdoor-5": (90.3, 40.5)},
}

PAPER_TABLES: dict[int, PaperTable] = {
    2: PaperTable(
        number=2,
        title="Harmful data identification",
        tasks=("mixed-small", "mixed-large"),
        caption=None,
        results=(),
        note=("the text of Table 2 could not be read in any stored copy of the paper "
              f"(searched {PAPER_HTML_V2}, the v1 abstract page, OpenReview hnsiuIcRT7, "
              "ACL Anthology 2025.findings-emnlp.775)"),
    ),
    3: PaperTable(
        number=3,
        title="Class attribution",
        tasks=("grammars", "math", "harmfulcheck"),
        caption=None,
        results=(),
        note=("the text of Table 3 could not be read in any stored copy of the paper "
              f"(searched {PAPER_HTML_V2}, the v1 abstract page, OpenReview hnsiuIcRT7, "
              "ACL Anthology 2025.findings-emnlp.775)"),
    ),
    4: PaperTable(
        number=4,
        title="Backdoor trigger detection",
        tasks=("backdoor-1", "backdoor-3", "backdoor-5"),
        caption=None,
        results=(
            PaperResults(
                model=None,
                values=_TABLE4_VALUES,
                source=f"{PAPER_ARXIV}, Table 4 (1, 3 and 5 triggers), as stated in the project brief",
                verified=False,
                note=("handed over in the project brief; the stored copy of "
                      f"{PAPER_HTML_V2} could not be read at the table, so not re-checked; "
                      "the model is not stated in the brief"),
            ),
        ),
    ),
}


def paper_table_for_task(task: str) -> Optional[PaperTable]:
    """The paper table whose columns include ``task``, or ``None``."""
    for table in PAPER_TABLES.values():
        if task in table.tasks:
            return table
    return None


def paper_value(table: int, method: str, task: str, model: Optional[str] = None) -> Optional[AccCover]:
    """``(acc_percent, cover_percent)`` the paper reports for ``method`` on ``task`` in
    table ``table``, for ``model`` (``None``: the table's first model with a value), or
    ``None`` when not recorded."""
    entry = PAPER_TABLES.get(table)
    if entry is None:
        return None
    for res in entry.results:
        if model is not None and res.model != model:
            continue
        cell = res.values.get(method, {}).get(task)
        if cell is not None:
            return cell
    return None
