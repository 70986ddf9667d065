"""The study registry, the result type and :func:`run_study`.

A *study* is one of the paper's analyses ("why influence functions fail"): a function

    study(profile: str, out_dir: Path, data_dir: Path | None, options: dict) -> StudyResult

registered by name with :func:`register_study`. It computes its numbers, saves its
figure(s) as PNG files inside ``out_dir`` (use :func:`save_figure`, which writes
atomically) and returns a :class:`StudyResult`. :func:`run_study` is the one entry point
(the CLI's ``llm-influence study NAME --profile P --out DIR`` calls it): it validates the
name, profile and options, runs the study, and writes

* ``out_dir/NAME.json``: ``{"study", "profile", "options", "wall_seconds", "environment",
  "figures", "data"}``, where ``data`` is the study's own JSON-serialisable dictionary and
  ``figures`` the PNG file names relative to ``out_dir``;
* ``out_dir/NAME.md``: the study's Markdown section (a table, the figure(s) referenced by
  their path relative to ``out_dir``, and the conventions needed to read the numbers);

both atomically (temporary file + rename), after the study has finished, so an interrupted
study never leaves a half-written or stale-looking result.

Profiles (:data:`PROFILES`): ``"smoke"`` (seconds, for tests), ``"cpu"`` (minutes at most
per study on a 2-core machine), ``"paper"`` (the paper's sizes; may need a GPU or hours).

Options are study-specific keyword arguments with defaults that may depend on the
profile. :func:`resolve_options` rejects unknown names with a :class:`UserError` and
converts strings (as a command line delivers them) to the type of the default, so
``run_study("model-size", "cpu", out, widths="8,32")`` works like ``widths=(8, 32)``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from ..errors import UserError
from ..io_utils import atomic_path, write_json, write_text

PROFILES = ("smoke", "cpu", "paper")

StudyFunction = Callable[[str, Path, Optional[Path], dict], "StudyResult"]


@dataclass
class StudyResult:
    """What a study returns.

    ``name``: the study's registered name. ``data``: JSON-serialisable results (numbers,
    lists, strings, nested dicts; floats must be finite or are written as ``null``).
    ``figures``: paths of the PNG files the study wrote (inside ``out_dir``). ``markdown``:
    a self-contained Markdown section referencing each figure by its path relative to
    ``out_dir``. :func:`run_study` fills ``json_path`` and ``markdown_path``.
    """

    name: str
    data: dict
    figures: list[Path] = field(default_factory=list)
    markdown: str = ""
    json_path: Optional[Path] = None
    markdown_path: Optional[Path] = None


@dataclass(frozen=True)
class StudySpec:
    """A registered study: its name, one-line description and function."""

    name: str
    description: str
    function: StudyFunction


_REGISTRY: dict[str, StudySpec] = {}


def register_study(name: str, description: str = "") -> Callable[[StudyFunction], StudyFunction]:
    """Decorator: make ``function(profile, out_dir, data_dir, options)`` available as ``name``.

    Registering a different function under a name already taken is an error (re-registering
    the same function, e.g. on a module reload, is allowed).
    """

    def decorate(function: StudyFunction) -> StudyFunction:
        old = _REGISTRY.get(name)
        if old is not None and (old.function.__module__, old.function.__qualname__) != (
                function.__module__, function.__qualname__):
            raise ValueError(f"a study named {name!r} is already registered")
        _REGISTRY[name] = StudySpec(name, description or (function.__doc__ or "").strip().split("\n")[0], function)
        return function

    return decorate


def unregister_study(name: str) -> None:
    """Remove a registered study (for tests that register a temporary one)."""
    _REGISTRY.pop(name, None)


def available_studies() -> list[str]:
    """Names of the registered studies, sorted."""
    return sorted(_REGISTRY)


def study_descriptions() -> dict[str, str]:
    """``{name: one-line description}`` of every registered study."""
    return {name: _REGISTRY[name].description for name in available_studies()}


def get_study(name: str) -> StudySpec:
    if name not in _REGISTRY:
        raise UserError(f"unknown study {name!r}; available: {', '.join(available_studies()) or 'none'}")
    return _REGISTRY[name]


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; available: {', '.join(PROFILES)}")
    return profile


# ---------------------------------------------------------------------------------------
# options


def _coerce(study: str, key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default`` when it is a string (command line)."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (tuple, list)):
            items = [v.strip() for v in value.split(",") if v.strip()]
            kind = type(default[0]) if default else str
            return tuple(kind(v) for v in items)
    except ValueError:
        raise UserError(f"study {study!r}: option {key}={value!r} is not a valid "
                        f"{type(default).__name__} (default {default!r})") from None
    return value


def resolve_options(study: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` overridden by ``options``; an unknown option name is a :class:`UserError`.

    String values are converted to the default's type (bool, int, float, or a tuple from a
    comma-separated list), so command-line ``key=value`` pairs can be passed through.
    """
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise UserError(f"study {study!r}: unknown option(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(sorted(defaults)) or 'none'}")
    out = dict(defaults)
    for key, value in options.items():
        out[key] = _coerce(study, key, value, defaults[key])
    return out


# ---------------------------------------------------------------------------------------
# output helpers for studies


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(allow_nan=False)`` accepts.

    Tensors and numpy arrays become (nested) lists, numpy / torch scalars Python numbers,
    tuples lists, paths strings; non-finite floats become ``None`` (JSON has no NaN).
    """
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = None
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if torch is not None and isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if np is not None and isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if np is not None and isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG atomically and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def new_figure(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``—`` for missing, ``.3f``-style for floats (scientific when tiny/huge)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 10 ** (-digits) or abs(value) >= 1e6):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def with_interval(entry: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """``"0.844 [0.719, 0.969]"``: ``entry[key]`` with its ``KEY_ci95`` 95 % bootstrap interval
    (the value alone when the entry has no interval)."""
    value = entry.get(key)
    ci = entry.get(f"{key}_ci95")
    if value is None:
        return fmt(None, digits)
    if not ci:
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table; cells go through :func:`fmt`."""
    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else fmt(v, digits)).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@contextmanager
def torch_threads(n: Optional[int]) -> Iterator[int]:
    """Run with ``n`` intra-op torch threads (``None``: leave the setting), then restore it.

    Studies whose tensors are tiny run single-threaded: on a shared 2-core machine an
    OpenMP thread pool waiting for a busy core makes a 10 x 200 matrix product take
    milliseconds instead of microseconds. Yields the thread count in effect.
    """
    import torch

    previous = torch.get_num_threads()
    if n is not None:
        if int(n) < 1:
            raise UserError(f"threads must be a positive integer, got {n!r}")
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every study (timings depend on them).

    ``torch_threads_default`` is the process's setting; a study that runs with another count
    (:func:`torch_threads`) records it in its own data.
    """
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads_default": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------
# the entry point


def run_study(name: str, profile: str, out_dir: str | Path, data_dir: str | Path | None = None,
              **options: Any) -> StudyResult:
    """Run the registered study ``name`` under ``profile`` and write its results to ``out_dir``.

    Returns the study's :class:`StudyResult` with ``json_path`` (``out_dir/NAME.json``) and
    ``markdown_path`` (``out_dir/NAME.md``) filled in. Unknown study, profile or option
    names raise :class:`UserError` before anything is computed or written.
    """
    spec = get_study(name)
    check_profile(profile)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    data_path = None if data_dir is None else Path(data_dir)
    start = time.perf_counter()
    result = spec.function(profile, out, data_path, dict(options))
    wall = time.perf_counter() - start
    if not isinstance(result, StudyResult):
        raise TypeError(f"study {name!r} returned {type(result).__name__}, not StudyResult")
    figures = [Path(f) for f in result.figures]
    rel = []
    for f in figures:
        if not f.is_file():
            raise RuntimeError(f"study {name!r}: figure {f} was not written")
        try:
            r = f.resolve().relative_to(out.resolve()).as_posix()
        except ValueError:
            raise RuntimeError(f"study {name!r}: figure {f} is not inside {out}") from None
        if r not in result.markdown:
            raise RuntimeError(f"study {name!r}: the markdown does not reference figure {r}")
        rel.append(r)
    record = {
        "study": name,
        "profile": profile,
        "options": jsonable(options),
        "wall_seconds": wall,
        "environment": environment(),
        "figures": rel,
        "data": jsonable(result.data),
    }
    json.dumps(record, allow_nan=False)  # fail before writing, not halfway
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    write_json(json_path, record)
    markdown = result.markdown.rstrip() + "\n"
    write_text(md_path, markdown)
    result.figures = figures
    result.json_path, result.markdown_path = json_path, md_path
    return result
