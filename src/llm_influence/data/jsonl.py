"""Strict JSONL reading: every problem becomes a one-line :class:`UserError` naming the
file, the 1-based line and the field.

Accepted on purpose (documented handling, not errors): a UTF-8 byte-order mark at the start
of the file, ``\r\n`` (Windows) and lone ``\r`` (old Mac) line endings (a raw CR can only be
whitespace in valid JSON, so splitting on it never cuts a value), blank lines, extra fields,
and lines of any length (texts are cut to ``--max-length`` tokens when encoded). Rejected:
invalid UTF-8, invalid JSON (including nesting too deep to parse and integers too long to
convert), a line that is not a JSON object, and strings with unpaired surrogate escapes
(``"\ud800"``), which are not text and cannot be tokenized or written back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import UserError, input_error
from .example import Example

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


def iter_json_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a JSONL file")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    for number, line in enumerate(_LINE_BREAK.split(raw), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise input_error(path, number, None, f"invalid UTF-8 at byte {exc.start}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise input_error(path, number, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise input_error(path, number, None, "invalid JSON (nested too deeply to parse)") from None
        except ValueError as exc:  # e.g. an integer literal longer than Python converts
            raise input_error(path, number, None, f"invalid JSON ({str(exc).split(';')[0]})") from None
        if not isinstance(obj, dict):
            raise input_error(path, number, None, f"expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def _check_text(path: Path, number: int, name: str, value: str) -> str:
    """``value`` unchanged, or an error if it holds an unpaired surrogate (not encodable text)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise input_error(path, number, name, f"unpaired surrogate escape \\u{ord(value[exc.start]):04x} "
                          f"at character {exc.start} (not valid Unicode text)") from None
    return value


def string_field(path: Path, number: int, obj: dict, name: str, allow_empty: bool = False) -> str:
    if name not in obj:
        raise input_error(path, number, name, "missing")
    value = obj[name]
    if not isinstance(value, str):
        raise input_error(path, number, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise input_error(path, number, name, "empty")
    return _check_text(path, number, name, value)


def unique_id(path: Path, number: int, obj: dict, id_field: str | None, default: str, seen: dict[str, int]) -> str:
    """The line's id (``obj[id_field]``: a non-empty string or an integer, else ``default``),
    checked against and recorded in ``seen`` (``{id: line}``), so duplicates name both lines."""
    if id_field is not None and id_field in obj:
        raw_id = obj[id_field]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            raise input_error(path, number, id_field, f"expected a string or integer, got {type(raw_id).__name__}")
        ex_id = _check_text(path, number, id_field, str(raw_id))
        if not ex_id.strip():
            raise input_error(path, number, id_field, "empty")
    else:
        ex_id = default
    if ex_id in seen:
        raise input_error(path, number, id_field or "id", f"duplicate id {ex_id!r} (first on line {seen[ex_id]})")
    seen[ex_id] = number
    return ex_id


def read_examples(path: str | Path, **options: Any) -> list[Example]:
    """Read a JSONL file of examples (``options``: those of :func:`read_examples_with_lines`).

    Each line is an object with string fields ``prompt_field``, ``response_field`` and
    ``group_field`` (non-empty), and optionally ``id_field`` (string or integer, unique).
    Without an id, the example's id is ``{id_prefix}{row}`` with the 0-based row index.
    """
    return read_examples_with_lines(path, **options)[0]


def read_examples_with_lines(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    group_field: str = "group",
    id_field: str | None = "id",
    id_prefix: str = "",
    required_groups: bool = True,
) -> tuple[list[Example], list[int]]:
    """:func:`read_examples` plus each example's 1-based line number in the file."""
    path = Path(path)
    examples: list[Example] = []
    lines: list[int] = []
    seen: dict[str, int] = {}
    for row, (number, obj) in enumerate(iter_json_objects(path)):
        prompt = string_field(path, number, obj, prompt_field)
        response = string_field(path, number, obj, response_field)
        if required_groups or group_field in obj:
            group = string_field(path, number, obj, group_field)
        else:
            group = ""
        ex_id = unique_id(path, number, obj, id_field, f"{id_prefix}{row}", seen)
        examples.append(Example(id=ex_id, prompt=prompt, response=response, group=group))
        lines.append(number)
    if not examples:
        raise UserError(f"{path}: empty file (no examples)")
    return examples, lines


def check_unique_ids(examples: Sequence[Example], source: str) -> None:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise UserError(f"{source}: duplicate id {ex.id!r}")
        seen.add(ex.id)
