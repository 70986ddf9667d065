"""Uncertainty of a reported number: bootstrap intervals over test examples, and the
spread across fine-tuning seeds.

Two sources of variation are reported separately, because they answer different questions:

* :func:`bootstrap_ci` — *which test examples were drawn*: a 95 % percentile-bootstrap
  interval of a mean of per-test-example values (Acc hits, Cover fractions, ...), resampling
  the test examples with replacement. Seeded, so a results file regenerates bitwise.
* :func:`seed_summary` — *which training run we got*: mean and sample standard deviation
  (ddof = 1) of one metric over independent fine-tuning seeds.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: resamples of every bootstrap interval the project reports (the issue asks for >= 1,000)
DEFAULT_RESAMPLES = 2000
#: seed of the bootstrap's resampling (fixed, so intervals are reproducible)
DEFAULT_CI_SEED = 0
CI_LEVEL = 0.95


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, n_resamples: int = DEFAULT_RESAMPLES,
                 seed: int = DEFAULT_CI_SEED, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``mean(values)``.

    Args:
        values: ``[n]`` finite per-test-example values (e.g. Acc hits in ``[0, 1]``).
        n_resamples: bootstrap resamples (>= 1).
        seed: seed of the resampling (``numpy.random.default_rng``).
        level: coverage, in ``(0, 1)``.

    Returns:
        ``(low, high)``, the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
        resampled means (``numpy.quantile``, linear interpolation); ``(nan, nan)`` for no
        values, ``(v, v)`` when every value is ``v``.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if arr.size == 0:
        return (math.nan, math.nan)
    if not np.all(np.isfinite(arr)):
        raise ValueError("bootstrap_ci: values must be finite")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_resamples, arr.size))
    means = arr[idx].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    # a constant sample gives exactly that constant (no rounding in the mean of equal values)
    return (float(min(low, arr.mean())), float(max(high, arr.mean())))


def seed_summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n_seeds", "min", "max"}`` of one metric over fine-tuning seeds.

    ``std`` is the sample standard deviation (ddof = 1), ``None`` for a single seed (the
    spread of one run is unknown, not zero)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("seed_summary of no values")
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
            "n_seeds": int(arr.size), "min": float(arr.min()), "max": float(arr.max())}
