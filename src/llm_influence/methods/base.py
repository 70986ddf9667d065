"""The attribution-method protocol and its registry.

Every method follows one protocol: ``fit(train_features)`` once, then
``score(test_features)`` returning a ``[n_test, n_train]`` float tensor.

**Convention: higher score = the training example helped the test example more.** For
influence methods this is ``score = -I(z_test, z_train) = v^T (H + lambda I)^{-1} g_i`` with
``v`` the test gradient and ``g_i`` the training gradient (the paper's Eq. 3 with the sign
flipped). Rank by score, descending.

Methods that solve with a Hessian record ``diagnostics``: the relative residual
``||(H + lambda I) x - v|| / ||v||`` (worst and mean over test examples and blocks),
iterations and the damping used.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..features.types import Features

SCORE_CONVENTION = (
    "scores[i_test, j_train]; higher = training example j helped test example i more "
    "(score = -I(z_test, z_train) = v^T H^-1 g for influence methods); rank descending"
)


class Method(ABC):
    """One attribution method. Subclasses set ``name`` and ``needs`` and implement fit/score.

    ``needs`` lists the feature fields used: any of ``grads``, ``reps``, ``kfac``,
    ``history``, ``hvp``. The engine computes only what the chosen methods need.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({"grads"})

    def __init__(self) -> None:
        self.diagnostics: dict[str, Any] = {}
        self._train: Features | None = None

    @abstractmethod
    def fit(self, train: Features) -> "Method":
        """Prepare from the training features; returns self."""

    @abstractmethod
    def score(self, test: Features) -> torch.Tensor:
        """``[n_test, n_train]`` scores, higher = more helpful."""

    def arguments(self) -> dict[str, Any]:
        """The method's arguments, recorded next to its scores."""
        return {}

    @property
    def train(self) -> Features:
        if self._train is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        return self._train


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    name = cls.name
    previous = _REGISTRY.get(name)
    reloaded = previous is not None and (previous.__module__, previous.__qualname__) == (cls.__module__, cls.__qualname__)
    if previous is not None and previous is not cls and not reloaded:
        raise ValueError(f"a method named {name!r} is already registered")
    _REGISTRY[name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    from ..errors import UserError

    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def method_parameters(name: str) -> list[str]:
    """The keyword arguments a registered method accepts."""
    params = inspect.signature(get_method_class(name).__init__).parameters
    return [p for p, spec in params.items()
            if p != "self" and spec.kind in (spec.POSITIONAL_OR_KEYWORD, spec.KEYWORD_ONLY)]


def make_method(name: str, **kwargs: Any) -> Method:
    """Instantiate a registered method; unknown keyword arguments are a :class:`UserError`."""
    from ..errors import UserError

    accepted = method_parameters(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UserError(f"method {name!r}: unknown argument(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(accepted) or 'none'}")
    return get_method_class(name)(**kwargs)
