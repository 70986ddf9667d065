"""Scoring attributions and generations: Acc/Cover of a score matrix, attack success rate."""

from .asr import DEFAULT_REFUSAL_KEY, REFUSAL_FILE, attack_success_rate, is_jailbroken, load_refusal_strings
from .metrics import (
    RANK_BY_CHOICES,
    AttributionMetrics,
    acc,
    cover,
    evaluate_scores,
    evaluate_task,
    rank_training,
    relevance_from_task,
)

__all__ = [
    "AttributionMetrics", "DEFAULT_REFUSAL_KEY", "RANK_BY_CHOICES", "REFUSAL_FILE", "acc",
    "attack_success_rate", "cover", "evaluate_scores", "evaluate_task", "is_jailbroken",
    "load_refusal_strings", "rank_training", "relevance_from_task",
]
