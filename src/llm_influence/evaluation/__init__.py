"""Scoring attributions and generations: Acc/Cover of a score matrix, attack success rate."""

from .asr import (
    DEFAULT_REFUSAL_KEY,
    REFUSAL_FILE,
    asr_summary,
    attack_success_rate,
    is_degenerate,
    is_jailbroken,
    load_refusal_strings,
)
from .metrics import (
    RANK_BY_CHOICES,
    TIE_RULE,
    AttributionMetrics,
    acc,
    cover,
    evaluate_scores,
    evaluate_task,
    expected_relevant_in_top,
    rank_training,
    relevance_from_task,
    tie_ranks,
)
from .uncertainty import bootstrap_ci, seed_summary

__all__ = [
    "AttributionMetrics", "DEFAULT_REFUSAL_KEY", "RANK_BY_CHOICES", "REFUSAL_FILE", "acc",
    "asr_summary", "attack_success_rate", "cover", "evaluate_scores", "evaluate_task", "is_degenerate",
    "is_jailbroken", "load_refusal_strings", "rank_training", "relevance_from_task",
    "TIE_RULE", "bootstrap_ci", "expected_relevant_in_top", "seed_summary", "tie_ranks",
]
