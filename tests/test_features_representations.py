"""Representations: pooled hidden states equal single-example forwards, by hand."""

from __future__ import annotations

import pytest
import torch

from llm_influence.features.gradients import compute_features
from llm_influence.features.representations import pool_hidden, representations
from llm_influence.models import LoraSpec, collate, model_inputs

from test_features_support import encode, lora_model, make_examples


@pytest.fixture(scope="module")
def setup(tiny):
    model, tok = lora_model(tiny, LoraSpec(dropout=0.0), dtype=torch.float64)
    enc = encode(tok, make_examples(5))
    singles = []  # per example: the hidden-states tuple of an unpadded forward, [T, H] each
    with torch.no_grad():
        for e in enc:
            out = model(**model_inputs(collate([e], tok.pad_token_id)), output_hidden_states=True)
            singles.append([h[0] for h in out.hidden_states])
    return model, tok, enc, singles


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_prompt_equals_single_forward(setup, side):
    model, tok, enc, singles = setup
    reps = representations(model, enc, tok.pad_token_id, batch_size=3, side=side, description=None)
    assert reps.shape == (len(enc), model.config.hidden_size) and reps.dtype == torch.float64
    want = torch.stack([h[-1][e.prompt_len - 1] for h, e in zip(singles, enc)])
    torch.testing.assert_close(reps, want, rtol=1e-9, atol=1e-11)


def test_last_layer_is_after_final_norm(setup):
    model, tok, enc, singles = setup
    e = enc[0]
    with torch.no_grad():
        last = model.get_base_model().model(**model_inputs(collate([e], tok.pad_token_id))).last_hidden_state[0]
    torch.testing.assert_close(singles[0][-1], last, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [0, 1, -2])
def test_layer_option(setup, layer):
    model, tok, enc, singles = setup
    reps = representations(model, enc, tok.pad_token_id, layer=layer, batch_size=2, description=None)
    want = torch.stack([h[layer][e.prompt_len - 1] for h, e in zip(singles, enc)])
    torch.testing.assert_close(reps, want, rtol=1e-9, atol=1e-11)
    if layer == 0:  # the token embedding of the last prompt token
        emb = model.get_input_embeddings().weight
        torch.testing.assert_close(reps, torch.stack([emb[e.input_ids[e.prompt_len - 1]] for e in enc]))


def test_pooling_options_by_hand(setup):
    model, tok, enc, singles = setup
    mean_prompt = representations(model, enc, tok.pad_token_id, pooling="mean-prompt", side="left",
                                  batch_size=4, description=None)
    mean_all = representations(model, enc, tok.pad_token_id, pooling="mean", batch_size=4, description=None)
    for i, (h, e) in enumerate(zip(singles, enc)):
        last = h[-1]
        p = sum(last[t] for t in range(e.prompt_len)) / e.prompt_len
        a = sum(last[t] for t in range(len(e.input_ids))) / len(e.input_ids)
        torch.testing.assert_close(mean_prompt[i], p, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(mean_all[i], a, rtol=1e-9, atol=1e-11)


def test_pool_hidden_by_hand():
    h = torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    last_prompt = torch.tensor([1, 2])
    torch.testing.assert_close(pool_hidden(h, mask, last_prompt, "last-prompt"), torch.stack([h[0, 1], h[1, 2]]))
    torch.testing.assert_close(pool_hidden(h, mask, last_prompt, "mean-prompt"),
                               torch.stack([(h[0, 0] + h[0, 1]) / 2, (h[1, 1] + h[1, 2]) / 2]))
    torch.testing.assert_close(pool_hidden(h, mask, last_prompt, "mean"),
                               torch.stack([h[0, :3].mean(0), h[1, 1:].mean(0)]))
    h[0, 3] = float("nan")  # a non-finite value at a pad position does not leak
    assert torch.isfinite(pool_hidden(h, mask, last_prompt, "mean")).all()


def test_reps_from_the_gradient_pass_are_the_same(setup):
    model, tok, enc, _ = setup
    res = compute_features(model, enc, tok.pad_token_id, grads=True, reps=True, rep_layer=-1,
                           rep_pooling="mean", batch_size=2, description=None)
    want = representations(model, enc, tok.pad_token_id, pooling="mean", batch_size=5, description=None)
    torch.testing.assert_close(res.reps, want, rtol=1e-10, atol=1e-12)
    assert set(res.grads) and res.kfac is None


def test_bad_options(setup):
    model, tok, enc, _ = setup
    with pytest.raises(ValueError, match="pooling"):
        representations(model, enc, tok.pad_token_id, pooling="max", description=None)
    with pytest.raises(ValueError, match="out of range"):
        representations(model, enc[:1], tok.pad_token_id, layer=7, description=None)
