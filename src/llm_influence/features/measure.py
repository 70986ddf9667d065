"""What the test vector is the gradient of: the *measurement* (``--measure``).

By default a test example's gradient is that of its own response loss (``loss``). A user
who wants the training examples behind a *behaviour* measures that behaviour instead:

* ``loss`` (default): the test example's mean token loss over its supervised tokens, the
  quantity fine-tuning minimised. The features are computed exactly as without this
  module (same code path, same cache keys): scores are bitwise unchanged.
* ``logprob:TEXT``: the log-probability ``log p(TEXT | prompt)`` of the continuation
  ``TEXT`` right after the test example's prompt (the chat template's generation prompt,
  then ``TEXT``'s tokens; no end-of-turn token, so ``"I cannot"`` measures a response
  *starting* with those words), summed over ``TEXT``'s tokens (the probability of the whole
  continuation, not a per-token mean). The test example's own response is not used. The
  prompt is cut from the left when prompt and ``TEXT`` exceed the run's ``max_length``.
* a name registered by a plugin with :func:`register_measurement` (as kronfluence's
  ``compute_measurement``): a function ``fn(outputs, batch) -> [B]`` from the model's outputs
  (``outputs.logits`` ``[B, T, V]``) and the padded batch (``input_ids``, ``attention_mask``,
  ``labels`` with -100 on unsupervised positions, ``last_prompt_index``; all on the model's
  device) of the test examples, encoded as for the loss, to one differentiable scalar per
  example. ``NAME:ARG`` passes ``argument=ARG`` to a function registered with
  ``takes_argument=True``.

**Sign (the score convention stays "higher = the training example helped more").** Every
measurement is turned into a loss-like value ``m`` whose *decrease* is the behaviour; the
test vector is ``v = grad m``. A gradient step on training example ``i`` changes ``m`` by
about ``-eta <grad m, g_i>``, so a positive ``<v, g_i>`` (and every method's score built on
``v``) means "training on ``i`` moved the measurement toward the behaviour":

* ``loss``: ``m`` = the loss (lower loss = the test response became more likely);
* ``logprob:TEXT``: ``m = -log p(TEXT | prompt)`` (higher score = the training example
  *raised* the probability of the continuation);
* a plugin declares ``direction="increase"`` (the behaviour is a rise of its value, e.g. a
  log-probability; ``m = -value``) or ``"decrease"`` (a fall, e.g. a loss; ``m = value``).

Only the test split's gradients change; training gradients are always those of the
training loss. The measurement is part of the test gradients' cache key and of the scores'
key and metadata (:meth:`Measurement.to_dict`); the default ``loss`` adds nothing to either,
so earlier features and scores stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..errors import UserError
from ..models.formatting import IGNORE_INDEX, Encoded

DIRECTIONS = ("increase", "decrease")
DEFAULT_MEASURE = "loss"
#: the help text of ``--measure`` (one meaning in attribute, reproduce and explain)
MEASURE_HELP = ("what each test gradient is the gradient of: loss (default: the test example's own response loss), "
                "logprob:TEXT (log-probability of TEXT as the continuation right after the test prompt, e.g. "
                "'logprob:I cannot'; higher score = the training example raised it more), or NAME[:ARG] registered "
                "by a --plugin with llm_influence.features.measure.register_measurement; training gradients are "
                "always those of the training loss")

MeasureFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class _Registered:
    fn: Optional[MeasureFn]
    direction: str
    takes_argument: bool
    help: str
    builtin: bool = False


_REGISTRY: dict[str, _Registered] = {}


def register_measurement(name: str, fn: MeasureFn, *, direction: str, takes_argument: bool = False,
                         help: str = "") -> MeasureFn:
    """Make ``fn(outputs, batch[, argument=ARG]) -> [B]`` available as ``--measure NAME``.

    ``direction``: ``"increase"`` when the behaviour is a rise of the value (a probability,
    a log-probability, a margin), ``"decrease"`` when it is a fall (a loss). The value must
    be differentiable with respect to the LoRA weights (computed from ``outputs``) and one
    scalar per example, and example ``b``'s value must depend on example ``b``'s own outputs
    only (the per-example gradients come from one backward pass of the batch's sum, as for
    the loss; a value mixing examples, e.g. normalised over the batch, would mix gradients).
    Returns ``fn`` (usable as a decorator through ``functools.partial``).
    """
    if not isinstance(name, str) or not name or ":" in name or name != name.strip():
        raise ValueError(f"measurement name must be a non-empty string without ':' or spaces, got {name!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not callable(fn):
        raise TypeError(f"measurement {name!r}: fn must be callable")
    previous = _REGISTRY.get(name)
    if previous is not None and previous.builtin:
        raise ValueError(f"{name!r} is a built-in measurement")
    _REGISTRY[name] = _Registered(fn, direction, bool(takes_argument), help)
    return fn


def available_measurements() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class Measurement:
    """A parsed ``--measure`` value: ``name`` and its ``argument`` (``logprob``'s TEXT)."""

    name: str = DEFAULT_MEASURE
    argument: Optional[str] = None

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_MEASURE

    @property
    def direction(self) -> str:
        return _REGISTRY[self.name].direction

    def spec(self) -> str:
        """The ``--measure`` text (``loss``, ``logprob:I cannot``)."""
        return self.name if self.argument is None else f"{self.name}:{self.argument}"

    def to_dict(self) -> dict[str, Any]:
        """What the caches and the scores metadata record."""
        return {"name": self.name, "argument": self.argument, "direction": self.direction,
                "test_vector": "gradient of " + ("the loss" if self.is_default else
                                                 ("-log p(TEXT | prompt)" if self.name == "logprob" else
                                                  ("-value" if self.direction == "increase" else "value")))}

    # -- what the feature engine calls ---------------------------------------------------
    def encode(self, formatter, example) -> Encoded:
        """The tokens the measurement is computed on (the example itself, or for ``logprob``
        its prompt followed by ``TEXT``)."""
        if self.name == "logprob":
            return encode_continuation(formatter, example.prompt, self.argument or "")
        return formatter.encode(example)

    def objective(self) -> Optional[Callable[[Any, dict], torch.Tensor]]:
        """``m(outputs, batch) -> [B]`` (loss-like: its decrease is the behaviour), or None
        for ``loss`` (the engine's own loss, untouched)."""
        if self.is_default:
            return None
        if self.name == "logprob":
            return continuation_nll
        entry = _REGISTRY[self.name]
        sign = -1.0 if entry.direction == "increase" else 1.0
        argument = self.argument

        def measured(outputs, batch):
            value = entry.fn(outputs, batch, argument=argument) if entry.takes_argument else entry.fn(outputs, batch)
            if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] != batch["input_ids"].shape[0]:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise UserError(f"--measure {self.spec()}: the measurement returned {shape}, expected one value per "
                                f"example [{batch['input_ids'].shape[0]}]")
            if not value.requires_grad:
                raise UserError(f"--measure {self.spec()}: the measurement does not depend on the model's outputs "
                                "(no gradient)")
            return sign * value

        return measured


def parse_measure(text: Optional[str]) -> Measurement:
    """:class:`Measurement` of a ``--measure`` value; an invalid one is a :class:`UserError`."""
    if text is None:
        return Measurement()
    if not isinstance(text, str) or not text.strip():
        raise UserError("--measure: give loss, logprob:TEXT or a registered measurement name")
    name, sep, argument = text.partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        raise UserError(f"--measure {text!r}: unknown measurement {name!r}; known: {', '.join(available_measurements())}"
                        " (plugins register more with register_measurement)")
    entry = _REGISTRY[name]
    if entry.takes_argument:
        if not sep or not argument.strip():
            raise UserError(f"--measure {text!r}: {name} needs a text after the colon, e.g. {name}:I cannot")
        return Measurement(name, argument)
    if sep:
        raise UserError(f"--measure {text!r}: {name} takes no argument; use --measure {name}")
    return Measurement(name)


def encode_continuation(formatter, prompt: str, text: str) -> Encoded:
    """``prompt`` rendered as the chat template's user turn with the generation prompt,
    followed by the tokens of ``text`` (tokenized on their own, as responses are), which are
    the only supervised tokens. The prompt is cut from the left to fit ``max_length``."""
    tokenizer = formatter.tokenizer
    p_ids = tokenizer(formatter.prompt_text(prompt), add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not c_ids:
        raise UserError(f"--measure logprob:{text!r}: the text has no tokens")
    if len(c_ids) >= formatter.max_length:
        raise UserError(f"--measure logprob: the text has {len(c_ids)} tokens, not fewer than the run's "
                        f"max_length {formatter.max_length}")
    p_ids = p_ids[len(p_ids) - (formatter.max_length - len(c_ids)):] if len(p_ids) + len(c_ids) > formatter.max_length \
        else p_ids
    return Encoded(input_ids=list(p_ids) + list(c_ids), labels=[IGNORE_INDEX] * len(p_ids) + list(c_ids),
                   prompt_len=len(p_ids))


def continuation_nll(outputs, batch: dict) -> torch.Tensor:
    """``[B]``: ``-sum_t log p(label_t | tokens < t)`` over each example's supervised tokens
    (``-log p(TEXT | prompt)`` for :func:`encode_continuation`'s examples), float32 at least."""
    logits = outputs.logits
    shift = logits[:, :-1, :].to(torch.promote_types(logits.dtype, torch.float32))
    labels = batch["labels"][:, 1:].to(logits.device)
    token = torch.nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    return token.sum(dim=1)


_REGISTRY[DEFAULT_MEASURE] = _Registered(None, "decrease", False, "the test example's own response loss", builtin=True)
_REGISTRY["logprob"] = _Registered(None, "increase", True, "log p(TEXT | prompt), summed over TEXT's tokens",
                                   builtin=True)
