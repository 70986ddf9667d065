"""True Hessian-vector products equal the explicit Hessian of the mean training loss."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from llm_influence.features.gradients import sequence_losses
from llm_influence.features.hvp import differentiable_attention, make_hvp
from llm_influence.models import LoraSpec, collate, lora_parameters, model_inputs

from test_features_support import encode, lora_model, make_examples, reference_loss


def _explicit_hessian(model, enc, pad_id) -> tuple[torch.Tensor, list[str], list[torch.Size]]:
    """``torch.autograd.functional.hessian`` of (1/n) sum_i L_i over a flat vector of all
    LoRA parameters, with each L_i from its own unpadded forward. Only the logits of the
    supervised window are computed (``logits_to_keep``): the other positions carry no loss,
    and the LM head over the 49k vocabulary dominates the cost of the 128 double-backward
    passes."""
    params = lora_parameters(model)
    names = {b: n for n, _ in model.named_parameters() for b in params if n.startswith("base_model.model." + b + ".")}
    blocks = list(params)
    shapes = [params[b].shape for b in blocks]
    sizes = [p.numel() for p in params.values()]
    flat0 = torch.cat([params[b].detach().reshape(-1) for b in blocks])
    singles = [(collate([e], pad_id), e.n_supervised + 1) for e in enc]
    for e in enc:  # the supervised labels are the last tokens (loss_on="response", no truncation)
        assert all(x != -100 for x in e.labels[len(e.labels) - e.n_supervised:])

    def mean_loss(flat):
        parts = torch.split(flat, sizes)
        override = {names[b]: p.reshape(s) for b, p, s in zip(blocks, parts, shapes)}
        total = 0.0
        for batch, keep in singles:
            kwargs = {**model_inputs(batch), "logits_to_keep": keep}
            logits = functional_call(model, override, args=(), kwargs=kwargs).logits
            total = total + reference_loss(logits, batch["labels"][:, -keep:])
        return total / len(singles)

    model.eval()
    with differentiable_attention(model):
        H = torch.autograd.functional.hessian(mean_loss, flat0)
    return H, blocks, shapes


def test_hvp_equals_explicit_hessian_float64(tiny):
    model, tok = lora_model(tiny, LoraSpec(r=1, alpha=4, dropout=0.0, targets=("q_proj",), layers=(1,)),
                            dtype=torch.float64, scale=0.2)
    enc = encode(tok, make_examples(3), max_length=40)
    H, blocks, shapes = _explicit_hessian(model, enc, tok.pad_token_id)
    assert H.shape == (128, 128)
    torch.testing.assert_close(H, H.T, rtol=1e-6, atol=1e-8 * float(H.abs().max()))
    hvp = make_hvp(model, enc, tok.pad_token_id, batch_size=2)  # batches of 2 and 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        v = torch.randn(H.shape[0], generator=gen, dtype=torch.float64)
        parts = torch.split(v, [s.numel() for s in shapes])
        out = hvp({b: p.reshape(s) for b, p, s in zip(blocks, parts, shapes)})
        assert list(out) == blocks
        got = torch.cat([out[b].reshape(-1) for b in blocks])
        want = H @ v
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8 * float(want.abs().max()))
        assert float((got - want).norm() / want.norm()) < 1e-7
    assert hvp.calls == 2
    # the attention implementation is unchanged
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_hvp_mean_over_batches(tiny):
    """The batched sum equals one batch of everything; the result is linear in v."""
    model, tok = lora_model(tiny, LoraSpec(r=1, alpha=4, dropout=0.0, layers=(0,)), dtype=torch.float64)
    enc = encode(tok, make_examples(4), max_length=40)
    params = lora_parameters(model)
    gen = torch.Generator().manual_seed(1)
    v = {b: torch.randn(p.shape, generator=gen, dtype=torch.float64) for b, p in params.items()}
    a = make_hvp(model, enc, tok.pad_token_id, batch_size=3)(v)
    b = make_hvp(model, enc, tok.pad_token_id, batch_size=1)(v)
    a2 = make_hvp(model, enc, tok.pad_token_id, batch_size=3)({k: 2 * t for k, t in v.items()})
    for k in params:
        torch.testing.assert_close(a[k], b[k], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(a2[k], 2 * a[k], rtol=1e-10, atol=1e-14)
    # float32 inputs come back float32 (computed in the model's dtype)
    f = make_hvp(model, enc, tok.pad_token_id, batch_size=4)({k: t.float() for k, t in v.items()})
    assert all(t.dtype == torch.float32 for t in f.values())


def test_hvp_rejects_bad_vectors(tiny):
    model, tok = lora_model(tiny, LoraSpec(r=1, dropout=0.0, targets=("q_proj",), layers=(0,)))
    hvp = make_hvp(model, encode(tok, make_examples(1)), tok.pad_token_id)
    params = lora_parameters(model)
    with pytest.raises(ValueError, match="missing"):
        hvp({})
    with pytest.raises(ValueError, match="shaped"):
        hvp({b: torch.zeros(3) for b in params})
