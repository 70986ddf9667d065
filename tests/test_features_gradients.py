"""Per-example LoRA gradients from one batched pass equal a per-example loop; K-FAC factors
equal a hand loop over tokens."""

from __future__ import annotations

import pytest
import torch

from llm_influence.features.gradients import (compute_features, gradient_token_mask, lora_modules,
                                              per_example_gradients, sequence_losses)
from llm_influence.models import LoraSpec, collate, lora_parameters, model_inputs, per_example_loss

from test_features_support import assert_close_dicts, encode, lora_model, loop_gradients, make_examples

CASES = {
    "q-v-all-layers": (LoraSpec(dropout=0.0), "response"),
    "layer-1-only": (LoraSpec(dropout=0.0, layers=(1,)), "response"),
    "loss-on-all": (LoraSpec(r=2, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "o_proj")), "all"),
    "loss-on-all-padded": (LoraSpec(dropout=0.0), "all-padded"),
}


def _mixed_lengths(encoded) -> None:
    lengths = {len(e.input_ids) for e in encoded}
    assert len(lengths) >= 4, lengths  # padded batches really mix lengths


@pytest.fixture(scope="module")
def references(tiny):
    """Per case: the float64 model's per-example-loop gradients (computed once)."""
    cache = {}

    def get(case):
        if case not in cache:
            spec, loss_on = CASES[case]
            model, tok = lora_model(tiny, spec, dtype=torch.float64)
            enc = encode(tok, make_examples(), loss_on=loss_on)
            cache[case] = loop_gradients(model, enc, tok.pad_token_id)
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_hook_gradients_match_loop_float64(tiny, references, case):
    spec, loss_on = CASES[case]
    model, tok = lora_model(tiny, spec, dtype=torch.float64)
    enc = encode(tok, make_examples(), loss_on=loss_on)
    if loss_on != "all-padded":  # all-padded pads every example to max_length
        _mixed_lengths(enc)
    grads, kfac = per_example_gradients(model, enc, tok.pad_token_id, batch_size=4, description=None)
    ref = references(case)
    assert kfac is None
    assert list(grads) == list(lora_parameters(model))
    if spec.layers == (1,):
        assert all(".layers.1." in b for b in grads)
    for b, g in grads.items():
        assert g.dtype == torch.float64
        assert g.shape == (len(enc), *lora_parameters(model)[b].shape)
        assert g.abs().sum() > 0, b  # B != 0, so A-gradients are non-trivial too
    assert_close_dicts(grads, ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_hook_gradients_match_loop_float32(tiny, references, case):
    """float32 extraction (same weights, rounded) against the float64 loop."""
    spec, loss_on = CASES[case]
    model, tok = lora_model(tiny, spec, dtype=torch.float32)
    enc = encode(tok, make_examples(), loss_on=loss_on)
    grads, _ = per_example_gradients(model, enc, tok.pad_token_id, batch_size=8, description=None)
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert_close_dicts({k: v.double() for k, v in grads.items()}, references(case), rtol=1e-4, atol=1e-5)


def test_supervised_pads_keep_their_gradient_under_eager_attention(tiny):
    """Eager attention lets a fully masked pad query attend to the whole sequence, so the
    supervised pads of ``all-padded`` get a gradient of their own; the hooks keep it
    (float32: eager's float64 mask overflows to NaN on fully masked rows)."""
    from dataclasses import replace

    model, tok = lora_model(tiny, LoraSpec(dropout=0.0), dtype=torch.float32)
    model.base_model.model.set_attn_implementation("eager")
    enc = encode(tok, make_examples(4), loss_on="all-padded")
    pads_only = [replace(e, labels=e.labels[:e.n_pad + 1] + [-100] * (len(e.labels) - e.n_pad - 1)) for e in enc]
    for encoded in (enc, pads_only):
        ref = loop_gradients(model, encoded, tok.pad_token_id)
        grads, _ = per_example_gradients(model, encoded, tok.pad_token_id, batch_size=4, description=None)
        assert_close_dicts(grads, ref, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in ref.values()) > 1e-3  # the pads' gradient is real


def test_lora_b_gradient_carries_the_scaling(tiny):
    """With alpha/r = 16 the B-gradient is 16x the gradient w.r.t. B's unscaled output
    contribution; doubling alpha doubles it exactly (forward output of B kept fixed)."""
    enc = encode(tiny[1], make_examples(3))
    out = {}
    for alpha in (16, 32):
        model, tok = lora_model(tiny, LoraSpec(r=4, alpha=alpha, dropout=0.0, layers=(1,)), dtype=torch.float64)
        with torch.no_grad():  # keep B * scaling fixed so the model function is the same
            for name, p in lora_parameters(model).items():
                if name.endswith("lora_B"):
                    p.mul_(16 / alpha)
        out[alpha], _ = per_example_gradients(model, enc, tok.pad_token_id, description=None)
    for b in out[16]:
        factor = 2.0 if b.endswith("lora_B") else 1.0
        torch.testing.assert_close(out[32][b], factor * out[16][b], rtol=1e-8, atol=1e-12)


def test_independent_of_batch_size_and_padding_side(tiny):
    model, tok = lora_model(tiny, LoraSpec(dropout=0.0), dtype=torch.float64)
    enc = encode(tok, make_examples(6, seed=3))
    base, _ = per_example_gradients(model, enc, tok.pad_token_id, batch_size=1, description=None)
    for bs, side in ((3, "left"), (8, "right"), (8, "left")):
        got, _ = per_example_gradients(model, enc, tok.pad_token_id, batch_size=bs, side=side, description=None)
        assert_close_dicts(got, base, rtol=1e-9, atol=1e-13)


def test_eval_mode_and_flags_restored(tiny):
    """Dropout is active in training mode; extraction runs in eval mode (deterministic, equal
    to the eval-mode loop) and restores the training flag and requires_grad flags."""
    model, tok = lora_model(tiny, LoraSpec(dropout=0.5, layers=(1,)), dtype=torch.float64)
    enc = encode(tok, make_examples(3))
    model.train()
    for p in model.parameters():  # as a frozen, loaded adapter: nothing requires grad
        p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads_train, _ = per_example_gradients(model, enc, tok.pad_token_id, description=None)
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    grads_eval, _ = per_example_gradients(model, enc, tok.pad_token_id, description=None)
    assert not model.training
    assert_close_dicts(grads_train, grads_eval, rtol=0, atol=0)


def test_sequence_losses_is_the_training_loss(tiny):
    model, tok = lora_model(tiny)
    enc = encode(tok, make_examples())
    batch = collate(enc, tok.pad_token_id)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    torch.testing.assert_close(sequence_losses(logits, batch["labels"]), per_example_loss(logits, batch["labels"]))
    res = compute_features(model, enc, tok.pad_token_id, grads=True, description=None)
    torch.testing.assert_close(res.losses.float(), per_example_loss(logits, batch["labels"]), rtol=1e-5, atol=1e-6)
    # float64 stays float64 (the training helper casts to float32)
    assert sequence_losses(logits.double(), batch["labels"]).dtype == torch.float64


def test_gradient_token_mask_by_hand():
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100],   # p = 2 (logit 2 predicts label 3)
                           [-100, -100, -100, -100, -100, -100],  # no supervised token
                           [-100, 7, -100, 8, 9, -100]])      # left... any layout: p = 3
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
    got = gradient_token_mask(mask, labels)
    want = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(got, want)


@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_kfac_factors_match_token_loop(tiny, loss_on):
    model, tok = lora_model(tiny, LoraSpec(r=2, alpha=8, dropout=0.0), dtype=torch.float64)
    enc = encode(tok, make_examples(4), loss_on=loss_on)
    res = compute_features(model, enc, tok.pad_token_id, grads=True, kfac=True, batch_size=3, description=None)

    # Hand loop: one example at a time, its own mean loss, inputs and output-gradients per token.
    modules = lora_modules(model)
    params = lora_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    acts: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, b=b: acts.__setitem__(b, (inp[0], out)))
             for b, m in modules.items()]
    in_sum = {b: 0.0 for b in modules}
    out_sum = {b: 0.0 for b in modules}
    n_tokens = 0
    try:
        for e in enc:
            acts.clear()
            batch = collate([e], tok.pad_token_id)
            logits = model(**model_inputs(batch)).logits
            loss = sequence_losses(logits, batch["labels"])[0]
            blocks = list(acts)
            deltas = torch.autograd.grad(loss, [acts[b][1] for b in blocks])
            labels = e.labels
            last = max(t for t in range(len(labels) - 1) if labels[t + 1] != -100)
            n_tokens += last + 1
            for b, d in zip(blocks, deltas):
                x = acts[b][0][0].detach()
                d = d[0]
                # tokens after `last` cannot receive gradient (causality): check it
                assert torch.all(d[last + 1:] == 0)
                for t in range(last + 1):
                    in_sum[b] = in_sum[b] + torch.outer(x[t], x[t])
                    out_sum[b] = out_sum[b] + torch.outer(d[t], d[t])
    finally:
        for h in hooks:
            h.remove()
    assert set(res.kfac) == set(modules)
    for b, f in res.kfac.items():
        assert f.n_tokens == n_tokens
        rows, cols = params[b].shape
        assert f.input_cov.shape == (cols, cols) and f.grad_cov.shape == (rows, rows)
        torch.testing.assert_close(f.input_cov, in_sum[b] / n_tokens, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(f.grad_cov, out_sum[b] / n_tokens, rtol=1e-10, atol=1e-18)
        assert torch.linalg.eigvalsh(f.input_cov).min() > -1e-12


def test_kfac_independent_of_batching(tiny):
    model, tok = lora_model(tiny, LoraSpec(r=2, alpha=8, dropout=0.0, layers=(0,)), dtype=torch.float64)
    enc = encode(tok, make_examples(4))
    a = compute_features(model, enc, tok.pad_token_id, grads=False, kfac=True, batch_size=1, description=None)
    b = compute_features(model, enc, tok.pad_token_id, grads=False, kfac=True, batch_size=3, side="left",
                         description=None)
    assert a.grads == {} and b.grads == {}
    for blk in a.kfac:
        assert a.kfac[blk].n_tokens == b.kfac[blk].n_tokens
        torch.testing.assert_close(a.kfac[blk].input_cov, b.kfac[blk].input_cov, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(a.kfac[blk].grad_cov, b.kfac[blk].grad_cov, rtol=1e-9, atol=1e-18)


def test_no_lora_is_an_error(tiny):
    with pytest.raises(ValueError, match="no LoRA"):
        per_example_gradients(tiny[0], encode(tiny[1], make_examples(2)), tiny[1].pad_token_id, description=None)
