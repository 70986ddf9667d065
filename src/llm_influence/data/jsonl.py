"""Strict JSONL reading: every problem becomes a one-line :class:`UserError` naming the
file, the 1-based line and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import UserError, input_error
from .example import Example


def iter_json_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    for number, line in enumerate(raw.split(b"\n"), start=1):
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
        if not isinstance(obj, dict):
            raise input_error(path, number, None, f"expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def _string_field(path: Path, number: int, obj: dict, name: str, allow_empty: bool = False) -> str:
    if name not in obj:
        raise input_error(path, number, name, "missing")
    value = obj[name]
    if not isinstance(value, str):
        raise input_error(path, number, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise input_error(path, number, name, "empty")
    return value


def read_examples(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    group_field: str = "group",
    id_field: str | None = "id",
    id_prefix: str = "",
    required_groups: bool = True,
) -> list[Example]:
    """Read a JSONL file of examples.

    Each line is an object with string fields ``prompt_field``, ``response_field`` and
    ``group_field`` (non-empty), and optionally ``id_field`` (string or integer, unique).
    Without an id, the example's id is ``{id_prefix}{row}`` with the 0-based row index.
    """
    path = Path(path)
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for row, (number, obj) in enumerate(iter_json_objects(path)):
        prompt = _string_field(path, number, obj, prompt_field)
        response = _string_field(path, number, obj, response_field)
        if required_groups or group_field in obj:
            group = _string_field(path, number, obj, group_field)
        else:
            group = ""
        if id_field is not None and id_field in obj:
            raw_id = obj[id_field]
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                raise input_error(path, number, id_field, f"expected a string or integer, got {type(raw_id).__name__}")
            ex_id = str(raw_id)
            if not ex_id.strip():
                raise input_error(path, number, id_field, "empty")
        else:
            ex_id = f"{id_prefix}{row}"
        if ex_id in seen:
            raise input_error(path, number, id_field or "id", f"duplicate id {ex_id!r} (first on line {seen[ex_id]})")
        seen[ex_id] = number
        examples.append(Example(id=ex_id, prompt=prompt, response=response, group=group))
    if not examples:
        raise UserError(f"{path}: empty file (no examples)")
    return examples


def check_unique_ids(examples: Sequence[Example], source: str) -> None:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise UserError(f"{source}: duplicate id {ex.id!r}")
        seen.add(ex.id)
