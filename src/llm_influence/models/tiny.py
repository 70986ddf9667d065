"""``tiny-llama``: a seeded, randomly initialised 2-layer Llama for tests.

It shares the SmolLM2 tokenizer (and chat template), so every code path that runs on the
embedded model runs on it too, in seconds. The same seed gives bitwise-identical weights.
"""

from __future__ import annotations

import torch

TINY_SEED = 1234


def tiny_llama_config(vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def build_tiny_llama(tokenizer, seed: int = TINY_SEED):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model
