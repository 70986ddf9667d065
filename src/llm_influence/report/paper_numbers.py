"""The published numbers of "Do Influence Functions Work on Large Language Models?"
(Li, Zhao, Li, Sun; arXiv 2409.19998), for side-by-side comparison in the report.

Conventions:

* Numbers are **percentages** (Acc and Cover in %, as the paper prints them), not
  fractions. The report prints ours as percentages too.
* Keys are this project's task names (``mixed-small``, ``backdoor-3``, ...) and method
  names. The paper's "LiSSA" is the authors' recursion (their ``utils.py``), which is this
  project's ``lissa-paper``, not its converged solver ``lissa``; the paper's LiSSA numbers
  are therefore keyed ``lissa-paper`` so that the report sets them beside the same
  algorithm.
* Two kinds of reference numbers, never mixed in one column:

  - **published** (:data:`PAPER_TABLES` entries with ``kind="published"``): read in the
    paper's text, each with its source; a table whose published numbers could not be
    read says so in its ``note``.
  - **released scores** (``kind="released-scores"``): Acc/Cover that
    ``shared/data/PAPER_CODE_NOTES.md`` derives from the authors' released influence
    matrices (``cache/`` of plumprc/Failures-of-Influence-Functions-in-LLMs at 93f9489)
    with the v2 metric (ranking by −IF). They are the authors' own runs but not the
    paper's tables; the report labels them "from the authors' released scores".

Provenance as of this module's writing:

* **Model.** Section 3 of the paper's text names Llama2-7B (the chat model) as the model
  fine-tuned for Tables 2–4; the default model of the authors' code at both released
  commits is ``Llama-2-7b-chat(-hf)``.
* **Table 4** (backdoor trigger detection, 1 / 3 / 5 triggers): the values below were
  handed to this module's author in the project brief as the paper's Table 4. An attempt
  to re-read them from the stored copy of https://arxiv.org/html/2409.19998v2 found the
  page but no excerpt that contains the table, so they are marked ``verified=False``.
* **Table 2** (harmful data identification, Mixed small / large) and **Table 3** (class
  attribution: Grammars, MathQA, HarmfulCheck): searches of the stored arXiv v2 HTML
  page (https://arxiv.org/html/2409.19998v2), the arXiv v1 abstract page, the OpenReview
  forum (https://openreview.net/forum?id=hnsiuIcRT7), the ACL Anthology entry
  (2025.findings-emnlp.775) and the authors' repository
  (plumprc/Failures-of-Influence-Functions-in-LLMs, whose README has no results) returned
  no text of these tables. Their published columns stay empty; the released-score
  columns (Llama-2-7b-chat and Mistral-7B-Instruct-v0.3 on mixedS and math) stand beside
  them. The authors' released grammars matrices are for the v2 rule-naming data, this
  project's ``grammars-rule`` task (not Table 3's ``grammars``), so they are listed under
  :data:`OTHER_TASK_REFERENCES`.
* **Table 5** (approximation error and time on MNIST): the errors of every method and the
  times of Original (exact) and DataInf come from the project brief; the times of LiSSA
  and GradSim could not be read in any stored copy, so they are absent (see
  ``studies/approximation.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

PAPER_TITLE = "Do Influence Functions Work on Large Language Models?"
PAPER_AUTHORS = "Zhe Li, Wei Zhao, Yige Li, Jun Sun"
PAPER_ARXIV = "arXiv 2409.19998"
PAPER_URL = "https://arxiv.org/abs/2409.19998"
PAPER_HTML_V2 = "https://arxiv.org/html/2409.19998v2"

#: The methods the paper compares, in the paper's order.
#: ``lissa-paper`` is the LiSSA the authors ran; ``lissa`` (a converged solver of the same
#: damped system) is listed beside it because it is what the paper's text describes.
PAPER_METHODS: tuple[str, ...] = ("datainf", "lissa-paper", "lissa", "gradsim", "repsim")

#: The model the paper's text (Section 3) names for Tables 2-4.
PAPER_MODEL = "Llama-2-7b-chat"

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
        kind: ``"published"`` (the paper's tables) or ``"released-scores"`` (derived
            from the authors' released influence matrices).
        rank_by: the ranking the numbers were computed with (``"score"``: −IF,
            ``"abs"``: |IF|), or ``None`` when the source does not say; the report shows
            a column only beside our numbers under the same ranking, or when ``None``.
    """

    model: Optional[str]
    values: Mapping[str, Mapping[str, AccCover]]
    source: str
    verified: bool
    note: str = ""
    kind: str = "published"
    rank_by: Optional[str] = None

    @property
    def label(self) -> str:
        """The column label: ``"paper"`` or ``"authors' released scores, MODEL"``."""
        if self.kind == "released-scores":
            return f"authors' released scores, {self.model}"
        return f"paper, {self.model}" if self.model else "paper"


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
    "lissa-paper": {"backdoor-1": (53.0, 49.8), "backdoor-3": (31.0, 24.8), "backdoor-5": (16.3, 16.6)},
    "gradsim": {"backdoor-1": (78.0, 63.7), "backdoor-3": (37.0, 35.3), "backdoor-5": (37.7, 23.1)},
    "repsim": {"backdoor-1": (100.0, 99.4), "backdoor-3": (96.0, 57.4), "backdoor-5": (90.3, 40.5)},
}

_RELEASED_SOURCE = ("Acc/Cover derived in shared/data/PAPER_CODE_NOTES.md from the authors' released "
                    "influence matrices (plumprc/Failures-of-Influence-Functions-in-LLMs @ 93f9489, cache/), "
                    "v2 metric: ranking by -IF, k = the group size")


def _released(model: str, values: dict[str, dict[str, AccCover]]) -> PaperResults:
    return PaperResults(model=model, values=values, source=_RELEASED_SOURCE, verified=True,
                        kind="released-scores", rank_by="score",
                        note="the authors' runs (their data, model and code), not a table of the paper")


# ``inf`` = DataInf, ``lissa`` = their recursion (our lissa-paper), ``gmatch`` = GradSim.
_RELEASED_LLAMA = {
    "datainf": {"mixed-small": (90.0, 61.4), "math": (100.0, 82.5), "grammars-rule": (39.0, 24.4)},
    "lissa-paper": {"mixed-small": (17.5, 54.7), "math": (100.0, 84.5), "grammars-rule": (15.0, 12.9)},
    "gradsim": {"mixed-small": (17.5, 54.7), "math": (100.0, 84.5), "grammars-rule": (14.0, 12.6)},
}
_RELEASED_MISTRAL = {
    "datainf": {"mixed-small": (97.5, 42.5), "math": (96.0, 68.0), "grammars-rule": (35.0, 24.4)},
    "lissa-paper": {"mixed-small": (87.5, 52.0)},
    "gradsim": {"mixed-small": (87.5, 52.1), "math": (94.0, 74.9), "grammars-rule": (50.0, 28.2)},
}
RELEASED_SCORES: tuple[PaperResults, ...] = (
    _released("Llama-2-7b-chat", _RELEASED_LLAMA),
    _released("Mistral-7B-Instruct-v0.3", _RELEASED_MISTRAL),
)



def released_for(tasks: tuple[str, ...]) -> tuple[PaperResults, ...]:
    """:data:`RELEASED_SCORES` restricted to ``tasks`` (models without any such task dropped)."""
    out = []
    for res in RELEASED_SCORES:
        values = {m: {t: v for t, v in cells.items() if t in tasks} for m, cells in res.values.items()}
        values = {m: cells for m, cells in values.items() if cells}
        if values:
            out.append(replace(res, values=values))
    return tuple(out)


PAPER_TABLES: dict[int, PaperTable] = {
    2: PaperTable(
        number=2,
        title="Harmful data identification",
        tasks=("mixed-small", "mixed-large"),
        caption=None,
        results=released_for(("mixed-small", "mixed-large")),
        note=("the text of Table 2 could not be read in any stored copy of the paper "
              f"(searched {PAPER_HTML_V2}, the v1 abstract page, OpenReview hnsiuIcRT7, "
              "ACL Anthology 2025.findings-emnlp.775)"),
    ),
    3: PaperTable(
        number=3,
        title="Class attribution",
        tasks=("grammars", "math", "harmfulcheck"),
        caption=None,
        results=released_for(("grammars", "math", "harmfulcheck")),
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
                model=PAPER_MODEL,
                values=_TABLE4_VALUES,
                source=f"{PAPER_ARXIV}, Table 4 (1, 3 and 5 triggers), as stated in the project brief",
                verified=False,
                note=("handed over in the project brief; the stored copy of "
                      f"{PAPER_HTML_V2} could not be read at the table, so not re-checked; "
                      "the model is the one the paper's Section 3 names for Tables 2-4"),
            ),
        ),
    ),
}


#: Reference numbers for tasks outside the paper's Tables 2-4 (shown in the report's
#: "Other tasks" table): the authors' released grammars matrices are for the v2 rule-naming
#: data, this project's ``grammars-rule``.
OTHER_TASK_REFERENCES = PaperTable(
    number=0,
    title="Other tasks",
    tasks=("grammars-rule",),
    caption=None,
    results=released_for(("grammars-rule",)),
    note="no published numbers; the authors' released scores where they exist",
)


def paper_table_for_task(task: str) -> Optional[PaperTable]:
    """The paper table whose columns include ``task``, or ``None``."""
    for table in PAPER_TABLES.values():
        if task in table.tasks:
            return table
    return None


def paper_value(table: int, method: str, task: str, model: Optional[str] = None) -> Optional[AccCover]:
    """``(acc_percent, cover_percent)`` the paper *publishes* for ``method`` on ``task`` in
    table ``table``, for ``model`` (``None``: the table's first model with a value), or
    ``None`` when not recorded. Released-score numbers are not returned (see
    :data:`RELEASED_SCORES`)."""
    entry = PAPER_TABLES.get(table)
    if entry is None:
        return None
    for res in entry.results:
        if res.kind != "published":
            continue
        if model is not None and res.model != model:
            continue
        cell = res.values.get(method, {}).get(task)
        if cell is not None:
            return cell
    return None
