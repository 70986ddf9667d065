"""The two core data objects: :class:`Example` and :class:`TaskData`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Example:
    """One training or test example.

    ``group`` is the ground-truth class used by the metrics (``harmful``, ``benign``,
    ``trigger_2``, ``Reverse Order of Words``, ...). ``id`` is unique within its split.
    """

    id: str
    prompt: str
    response: str
    group: str


def same_group(test_ex: Example, train_ex: Example) -> bool:
    return test_ex.group == train_ex.group


@dataclass
class TaskData:
    """A task: training and test examples plus the ground-truth relation.

    ``val`` holds the validation examples (fine-tuning's validation loss and early
    stopping): drawn from the task's test file but never attributed or scored, so nothing
    about the model selection leaks into Acc/Cover (see :func:`~llm_influence.data.tasks.load_task`).

    ``relevant(test_ex, train_ex)`` says whether a training example is a correct answer
    for a test example (default: same group). ``k(test_ex)`` is the Cover cut-off: the
    number of training examples relevant to that test example.
    """

    name: str
    train: list[Example]
    test: list[Example]
    description: str = ""
    val: list[Example] = field(default_factory=list)
    relevant_fn: Callable[[Example, Example], bool] = field(default=same_group, repr=False)

    def relevant(self, test_ex: Example, train_ex: Example) -> bool:
        return self.relevant_fn(test_ex, train_ex)

    def k(self, test_ex: Example) -> int:
        return sum(1 for tr in self.train if self.relevant(test_ex, tr))

    def relevance_matrix(self) -> list[list[bool]]:
        """``[n_test][n_train]`` booleans, the ground truth the metrics score against."""
        return [[self.relevant(te, tr) for tr in self.train] for te in self.test]

    def group_counts(self, split: str) -> dict[str, int]:
        examples = {"train": self.train, "test": self.test, "val": self.val}[split]
        return dict(Counter(ex.group for ex in examples))
