"""Task data: :class:`Example`, :class:`TaskData`, JSONL reading and the paper's tasks."""

from .example import Example, TaskData, same_group
from .jsonl import read_examples
from .tasks import DATA_ENV, PAPER_TASKS, load_task, resolve_data_dir, subsample

__all__ = [
    "DATA_ENV", "Example", "PAPER_TASKS", "TaskData", "load_task", "read_examples",
    "resolve_data_dir", "same_group", "subsample",
]
