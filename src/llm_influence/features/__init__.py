"""Per-example LoRA gradients, representations and their on-disk store."""

from .types import HVP, Features, KFACFactors

__all__ = ["Features", "HVP", "KFACFactors"]
