"""Chat formatting: the label mask covers exactly the prompt tokens of the chat template,
and one code path (encode/collate) serves training, gradients and generation."""

from __future__ import annotations

import pytest
import torch

from llm_influence.data import Example
from llm_influence.models import IGNORE_INDEX, ChatFormatter, collate, model_inputs, per_example_loss

EXAMPLES = [
    Example("a", "Write a poem about the sea.", "The sea is wide,\nthe sea is deep.", "g"),
    Example("b", "What is 2+2?", "\n4", "g"),
    Example("c", "Reverse: one two three", "three two one", "h"),
]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_label_mask_is_exactly_the_chat_template_prompt(tiny, example):
    _, tok = tiny
    fmt = ChatFormatter(tok, max_length=512)
    enc = fmt.encode(example)
    # The prompt, token by token, is what the chat template produces for the user turn with
    # the generation prompt.
    template_prompt = tok.apply_chat_template([{"role": "user", "content": example.prompt}],
                                              tokenize=True, add_generation_prompt=True, return_dict=False)
    if isinstance(template_prompt, dict) or hasattr(template_prompt, "keys"):
        template_prompt = template_prompt["input_ids"]
    assert enc.input_ids[: enc.prompt_len] == list(template_prompt)
    assert enc.labels[: enc.prompt_len] == [IGNORE_INDEX] * enc.prompt_len
    # Every token after the prompt is supervised, with its own id as label.
    assert enc.labels[enc.prompt_len:] == enc.input_ids[enc.prompt_len:]
    assert enc.n_supervised == len(enc.input_ids) - enc.prompt_len > 0
    # The supervised tokens render the assistant turn: the response and the end-of-turn token.
    response_text = tok.decode(enc.input_ids[enc.prompt_len:])
    assert response_text.startswith(example.response)
    assert tok.eos_token in response_text
    # And prompt + response is the full chat template rendering.
    full = tok.apply_chat_template([{"role": "user", "content": example.prompt},
                                    {"role": "assistant", "content": example.response}], tokenize=False)
    assert tok.decode(enc.input_ids) == full


def test_loss_on_all_supervises_every_token(tiny):
    _, tok = tiny
    enc = ChatFormatter(tok, max_length=512, loss_on="all").encode(EXAMPLES[0])
    assert enc.labels == enc.input_ids


def test_truncation_keeps_prompt_and_cuts_response(tiny):
    _, tok = tiny
    long = Example("x", "Short prompt", " ".join(["word"] * 300), "g")
    full = ChatFormatter(tok, max_length=4096).encode(long)
    enc = ChatFormatter(tok, max_length=48).encode(long)
    assert len(enc.input_ids) == 48
    assert enc.input_ids == full.input_ids[:48]
    assert enc.prompt_len == full.prompt_len


def test_truncation_of_overlong_prompt_keeps_supervised_tokens(tiny):
    _, tok = tiny
    ex = Example("x", " ".join(["prompt"] * 400), "the answer is here", "g")
    full = ChatFormatter(tok, max_length=4096).encode(ex)
    enc = ChatFormatter(tok, max_length=64).encode(ex)
    n_resp = len(full.input_ids) - full.prompt_len
    assert len(enc.input_ids) == 64
    assert enc.n_supervised == min(n_resp, 64 // 4)
    # The prompt is cut from the left: its end (the generation prompt) survives.
    assert enc.input_ids[: enc.prompt_len] == full.input_ids[full.prompt_len - enc.prompt_len: full.prompt_len]


def test_collate_padding_and_last_prompt_index(tiny):
    _, tok = tiny
    fmt = ChatFormatter(tok, max_length=128)
    encs = [fmt.encode(e) for e in EXAMPLES]
    for side in ("right", "left"):
        batch = collate(encs, tok.pad_token_id, side=side)
        width = max(len(e.input_ids) for e in encs)
        assert batch["input_ids"].shape == (3, width)
        for i, e in enumerate(encs):
            row_mask = batch["attention_mask"][i].bool()
            assert batch["input_ids"][i][row_mask].tolist() == e.input_ids
            assert batch["labels"][i][row_mask].tolist() == e.labels
            assert (batch["labels"][i][~row_mask] == IGNORE_INDEX).all()
            assert batch["input_ids"][i, batch["last_prompt_index"][i]].item() == e.input_ids[e.prompt_len - 1]


def test_padding_side_does_not_change_per_example_loss(tiny):
    model, tok = tiny
    fmt = ChatFormatter(tok, max_length=128)
    encs = [fmt.encode(e) for e in EXAMPLES]
    with torch.no_grad():
        right = collate(encs, tok.pad_token_id, "right")
        left = collate(encs, tok.pad_token_id, "left")
        lr = per_example_loss(model(**model_inputs(right)).logits, right["labels"])
        ll = per_example_loss(model(**model_inputs(left)).logits, left["labels"])
        single = torch.stack([per_example_loss(model(**model_inputs(collate([e], tok.pad_token_id))).logits,
                                               collate([e], tok.pad_token_id)["labels"])[0] for e in encs])
    torch.testing.assert_close(lr, single, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ll, single, rtol=1e-4, atol=1e-5)


def test_per_example_loss_is_mean_over_supervised_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    got = per_example_loss(logits, labels)
    logp = torch.log_softmax(logits, -1)
    want0 = -(logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 5]) / 3
    want1 = -(logp[1, 0, 1] + logp[1, 1, 2]) / 2
    torch.testing.assert_close(got, torch.stack([want0, want1]))


def test_fallback_template_without_chat_template(tiny):
    _, tok = tiny

    class NoTemplate:
        chat_template = None
        eos_token = tok.eos_token

        def __call__(self, text, add_special_tokens=False):
            return tok(text, add_special_tokens=add_special_tokens)

    fmt = ChatFormatter(NoTemplate(), max_length=256)
    p, r = fmt.split_text("Hi", "Hello")
    assert p == "User: Hi\n---\nAssistant: " and r == "Hello" + tok.eos_token


def test_all_padded_left_pads_with_eos_to_max_length(tiny):
    """The authors' v2 encoding: EOS left padding to exactly ``max_length``, every label
    supervised; the real tokens are the ``"all"`` encoding's; collate masks the pads as
    attention keys and keeps their labels."""
    _, tok = tiny
    fmt = ChatFormatter(tok, max_length=96, loss_on="all-padded")
    encs = [fmt.encode(e) for e in EXAMPLES]
    for e, ex in zip(encs, EXAMPLES):
        plain = ChatFormatter(tok, max_length=96, loss_on="all").encode(ex)
        assert len(e.input_ids) == 96 and e.n_pad == 96 - len(plain.input_ids) > 0
        assert e.input_ids == [tok.eos_token_id] * e.n_pad + plain.input_ids
        assert e.labels == e.input_ids and e.prompt_len == plain.prompt_len
    batch = collate(encs, tok.pad_token_id)
    for i, e in enumerate(encs):
        assert batch["attention_mask"][i].tolist() == [0] * e.n_pad + [1] * (96 - e.n_pad)
        assert batch["labels"][i].tolist() == e.input_ids
        assert batch["input_ids"][i, batch["last_prompt_index"][i]].item() == e.input_ids[e.n_pad + e.prompt_len - 1]
    long = Example("x", "Short prompt", " ".join(["word"] * 300), "g")
    cut = fmt.encode(long)
    assert cut.n_pad == 0 and len(cut.input_ids) == 96


def test_all_padded_gradient_is_the_all_gradient_scaled_by_the_real_share(tiny):
    """Under SDPA a pad query attends to nothing, so the pad positions' losses are constant
    in the LoRA weights: the all-padded loss's gradient is the "all" loss's gradient times
    (real predictions) / (max_length - 1), up to float32 rounding (the float64 model's
    RMSNorm computes in float32: even grad(49 L) and 49 grad(L) differ by ~4e-7 here)."""
    from test_features_support import lora_model

    model, tok = lora_model(tiny, dtype=torch.float64)
    assert model.config._attn_implementation == "sdpa"
    params = [p for p in model.parameters() if p.requires_grad]
    for ex in EXAMPLES:
        grads = {}
        for loss_on in ("all", "all-padded"):
            batch = collate([ChatFormatter(tok, max_length=64, loss_on=loss_on).encode(ex)], tok.pad_token_id)
            loss = per_example_loss(model(**model_inputs(batch)).logits, batch["labels"])[0]
            grads[loss_on] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        n_real = len(ChatFormatter(tok, max_length=64, loss_on="all").encode(ex).input_ids)
        assert grads["all"].abs().sum() > 0
        torch.testing.assert_close(grads["all-padded"], grads["all"] * (n_real - 1) / 63, rtol=1e-6, atol=1e-7)
