"""Chat formatting and tokenization: one code path for training, gradients and generation.

An example becomes ``prompt_ids + response_ids`` where ``prompt_ids`` is the model's chat
template for the user turn with the generation prompt (``<|im_start|>assistant\\n`` for
SmolLM2) and ``response_ids`` is the rest of the template rendered with the assistant turn
(the response, the end-of-turn token and the template's trailing text). What the loss covers
(``loss_on``):

* ``"response"`` (default): labels are -100 on the prompt tokens;
* ``"all"``: labels = input ids, prompt and response (no padding);
* ``"all-padded"``: the authors' v2 code (``PAPER_CODE_NOTES.md``): the sequence is
  left-padded with the EOS token to exactly ``max_length`` and labels = input ids,
  *padding included*. The pad tokens are masked as attention keys (``attention_mask`` 0,
  as the tokenizer's padding gives) but their next-token losses count, so every example's
  loss is a mean over ``max_length - 1`` predictions whatever its length: an example's
  gradient is scaled by its share of real tokens. Under PyTorch's SDPA attention a pad
  query attends to nothing (its attention output is 0), so the pad positions' losses are
  constant in the LoRA weights and add no gradient (``tests/test_models_formatting.py``
  checks this). The authors' transformers of 2024 on CUDA instead let fully masked rows
  attend to the whole sequence (``AttentionMaskConverter._unmask_unattended``), a term
  this variant does not reproduce.

Models without a chat template use the paper's v1 template ``User: {prompt}\\n---\\nAssistant: ``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from ..data.example import Example

IGNORE_INDEX = -100
LossOn = Literal["response", "all", "all-padded"]
LOSS_ON_CHOICES = ("response", "all", "all-padded")
FALLBACK_TEMPLATE = "User: {prompt}\n---\nAssistant: "


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``n_pad`` leading pad tokens (attention 0; only
    ``loss_on="all-padded"`` has them), then ``prompt_len`` prompt tokens, then the response."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    n_pad: int = 0

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class ChatFormatter:
    """Turns :class:`Example` s into token ids with a label mask, and prompts into model input."""

    def __init__(self, tokenizer, max_length: int = 256, loss_on: LossOn = "response") -> None:
        if loss_on not in LOSS_ON_CHOICES:
            raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON_CHOICES)}, got {loss_on!r}")
        if max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.loss_on = loss_on
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    # -- text -------------------------------------------------------------------------
    def prompt_text(self, prompt: str) -> str:
        if self.has_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return FALLBACK_TEMPLATE.format(prompt=prompt)

    def full_text(self, prompt: str, response: str) -> str:
        if self.has_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=False)
        return FALLBACK_TEMPLATE.format(prompt=prompt) + response + (self.tokenizer.eos_token or "")

    def split_text(self, prompt: str, response: str) -> tuple[str, str]:
        """``(prompt_text, response_text)`` whose concatenation is the full rendered turn."""
        p, full = self.prompt_text(prompt), self.full_text(prompt, response)
        if not full.startswith(p):
            raise ValueError("the chat template does not render the prompt as a prefix of the full turn")
        return p, full[len(p):]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- tokens -----------------------------------------------------------------------
    def encode(self, example: Example) -> Encoded:
        """Tokenize and truncate to ``max_length``.

        Truncation keeps the prompt and cuts the response from the right. If the prompt
        alone would leave fewer than ``min(len(response), max_length // 4)`` response
        tokens, the prompt is cut from the left instead, so every example keeps
        supervised tokens.
        """
        p_text, r_text = self.split_text(example.prompt, example.response)
        p_ids, r_ids = self._ids(p_text), self._ids(r_text)
        min_resp = min(len(r_ids), self.max_length // 4)
        if len(p_ids) > self.max_length - min_resp:
            p_ids = p_ids[len(p_ids) - (self.max_length - min_resp):]
        r_ids = r_ids[: self.max_length - len(p_ids)]
        ids = p_ids + r_ids
        if self.loss_on == "all-padded":
            n_pad = self.max_length - len(ids)
            ids = [self.pad_to_length_id()] * n_pad + ids
            return Encoded(input_ids=ids, labels=list(ids), prompt_len=len(p_ids), n_pad=n_pad)
        if self.loss_on == "all":
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(p_ids) + list(r_ids)
        return Encoded(input_ids=ids, labels=labels, prompt_len=len(p_ids))

    def pad_to_length_id(self) -> int:
        """The token ``"all-padded"`` pads with: EOS, as the authors' code (the pad token
        when the tokenizer has no EOS)."""
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.tokenizer.pad_token_id)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt tokens for generation (cut from the left to fit ``max_length``)."""
        ids = self._ids(self.prompt_text(prompt))
        return ids[-self.max_length:]


def collate(batch: Sequence[Encoded], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch. Returns ``input_ids``, ``attention_mask``, ``labels`` ([B, T]) and
    ``last_prompt_index`` ([B], position of each example's last prompt token). An example's
    own leading pad tokens (``Encoded.n_pad``) keep their labels and get attention 0."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    last_prompt = torch.zeros(len(batch), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        start = 0 if side == "right" else width - n
        ids[i, start:start + n] = torch.tensor(e.input_ids)
        mask[i, start + e.n_pad:start + n] = 1
        labels[i, start:start + n] = torch.tensor(e.labels)
        last_prompt[i] = start + e.n_pad + max(e.prompt_len, 1) - 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "last_prompt_index": last_prompt}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys a causal LM's forward takes (position ids follow the attention mask, so
    left padding gives the same positions as right padding)."""
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": position_ids}
