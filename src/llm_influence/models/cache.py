"""Where converted models are cached (``$LLM_INFLUENCE_CACHE``, else the user cache dir)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LLM_INFLUENCE_CACHE"


def cache_dir() -> Path:
    """``$LLM_INFLUENCE_CACHE`` or ``$XDG_CACHE_HOME/llm-influence`` or ``~/.cache/llm-influence``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base).expanduser() / "llm-influence"
