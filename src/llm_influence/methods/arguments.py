"""Typed method arguments: one frozen dataclass per method, declared next to the method.

A method's ``Arguments`` class (a :class:`MethodArguments` dataclass) lists every argument
with its default and help text (:func:`argument`), checks the values in ``__post_init__``
(raising :class:`ArgumentError` naming the field) and is the single source of:

* the keyword arguments of ``make_method(name, **kwargs)``;
* the ``--method-arg NAME.FIELD=VALUE`` option of the command line (values parsed by
  :func:`parse_text`, then checked by the dataclass), and the shared options such as
  ``--damping`` for fields declared ``shared=True``;
* what is recorded beside the scores (``dataclasses.asdict``).

Like kronfluence's argument classes, but per method. Example::

    @dataclass(frozen=True)
    class LiSSAArguments(MethodArguments):
        iterations: int = argument(10, "Neumann-series steps", check=positive_int)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..errors import UserError


class ArgumentError(UserError):
    """A bad method argument (the user's error: one line, exit status 2)."""


def argument(default: Any, help: str, *, check: Optional[Callable[[str, Any], Any]] = None,
             choices: Optional[Sequence[str]] = None, shared: bool = False) -> Any:
    """A dataclass field with ``help`` text. ``check(field_name, value) -> value`` validates
    and normalises the value (e.g. ``"3"`` -> ``3``); ``choices`` restricts it to a finite
    set; ``shared=True`` offers the field as a command-line option of its own
    (``--damping``) that sets it in every chosen method declaring it."""
    return dataclasses.field(default=default, metadata={
        "help": help, "check": check, "choices": tuple(choices) if choices else None, "shared": shared})


def check_fields(args: Any) -> None:
    """Run every field's ``check``/``choices`` on a (frozen) dataclass instance in place;
    call from ``__post_init__``."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ArgumentError(f"{f.name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        check = f.metadata.get("check")
        if check is not None:
            object.__setattr__(args, f.name, check(f.name, value))


@dataclass(frozen=True)
class MethodArguments:
    """Base of every ``Arguments`` class: a frozen dataclass whose ``__post_init__`` runs
    each field's ``check`` and ``choices`` (:func:`check_fields`). Subclass it with
    ``@dataclass(frozen=True)`` and :func:`argument` fields."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class NoArguments(MethodArguments):
    """A method without arguments."""


def field_help(cls: type) -> dict[str, str]:
    """``{field: "help (default X)"}`` of an ``Arguments`` class."""
    out = {}
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        extra = f"; one of {', '.join(choices)}" if choices else ""
        out[f.name] = f"{f.metadata.get('help', '')} (default {f.default!r}{extra})"
    return out


def parse_text(text: str) -> Any:
    """A command-line value: ``none``/``null`` -> None, ``true``/``false`` -> bool, an
    integer or float literal -> int/float, anything else stays a string (the field's check
    converts or refuses it)."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# ---------------------------------------------------------------------------------------
# field checks: ``check(field_name, value) -> normalised value``; raise ArgumentError

def positive_int(name: str, value: Any) -> int:
    out = value
    if isinstance(value, str):
        try:
            out = int(value)
        except ValueError:
            out = None
    elif isinstance(value, float) and value.is_integer():
        out = int(value)
    if isinstance(out, bool) or not isinstance(out, int) or out < 1:
        raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
    return out


def integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{name} must be an integer, got {value!r}")
    return value


def positive_float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if isinstance(value, bool) or not (out > 0 and math.isfinite(out)):
        raise ArgumentError(f"{name} must be a positive finite number, got {value!r}")
    return out


def optional_positive_float(name: str, value: Any) -> Optional[float]:
    """None (or ``"auto"``) stays None; otherwise a positive finite float."""
    if value is None or value == "auto":
        return None
    return positive_float(name, value)


def positive_float_or_auto(name: str, value: Any) -> float | str:
    return "auto" if value == "auto" else positive_float(name, value)
