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

import dataclasses
import hashlib
import inspect
import sys
from abc import ABC, abstractmethod
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..features.types import Features
from .arguments import ArgumentError, NoArguments

SCORE_CONVENTION = (
    "scores[i_test, j_train]; higher = training example j helped test example i more "
    "(score = -I(z_test, z_train) = v^T H^-1 g for influence methods); rank descending"
)


class Scoring(str, Enum):
    """How ``attribute`` may compute a method's ``[n_test, n_train]`` matrix in training chunks.

    * ``SEPARABLE``: a column depends only on its own training example, so each chunk of
      the training set is fitted and scored on its own (gradsim, repsim, tracin);
    * ``PRECONDITIONED``: fit once on the whole training set, ``solve(test)`` returns the
      preconditioned test gradients ``x_t = (H + lambda I)^{-1} v_t`` per block, and
      ``score[:, chunk] = sum_l x_l g_l[chunk]^T`` (the inverse-Hessian methods);
    * ``WHOLE``: fitted and scored on the whole set at once (on rank 0).
    """

    SEPARABLE = "separable"
    PRECONDITIONED = "preconditioned"
    WHOLE = "whole"


class Method(ABC):
    """One attribution method. A subclass declares, in one place:

    * ``name``: the registry name;
    * ``Arguments``: a frozen dataclass of its typed arguments with defaults and help
      (:mod:`.arguments`); ``Method(**kwargs)`` builds it (unknown or invalid arguments are a
      :class:`~llm_influence.errors.UserError` naming the method and field) and stores it
      as ``self.args``;
    * ``needs``: the feature fields used, any of ``grads``, ``reps``, ``kfac``, ``history``,
      ``hvp``, ``repgrads`` (override :meth:`required_features` when they depend on the arguments);
    * ``scoring``: a :class:`Scoring`; ``PRECONDITIONED`` methods implement :meth:`solve`;
    * optionally :meth:`feature_options`: extraction settings its arguments determine.

    Then ``fit(train)`` once and ``score(test)``. The engine computes only the features
    the chosen methods need and uses nothing but these declarations.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({"grads"})
    Arguments: ClassVar[type] = NoArguments
    scoring: ClassVar[Scoring] = Scoring.WHOLE

    def __init__(self, **kwargs: Any) -> None:
        self.args = build_arguments(type(self), kwargs)
        self.diagnostics: dict[str, Any] = {}
        self._train: Features | None = None

    @abstractmethod
    def fit(self, train: Features) -> "Method":
        """Prepare from the training features; returns self."""

    @abstractmethod
    def score(self, test: Features) -> torch.Tensor:
        """``[n_test, n_train]`` scores, higher = more helpful."""

    def solve(self, test: Features) -> dict[str, torch.Tensor]:
        """``PRECONDITIONED`` methods: ``{block: [n_test, rows, cols]}`` float64
        ``(H + lambda I)^{-1} v`` for every test row (blocks whose scores are all zero may be
        left out), after :meth:`fit`."""
        raise NotImplementedError(f"{self.name} declares scoring {self.scoring.value!r} and has no solve()")

    def required_features(self) -> frozenset[str]:
        """The feature fields this instance needs (``needs`` unless the arguments change it)."""
        return frozenset(self.needs)

    def feature_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~llm_influence.features.extract.extract_features` that
        this instance's arguments set (RepT: ``{"rep_grads": RepGradSpec(...)}``); none by
        default. The engine passes them on without knowing the method."""
        return {}

    def arguments(self) -> dict[str, Any]:
        """The method's arguments, recorded next to its scores."""
        return dataclasses.asdict(self.args)

    @property
    def train(self) -> Features:
        if self._train is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        return self._train


def build_arguments(cls: type["Method"], kwargs: dict[str, Any]) -> Any:
    """``cls.Arguments(**kwargs)`` with every error a :class:`UserError` naming the method."""
    from ..errors import UserError

    accepted = [f.name for f in dataclasses.fields(cls.Arguments)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UserError(f"method {cls.name!r}: unknown argument(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(accepted) or 'none'}")
    try:
        return cls.Arguments(**kwargs)
    except ArgumentError as exc:
        raise UserError(f"{cls.name}: {exc}") from None


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``. Checks the declarations:
    ``Arguments`` is a dataclass and a ``PRECONDITIONED`` method overrides ``solve``."""
    name = cls.name
    if not dataclasses.is_dataclass(cls.Arguments):
        raise TypeError(f"method {name!r}: Arguments must be a dataclass, got {cls.Arguments!r}")
    if not isinstance(cls.scoring, Scoring):
        raise TypeError(f"method {name!r}: scoring must be a Scoring, got {cls.scoring!r}")
    if cls.scoring is Scoring.PRECONDITIONED and cls.solve is Method.solve:
        raise TypeError(f"method {name!r} declares scoring PRECONDITIONED but does not implement solve()")
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
    """The argument names a registered method accepts (its ``Arguments`` fields)."""
    return [f.name for f in dataclasses.fields(get_method_class(name).Arguments)]


def method_fields(name: str) -> list[dataclasses.Field]:
    """The ``Arguments`` fields of a registered method (with their help metadata)."""
    return list(dataclasses.fields(get_method_class(name).Arguments))


def make_method(name: str, **kwargs: Any) -> Method:
    """Instantiate a registered method; unknown or invalid arguments are a :class:`UserError`."""
    return get_method_class(name)(**kwargs)


_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def implementation_digest(cls: type[Method]) -> str:
    """SHA-256 of the source files a method's implementation is made of: the modules of the
    classes in its MRO and, transitively, the modules they import from, restricted to this
    package and to the folder of the method's own file (a plugin's). Part of the scores
    cache key, so editing a method, a shared helper or a plugin never reuses old scores."""
    own = inspect.getsourcefile(cls)
    roots = [_PACKAGE_ROOT] + ([Path(own).resolve().parent] if own else [])

    def relevant(path: str | None) -> bool:
        if not path:
            return False
        p = Path(path).resolve()
        return any(p == r or r in p.parents for r in roots)

    files: dict[str, bytes] = {}
    queue = [sys.modules[c.__module__] for c in cls.__mro__ if c.__module__ in sys.modules]
    seen: set[str] = set()
    while queue:
        module = queue.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        path = getattr(module, "__file__", None)
        if not relevant(path):
            continue
        files[module.__name__] = Path(path).read_bytes()
        for value in vars(module).values():
            target = value if inspect.ismodule(value) else sys.modules.get(getattr(value, "__module__", None) or "")
            if target is not None and target.__name__ not in seen:
                queue.append(target)
    digest = hashlib.sha256()
    for module_name in sorted(files):
        digest.update(module_name.encode() + b"\0" + hashlib.sha256(files[module_name]).digest())
    return digest.hexdigest()
