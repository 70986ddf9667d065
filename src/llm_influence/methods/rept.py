"""RepT: representation gradient tracing (Li, Zhao, Li, Sun 2025, arXiv 2510.02334).

Each example is described by a *signature* at one hidden-state index (the layer, below):
the hidden state ``h`` of its final prompt token concatenated with the gradient ``g`` of its
own loss with respect to the hidden state at its first response token,

    s = [h ; g]                  score[t, i] = cos(s_t, s_i)

in ``[-1, 1]``, higher = more similar = ranked as more helpful (a zero signature has cosine
0 with everything). The features are the ``[n, 3, hidden]`` ``Features.repgrads`` of
:mod:`llm_influence.features.rep_grads` (one batched forward/backward with a hook on the
layer's output, no parameter gradient). No global fit: a column depends only on its own
training example (``SEPARABLE``; chunks and ``torchrun`` shards give the same columns).
Float64 scores.

**Choices where the paper (as available to us: its overview and the authors' released code
plumprc/RepT) leaves room, each an argument:**

* ``layer`` (default ``"auto"``): the paper's probing rule for the "phase transition" layer,
  applied to the first ``probe_size`` (32) *training* prompts, never a test example or a label
  (:func:`llm_influence.features.rep_grads.probe_layer`: the later index of the least similar
  pair of consecutive hidden states at the last prompt token, the final-norm pair excluded,
  cosines averaged over the probing set; the authors' ``repdiff.py`` uses one prompt). An
  integer is a hidden-state index as in ``output_hidden_states`` (0 = embeddings, ``i`` =
  output of decoder layer ``i-1``, -1 = the last, after the final norm). The layer used is
  in the diagnostics (``layer``) and ``RUN/features/epoch-N/rept-layer.json``.
* ``grad_position`` (default ``"last-prompt"``): the paper's "first response token gradient"
  is, in the authors' code, the gradient at the position whose output *predicts* the first
  response token, i.e. the last prompt token p (``get_representation_gradient(...)[0]`` of
  the positions ``prompt_len - 1 ..``). ``"first-response"`` takes the gradient at the first
  response token's own position p+1 instead.
* ``normalize`` (default ``"none"``): the authors' code concatenates the raw ``h`` and ``g``
  (``np.hstack``) and takes the cosine, so the part with the larger norm dominates (usually
  ``h``: the diagnostics report ``test_grad_to_hidden_norm_ratio``). ``"parts"`` scales each
  part to unit norm first, so the score is the mean of the two parts' cosines.
* The loss whose gradient is taken is the example's training loss (mean cross-entropy over
  its supervised tokens), as in the authors' code (``outputs.loss``).

**Token-level attribution** (:meth:`RepT.token_scores`, ``explain --tokens``): for a test
signature ``s_t`` and a training example, every position ``q`` whose logit is supervised gets
the token signature ``s_q = [h_q ; dL/dh_q]`` (same layer, same normalisation) and the score
``cos(s_t, s_q)``, credited to the token ``q+1`` it predicts. With the defaults the token
score of the first response token equals the example's sample-level score, so token scores
split the sample score across the example's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from ..features.rep_grads import DEFAULT_PROBE_SIZE, RepGradSpec
from ..features.types import Features
from ._common import DTYPE
from .arguments import ArgumentError, MethodArguments, argument, positive_int
from .base import Method, Scoring, register
from .gradsim import safe_cosine

GRAD_POSITIONS = ("last-prompt", "first-response")
NORMALIZATIONS = ("none", "parts")


def layer_or_auto(name: str, value: Any) -> int | str:
    """``"auto"`` or an integer hidden-state index."""
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{name} must be 'auto' or an integer hidden-state index, got {value!r}")
    return value


@dataclass(frozen=True)
class RepTArguments(MethodArguments):
    layer: int | str = argument("auto", "hidden-state index of the signature (0 = embeddings, i = output of decoder "
                                "layer i-1, -1 = last after the final norm); 'auto': the paper's probing rule on the "
                                "training prompts", check=layer_or_auto)
    probe_size: int = argument(DEFAULT_PROBE_SIZE, "training examples (first in file order) probed for layer='auto'",
                               check=positive_int)
    grad_position: str = argument("last-prompt", "where the loss gradient is taken: last-prompt (the position that "
                                  "predicts the first response token; the authors' code) or first-response",
                                  choices=GRAD_POSITIONS)
    normalize: str = argument("none", "none: cosine of the raw concatenation [h; g] (the authors' code); parts: each "
                              "part scaled to unit norm first", choices=NORMALIZATIONS)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.where(norms > 0, x / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(x))


@register
class RepT(Method):
    """Cosine of RepT signatures ``[h_p ; dL/dh]``; needs ``repgrads``."""

    name = "rept"
    needs = frozenset({"repgrads"})
    Arguments = RepTArguments
    scoring = Scoring.SEPARABLE

    def feature_options(self) -> dict[str, Any]:
        return {"rep_grads": RepGradSpec(layer=self.args.layer, probe_size=self.args.probe_size)}

    # -- signatures ----------------------------------------------------------------------
    def combine(self, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``[..., 2 hidden]`` float64 signatures from hidden states and gradients (``normalize``)."""
        hidden, grad = hidden.to(DTYPE), grad.to(DTYPE)
        if self.args.normalize == "parts":
            hidden, grad = _unit_rows(hidden), _unit_rows(grad)
        return torch.cat([hidden, grad], dim=-1)

    def signatures(self, features: Features, role: str = "") -> torch.Tensor:
        """``[n, 2 hidden]`` float64 signatures of ``features.repgrads``."""
        rg = features.repgrads
        if rg is None:
            raise UserError(f"{self.name}: the {role or 'given'} features have no RepT signatures (repgrads)")
        if rg.dim() != 3 or rg.shape[1] != 3:
            raise UserError(f"{self.name}: repgrads must be [n, 3, hidden], got {tuple(rg.shape)}")
        row = 1 if self.args.grad_position == "last-prompt" else 2
        return self.combine(rg[:, 0], rg[:, row])

    # -- the protocol --------------------------------------------------------------------
    def fit(self, train: Features) -> "RepT":
        self._train_sig = self.signatures(train, "training")
        self._train_norms = torch.linalg.vector_norm(self._train_sig, dim=1)
        self._train = train
        self.diagnostics = {"layer": train.repgrads_layer,
                            "layer_rule": "probing rule on training prompts" if self.args.layer == "auto" else "fixed",
                            "grad_position": self.args.grad_position, "normalize": self.args.normalize}
        return self

    def score(self, test: Features) -> torch.Tensor:
        train = self.train
        if test.repgrads_layer != train.repgrads_layer:
            raise UserError(f"{self.name}: test signatures are from layer {test.repgrads_layer}, training ones "
                            f"from layer {train.repgrads_layer}")
        sig = self.signatures(test, "test").to(self._train_sig.device)
        if sig.shape[1] != self._train_sig.shape[1]:
            raise UserError(f"{self.name}: test signatures have {sig.shape[1]} dimensions, training ones "
                            f"{self._train_sig.shape[1]}")
        rg = test.repgrads.to(DTYPE)
        h_norm = torch.linalg.vector_norm(rg[:, 0], dim=1)
        g_norm = torch.linalg.vector_norm(rg[:, 1 if self.args.grad_position == "last-prompt" else 2], dim=1)
        ratio = g_norm / torch.where(h_norm > 0, h_norm, torch.ones_like(h_norm))
        self.diagnostics["test_grad_to_hidden_norm_ratio"] = float(ratio.mean()) if ratio.numel() else None
        return safe_cosine(sig @ self._train_sig.T, torch.linalg.vector_norm(sig, dim=1), self._train_norms)

    # -- token level ---------------------------------------------------------------------
    def token_scores(self, test_repgrads: torch.Tensor, hidden: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """``[k]`` float64: ``cos(s_t, [h_q ; g_q])`` for one test example's ``[3, hidden]``
        signature rows and a training example's per-token ``hidden``/``grads`` ``[k, hidden]``
        (:func:`llm_influence.features.rep_grads.token_signatures`)."""
        rows = test_repgrads.to(DTYPE)
        s_t = self.combine(rows[0], rows[1 if self.args.grad_position == "last-prompt" else 2])
        s_q = self.combine(hidden, grads)
        dots = (s_q @ s_t)[None, :]
        return safe_cosine(dots, torch.linalg.vector_norm(s_t)[None], torch.linalg.vector_norm(s_q, dim=1))[0]
