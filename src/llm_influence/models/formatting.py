"""Chat formatting and tokenization: one code path for training, gradients and generation.

An example becomes ``prompt_ids + response_ids`` where ``prompt_ids`` is the model's chat
template for the user turn with the generation prompt (``<|im_start|>assistant\\n`` for
SmolLM2) and ``response_ids`` is the rest of the template rendered with the assistant turn
(the response, the end-of-turn token and the template's trailing text). Labels are -100 on
the prompt tokens unless ``loss_on="all"`` (the paper's v2 variant, labels = input ids).
Models without a chat template use the paper's v1 template ``User: {prompt}\\n---\\nAssistant: ``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from ..data.example import Example

IGNORE_INDEX = -100
LossOn = Literal["response", "all"]
FALLBACK_TEMPLATE = "User: {prompt}\n---\nAssistant: "


@dataclass(frozen=True)
class Encoded:
    """One tokenized example. ``prompt_len`` tokens of ``input_ids`` are the prompt."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class ChatFormatter:
    """Turns :class:`Example` s into token ids with a label mask, and prompts into model input."""

    def __init__(self, tokenizer, max_length: int = 256, loss_on: LossOn = "response") -> None:
        if loss_on not in ("response", "all"):
            raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
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
        if self.loss_on == "all":
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(p_ids) + list(r_ids)
        return Encoded(input_ids=ids, labels=labels, prompt_len=len(p_ids))

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt tokens for generation (cut from the left to fit ``max_length``)."""
        ids = self._ids(self.prompt_text(prompt))
        return ids[-self.max_length:]


def collate(batch: Sequence[Encoded], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch. Returns ``input_ids``, ``attention_mask``, ``labels`` ([B, T]) and
    ``last_prompt_index`` ([B], position of each example's last prompt token)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    last_prompt = torch.zeros(len(batch), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        start = 0 if side == "right" else width - n
        ids[i, start:start + n] = torch.tensor(e.input_ids)
        mask[i, start:start + n] = 1
        labels[i, start:start + n] = torch.tensor(e.labels)
        last_prompt[i] = start + max(e.prompt_len, 1) - 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "last_prompt_index": last_prompt}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys a causal LM's forward takes (position ids follow the attention mask, so
    left padding gives the same positions as right padding)."""
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": position_ids}
