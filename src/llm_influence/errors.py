"""Errors a user can cause.

A :class:`UserError` carries a one-line message that names what is wrong (file, line and
field where there is one). The CLI prints it and exits with status 2; library callers can
catch it. Anything else escaping the CLI is a bug in this package.
"""

from __future__ import annotations

import sys
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, paths, environment or arguments (exit status 2)."""

    exit_status = 2


def input_error(path: str | Path, line: int | None, field: str | None, problem: str) -> UserError:
    """Build the canonical ``FILE:LINE: field 'F': problem`` message for bad input data."""
    where = str(path)
    if line is not None:
        where += f":{line}"
    if field is not None:
        return UserError(f"{where}: field '{field}': {problem}")
    return UserError(f"{where}: {problem}")


def warn(message: str) -> None:
    """One ``llm-influence: warning: ...`` line on stderr (shown even with ``--quiet``: it
    reports a documented handling of the user's input, not progress)."""
    print(f"llm-influence: warning: {message}", file=sys.stderr, flush=True)
