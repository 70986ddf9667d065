"""Shared helpers for the feature tests (no tests here): LoRA tiny-llama models with a
non-zero B matrix, a few examples of mixed lengths, and an independent per-example loop."""

from __future__ import annotations

import copy

import torch

from llm_influence.data.example import Example
from llm_influence.models import ChatFormatter, LoraSpec, attach_lora, collate, lora_parameters, model_inputs



WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def make_examples(n: int = 6, seed: int = 0) -> list[Example]:
    """``n`` examples whose prompts and responses have different lengths (one long enough
    to be truncated at ``max_length=64``)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p_len = 1 + (3 * i) % 7
        r_len = 1 + (5 * i + 2) % 9 + (30 if i == 2 else 0)
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (p_len + r_len,), generator=gen)]
        out.append(Example(id=f"ex{i}", prompt=" ".join(words[:p_len]), response=" ".join(words[p_len:]),
                           group="a" if i % 2 else "b"))
    return out


def lora_model(tiny, spec: LoraSpec = LoraSpec(dropout=0.0), *, dtype=torch.float32, seed: int = 0, scale: float = 0.05):
    """A fresh copy of tiny-llama with LoRA ``spec``, A and B perturbed (B != 0), in ``dtype``."""
    base, tokenizer = tiny
    model = attach_lora(copy.deepcopy(base), spec, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model = model.to(dtype)
    model.eval()
    return model, tokenizer


def encode(tokenizer, examples, *, max_length: int = 64, loss_on: str = "response"):
    fmt = ChatFormatter(tokenizer, max_length=max_length, loss_on=loss_on)
    return [fmt.encode(e) for e in examples]


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of one unpadded example, written independently (float64)."""
    logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    target = labels[0, 1:]
    keep = target != -100
    return -logp[keep.nonzero().squeeze(1), target[keep]].mean()


def loop_gradients(model, encoded, pad_id) -> dict[str, torch.Tensor]:
    """Per-example gradients by a batch-size-1 loop of ``torch.autograd.grad``."""
    params = lora_parameters(model)
    saved = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    model.eval()
    out = {n: [] for n in params}
    try:
        for e in encoded:
            batch = collate([e], pad_id)
            logits = model(**model_inputs(batch)).logits
            loss = reference_loss(logits, batch["labels"])
            grads = torch.autograd.grad(loss, list(params.values()))
            for n, g in zip(params, grads):
                out[n].append(g.detach())
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
    return {n: torch.stack(v) for n, v in out.items()}


def assert_close_dicts(a: dict, b: dict, *, rtol: float, atol: float) -> None:
    assert list(a) == list(b), (list(a), list(b))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
