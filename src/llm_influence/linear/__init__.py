"""Convex models with exact derivatives, for checking attribution methods.

:class:`SoftmaxRegression` is multinomial logistic regression in float64 with closed-form
per-example gradients, the exact Hessian and Hessian-vector products, Newton / L-BFGS
training, leave-one-out retraining, and :meth:`SoftmaxRegression.features`, which wraps
its per-example gradients (one block ``"weight"`` ``[n, C, F]``), K-FAC factors and
optionally its Hessian-vector product as :class:`~llm_influence.features.types.Features`
so every registered method runs on it.
"""

from .logistic import BLOCK, SoftmaxRegression, with_bias

__all__ = ["BLOCK", "SoftmaxRegression", "with_bias"]
