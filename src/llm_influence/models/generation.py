"""Greedy generation through the same chat formatting as training."""

from __future__ import annotations

from typing import Sequence

import torch

from .formatting import ChatFormatter, Encoded, collate, model_inputs


@torch.no_grad()
def generate(model, formatter: ChatFormatter, prompts: Sequence[str], *, max_new_tokens: int = 128,
             batch_size: int = 8) -> list[str]:
    """Greedy completions (special tokens stripped), one per prompt, in order."""
    tokenizer = formatter.tokenizer
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = [Encoded(ids, [-100] * len(ids), len(ids)) for ids in map(formatter.encode_prompt, chunk)]
        batch = collate(encoded, tokenizer.pad_token_id, side="left")
        inputs = model_inputs(batch)
        inputs.pop("position_ids")  # generate() derives them from the attention mask
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        outputs.extend(tokenizer.decode(row, skip_special_tokens=True) for row in new)
    return outputs
