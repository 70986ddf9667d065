"""Per-example LoRA gradients, representations and their on-disk store.

* :func:`extract_features` / :func:`build_hvp` (:mod:`.extract`): cached extraction for a
  run's checkpoint, and true Hessian-vector products of its training loss;
* :mod:`.gradients`: per-example gradients (one batched forward + backward with hooks) and
  K-FAC factors; :mod:`.representations`: pooled hidden states; :mod:`.hvp`: double
  backward; :mod:`.store`: the safetensors files under ``RUN/features/epoch-N/``.

The heavy entry points are imported lazily, so ``from llm_influence.features.types import
Features`` stays cheap and free of import cycles.
"""

from .types import HVP, Features, KFACFactors

__all__ = ["Features", "HVP", "KFACFactors", "build_hvp", "extract_features"]


def __getattr__(name: str):
    if name in ("extract_features", "build_hvp"):
        from . import extract

        return getattr(extract, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
