"""Greedy generation through the same chat formatting as training."""

from __future__ import annotations

from typing import Sequence

import torch

from ..progress import progress
from .formatting import ChatFormatter, Encoded, collate, model_inputs


@torch.no_grad()
def generate(model, formatter: ChatFormatter, prompts: Sequence[str], *, max_new_tokens: int = 128,
             batch_size: int = 8) -> list[str]:
    """Greedy completions (special tokens stripped), one per prompt, in order."""
    model.eval()
    outputs: list[str] = []
    with progress(len(prompts), "generating") as advance:
        for start in range(0, len(prompts), batch_size):
            outputs.extend(_generate_batch(model, formatter, prompts[start:start + batch_size], max_new_tokens))
            advance(len(prompts[start:start + batch_size]))
    return outputs


def _generate_batch(model, formatter: ChatFormatter, chunk: Sequence[str], max_new_tokens: int) -> list[str]:
    tokenizer = formatter.tokenizer
    encoded = [Encoded(ids, [-100] * len(ids), len(ids)) for ids in map(formatter.encode_prompt, chunk)]
    batch = collate(encoded, tokenizer.pad_token_id, side="left")
    inputs = model_inputs(batch)
    inputs.pop("position_ids")  # generate() derives them from the attention mask
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]
