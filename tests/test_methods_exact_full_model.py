"""``exact-full`` with true Hessian-vector products on a tiny LoRA model equals the
explicit damped Hessian inverse built with ``torch.autograd.functional.hessian``."""

from __future__ import annotations

import torch

from llm_influence.features.gradients import per_example_gradients
from llm_influence.features.hvp import make_hvp
from llm_influence.features.types import Features
from llm_influence.methods import make_method
from llm_influence.models import LoraSpec

from test_features_hvp import _explicit_hessian
from test_features_support import encode, lora_model, make_examples


def test_exact_full_true_hessian_equals_explicit_inverse(tiny):
    model, tok = lora_model(tiny, LoraSpec(r=1, alpha=4, dropout=0.0, targets=("q_proj",), layers=(1,)),
                            dtype=torch.float64, scale=0.2)
    examples = make_examples(4)
    train_enc = encode(tok, examples[:3], max_length=40)
    test_enc = encode(tok, examples[3:], max_length=40)  # one test example: CG costs ~100 HVPs per example
    H, blocks, shapes = _explicit_hessian(model, train_enc, tok.pad_token_id)
    H = (H + H.T) / 2
    evals = torch.linalg.eigvalsh(H)
    # The true Hessian of a non-convex loss may be indefinite: damp it to be positive definite.
    damping = float(max(0.0, -evals.min()) + 0.1 * evals.abs().max())

    train_grads, _ = per_example_gradients(model, train_enc, tok.pad_token_id, batch_size=3)
    test_grads, _ = per_example_gradients(model, test_enc, tok.pad_token_id, batch_size=1)
    train = Features(ids=["a", "b", "c"], grads=train_grads, hvp=make_hvp(model, train_enc, tok.pad_token_id))
    test = Features(ids=["x"], grads=test_grads)
    method = make_method("exact-full", hessian="true", damping=damping, tol=1e-11, max_iterations=500)
    scores = method.fit(train).score(test)

    flat = lambda f: torch.cat([f.grads[b].reshape(f.n, -1) for b in blocks], dim=1)  # noqa: E731
    G, V = flat(train), flat(test)
    X = torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), V.T).T
    expected = X @ G.T
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    assert method.diagnostics["residual_max"] < 1e-8
