"""Progress bars (rich) for stages that take more than a few seconds; silent when quiet."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


@contextmanager
def progress(total: int, description: str) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; renders a bar on stderr unless quiet."""
    if _QUIET or total <= 0:
        yield lambda n=1, **kw: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            bar.update(task, advance=n, info=info)

        yield advance


def log(message: str) -> None:
    """A one-line status message on stderr (suppressed when quiet)."""
    if not _QUIET:
        print(message, file=sys.stderr, flush=True)
