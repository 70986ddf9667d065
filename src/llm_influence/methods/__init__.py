"""Attribution methods: one module per method, all registered by name.

Every method follows :class:`Method`: ``fit(train_features)`` then ``score(test_features)``
returning ``[n_test, n_train]`` float64 scores on the device of the training gradients,
**higher = the training example helped the test example more** (:data:`SCORE_CONVENTION`).

| name | module | what it computes |
|---|---|---|
| ``gradsim`` / ``gradsim-cos`` | :mod:`.gradsim` | ``<v, g_i>`` / cosine of full gradients |
| ``repsim`` | :mod:`.repsim` | cosine of representations |
| ``datainf`` | :mod:`.datainf` | block-wise Sherman-Morrison average |
| ``lissa`` | :mod:`.lissa` | Neumann-series iteration toward ``(H + lambda I)^{-1} v`` |
| ``lissa-paper`` | :mod:`.lissa_paper` | the authors' recursion (damping with a minus sign, fixed divisor 1000) |
| ``exact`` | :mod:`.exact` | block-exact ``(G_l + lambda_l I)^{-1} v_l`` |
| ``exact-full`` | :mod:`.exact_full` | joint ``(H + lambda I)^{-1} v`` over all blocks |
| ``ekfac`` | :mod:`.ekfac` | EK-FAC with eigenvalue correction |
| ``tracin`` | :mod:`.tracin` | learning-rate-weighted gradient dots over checkpoints |
| ``projected`` | :mod:`.projected` | joint ``(P G P^T + lambda I)^{-1}`` in a random-projection space |
| ``rept`` | :mod:`.rept` | cosine of RepT signatures (hidden state + its loss gradient at one layer) |
| ``dra`` | :mod:`.dra` | cosine of centred, whitened, dimension-selected representations |
| ``trackstar`` | :mod:`.trackstar` | cosine of Adam-second-moment-corrected gradients through ``R^(-1/2)`` (mixed train/test ``R``) |
| ``less`` | :mod:`.trackstar` | learning-rate-weighted cosine of the Adam update direction with the test gradient, over checkpoints |

Each method declares its typed ``Arguments`` (:mod:`.arguments`), the features it needs and
its :class:`Scoring` (see :class:`Method`). Damping (:mod:`.damping`), the exact solves
(:mod:`.linalg`) and the residuals (:mod:`._common`) are shared by every method.
"""

from . import datainf, ekfac, exact, exact_full, gradsim, lissa, lissa_paper, projected, repsim, tracin  # noqa: F401  (registration)
from . import dra, rept  # noqa: F401  (registration; methods after the paper)
from . import trackstar  # noqa: F401  (registration: trackstar and less)
from .arguments import MethodArguments, NoArguments, argument, positive_float, positive_int
from .base import (SCORE_CONVENTION, Method, Scoring, available_methods, get_method_class, implementation_digest,
                   make_method, method_fields, method_parameters, register)
from .damping import DEFAULT_DAMPING_RATIO, DampingArguments, block_damping, global_damping

__all__ = [
    "DEFAULT_DAMPING_RATIO", "DampingArguments", "Method", "MethodArguments", "NoArguments", "SCORE_CONVENTION",
    "Scoring", "argument", "available_methods", "block_damping", "get_method_class", "global_damping",
    "implementation_digest", "make_method", "method_fields", "method_parameters", "positive_float", "positive_int", "register",
]
