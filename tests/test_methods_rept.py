"""RepT (arXiv 2510.02334) against independent computations on tiny-llama.

* the batched hook's hidden states and hidden-state gradients equal a per-example
  ``torch.autograd.grad`` loop through ``output_hidden_states`` with an independently written
  loss, at every layer, with right and left padding, and do not depend on the batch size;
* the probing rule equals the cosines written out by hand;
* the RepT score equals the cosine of the concatenated signatures written out, for every
  ``grad_position`` / ``normalize``;
* token-level attribution equals a brute-force loop (one backward per training token);
* the attribute stage: cached features keyed by layer, the probed layer recorded, scores
  independent of the extraction batch size, ``explain --tokens``, and two ``torchrun``
  processes equal one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from llm_influence.attribute import AttributeArgs, attribute, read_scores
from llm_influence.cli import main
from llm_influence.config import TrainArgs
from llm_influence.features.extract import extract_features
from llm_influence.features.rep_grads import (choose_layer, hidden_index, layer_cosines, probe_layer,
                                              representation_gradients, token_signatures)
from llm_influence.features.types import Features
from llm_influence.methods import make_method
from llm_influence.models import LoraSpec, collate, model_inputs
from llm_influence.rundir import RunDir
from llm_influence.training import finetune

from test_attribute import _task
from test_features_support import encode, lora_model, make_examples, reference_loss


@pytest.fixture(scope="module")
def setup(tiny):
    model, tok = lora_model(tiny, LoraSpec(dropout=0.0), dtype=torch.float64)
    enc = encode(tok, make_examples(6))
    return model, tok, enc


def loop_hidden_grads(model, encoded, pad_id, layer):
    """Per example, unpadded: ``(hidden_states[layer] [T, H], d loss / d hidden_states[layer] [T, H])``
    with every parameter requiring grad (so the graph exists) and the loss written out."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    out = []
    try:
        for p, _ in saved:
            p.requires_grad_(True)
        for e in encoded:
            batch = collate([e], pad_id)
            res = model(**model_inputs(batch), output_hidden_states=True, use_cache=False)
            h = res.hidden_states[layer]
            loss = reference_loss(res.logits, batch["labels"])
            (g,) = torch.autograd.grad(loss, h)
            out.append((h[0].detach(), g[0].detach()))
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    return out


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -2])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_hook_equals_per_example_loop(setup, layer, side):
    model, tok, enc = setup
    res = representation_gradients(model, enc, tok.pad_token_id, layer=layer, batch_size=4, side=side,
                                   description=None)
    ref = loop_hidden_grads(model, enc, tok.pad_token_id, layer)
    assert res.signatures.shape == (len(enc), 3, model.config.hidden_size)
    assert res.signatures.dtype == torch.float64
    for i, (e, (h, g)) in enumerate(zip(enc, ref)):
        p = e.prompt_len - 1
        torch.testing.assert_close(res.signatures[i, 0], h[p], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.signatures[i, 1], g[p], rtol=1e-9, atol=1e-13)
        nxt = g[p + 1] if p + 1 < len(e.input_ids) else torch.zeros_like(g[p])
        torch.testing.assert_close(res.signatures[i, 2], nxt, rtol=1e-9, atol=1e-13)
        assert g[p].abs().max() > 0  # a real gradient, not an all-zero row
    # the per-example losses of the pass are the training losses
    for i, e in enumerate(enc):
        batch = collate([e], tok.pad_token_id)
        with torch.no_grad():
            want = reference_loss(model(**model_inputs(batch)).logits, batch["labels"])
        assert abs(float(res.losses[i]) - float(want)) < 1e-10


def test_no_parameter_gradient_and_flags_restored(setup):
    model, tok, enc = setup
    before = [(p.requires_grad, p.grad) for p in model.parameters()]
    representation_gradients(model, enc[:2], tok.pad_token_id, layer=1, description=None)
    assert [(p.requires_grad, p.grad) for p in model.parameters()] == before
    assert not model.training


def test_signatures_do_not_depend_on_batch_size(setup):
    model, tok, enc = setup
    one = representation_gradients(model, enc, tok.pad_token_id, layer=1, batch_size=1, description=None)
    four = representation_gradients(model, enc, tok.pad_token_id, layer=1, batch_size=4, description=None)
    torch.testing.assert_close(one.signatures, four.signatures, rtol=1e-10, atol=1e-13)


def test_layer_index_range(setup):
    model, _, _ = setup
    assert [hidden_index(model, x) for x in (0, 2, -1, -3)] == [0, 2, 2, 0]
    for bad in (3, -4):
        with pytest.raises(ValueError, match="out of range"):
            hidden_index(model, bad)


def test_token_signatures_equal_the_loop(setup):
    model, tok, enc = setup
    toks = token_signatures(model, enc, tok.pad_token_id, layer=1, batch_size=3)
    ref = loop_hidden_grads(model, enc, tok.pad_token_id, 1)
    for e, t, (h, g) in zip(enc, toks, ref):
        want = [q for q in range(len(e.labels) - 1) if e.labels[q + 1] != -100]
        assert t.positions == want and want[0] == e.prompt_len - 1
        assert t.token_ids == [e.input_ids[q + 1] for q in want]
        torch.testing.assert_close(t.hidden, h[want], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(t.grads, g[want], rtol=1e-9, atol=1e-13)


def test_probe_rule_by_hand(setup):
    model, tok, enc = setup
    cos = layer_cosines(model, enc, tok.pad_token_id, batch_size=2)
    with torch.no_grad():
        per = []
        for e in enc:
            hs = model(**model_inputs(collate([e], tok.pad_token_id)), output_hidden_states=True).hidden_states
            v = [h[0, e.prompt_len - 1] for h in hs]
            per.append([float(torch.dot(a, b) / (a.norm() * b.norm())) for a, b in zip(v[:-1], v[1:])])
    np.testing.assert_allclose(cos, np.mean(per, axis=0), rtol=1e-12)
    # the rule: later index of the least similar consecutive pair among l = 1..L-2
    assert choose_layer([0.9, 0.5, 0.2, 0.7, 0.1]) == 3      # pairs l=1..3: argmin l=2 -> 3; l=4 (final norm) excluded
    assert choose_layer([0.9, 0.4, 0.4, 0.8]) == 2           # a tie goes to the earlier layer
    assert choose_layer([0.3, 0.9]) == 1 and choose_layer([0.5]) == 1  # too few layers: L-1 (or L)
    assert probe_layer(model, enc, tok.pad_token_id)[0] == 1  # tiny-llama has 2 layers


# ----------------------------------------------------------------------------- the score

def _features(n, hidden=7, seed=0, layer=3):
    gen = torch.Generator().manual_seed(seed)
    rg = torch.randn(n, 3, hidden, generator=gen, dtype=torch.float64)
    rg[:, 1:] *= 0.01  # gradients are small next to hidden states
    return Features(ids=[f"x{i}" for i in range(n)], repgrads=rg, repgrads_layer=layer)


@pytest.mark.parametrize("grad_position", ["last-prompt", "first-response"])
@pytest.mark.parametrize("normalize", ["none", "parts"])
def test_score_equals_hand_formula(grad_position, normalize):
    train, test = _features(6, seed=1), _features(3, seed=2)
    train.repgrads[4] = 0  # a zero signature has cosine 0
    method = make_method("rept", grad_position=grad_position, normalize=normalize).fit(train)
    scores = method.score(test)
    assert scores.dtype == torch.float64 and scores.shape == (3, 6)
    row = 1 if grad_position == "last-prompt" else 2

    def sig(rg):
        h, g = rg[0].numpy(), rg[row].numpy()
        if normalize == "parts":
            h = h / np.linalg.norm(h) if np.linalg.norm(h) else h
            g = g / np.linalg.norm(g) if np.linalg.norm(g) else g
        return np.concatenate([h, g])

    for t in range(3):
        for i in range(6):
            a, b = sig(test.repgrads[t]), sig(train.repgrads[i])
            den = np.linalg.norm(a) * np.linalg.norm(b)
            want = a @ b / den if den else 0.0
            assert abs(float(scores[t, i]) - want) < 1e-13
    assert method.diagnostics["layer"] == 3
    ratio = np.mean([np.linalg.norm(test.repgrads[t][row]) / np.linalg.norm(test.repgrads[t][0]) for t in range(3)])
    assert abs(method.diagnostics["test_grad_to_hidden_norm_ratio"] - ratio) < 1e-12
    # chunked fitting (SEPARABLE) gives the same columns
    from llm_influence.attribute import score_matrix
    torch.testing.assert_close(score_matrix(make_method("rept", grad_position=grad_position, normalize=normalize),
                                            train, test, chunk_size=2), scores, rtol=1e-13, atol=1e-15)


def test_layer_mismatch_is_refused():
    train, test = _features(3), _features(2, layer=1)
    with pytest.raises(Exception, match="layer"):
        make_method("rept").fit(train).score(test)


def test_token_level_attribution_equals_brute_force(setup):
    """Token scores: cos(s_test, [h_q ; dL/dh_q]) with every dL/dh_q from its own backward."""
    model, tok, enc = setup
    layer = 1
    test_enc, train_enc = enc[:1], enc[1:4]
    test_rows = representation_gradients(model, test_enc, tok.pad_token_id, layer=layer, description=None).signatures
    train_rows = representation_gradients(model, train_enc, tok.pad_token_id, layer=layer, description=None).signatures
    toks = token_signatures(model, train_enc, tok.pad_token_id, layer=layer, batch_size=2)
    for normalize in ("none", "parts"):
        method = make_method("rept", layer=layer, normalize=normalize)
        # brute force: one backward per (training example, token position), all parameters live
        ref_test = loop_hidden_grads(model, test_enc, tok.pad_token_id, layer)[0]
        p_t = test_enc[0].prompt_len - 1
        s_t = np.concatenate([ref_test[0][p_t].numpy(), ref_test[1][p_t].numpy()])
        if normalize == "parts":
            s_t = np.concatenate([ref_test[0][p_t].numpy() / ref_test[0][p_t].norm().item(),
                                  ref_test[1][p_t].numpy() / ref_test[1][p_t].norm().item()])
        for e, t in zip(train_enc, toks):
            got = method.token_scores(test_rows[0], t.hidden, t.grads).numpy()
            batch = collate([e], tok.pad_token_id)
            want = []
            for q in t.positions:
                for p in model.parameters():
                    p.requires_grad_(True)
                try:
                    res = model(**model_inputs(batch), output_hidden_states=True, use_cache=False)
                    h = res.hidden_states[layer]
                    (g,) = torch.autograd.grad(reference_loss(res.logits, batch["labels"]), h)
                finally:
                    for p in model.parameters():
                        p.requires_grad_(False)
                hq, gq = h[0, q].detach().numpy(), g[0, q].numpy()
                if normalize == "parts":
                    hq, gq = hq / np.linalg.norm(hq), gq / np.linalg.norm(gq)
                s_q = np.concatenate([hq, gq])
                want.append(s_t @ s_q / (np.linalg.norm(s_t) * np.linalg.norm(s_q)))
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        # the first response token's score is the sample-level score
        train = Features(ids=["a", "b", "c"], repgrads=train_rows, repgrads_layer=layer)
        test = Features(ids=["q"], repgrads=test_rows, repgrads_layer=layer)
        sample = method.fit(train).score(test)[0]
        firsts = torch.stack([method.token_scores(test_rows[0], t.hidden, t.grads)[0] for t in toks])
        torch.testing.assert_close(firsts, sample, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- the engine

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("rept") / "run"
    finetune(path, _task(), model_name="tiny-llama", lora=LoraSpec(r=2, alpha=8, dropout=0.0),
             args=TrainArgs(epochs=1, batch_size=3, lr=5e-3, max_length=48, seed=1))
    return path


def test_attribute_stage(run, tmp_path):
    results = attribute(run, AttributeArgs(methods=("rept",), extract_batch_size=4))
    scores, meta = read_scores(run / "scores" / "epoch-1" / "rept.safetensors")
    record = json.loads((run / "features" / "epoch-1" / "rept-layer.json").read_text())
    assert record["layer"] == 1 and record["probe_ids"] == [f"t{i}" for i in range(6)] and len(record["cosines"]) == 2
    assert meta["diagnostics"]["layer"] == 1 and meta["arguments"]["layer"] == "auto"
    assert scores.dtype == torch.float64 and scores.shape == (2, 6)
    rd = RunDir(run)
    train = extract_features(rd, "epoch-1", "train", need={"repgrads"})
    test = extract_features(rd, "epoch-1", "test", need={"repgrads"})
    assert train.repgrads.shape == (6, 3, 64) and train.repgrads_layer == 1
    torch.testing.assert_close(scores, make_method("rept").fit(train).score(test), rtol=0, atol=0)
    # the signatures are those of the fine-tuned model, computed independently here
    from llm_influence.training.load import load_finetuned
    model, formatter, _ = load_finetuned(rd, "epoch-1")
    enc = [formatter.encode(ex) for ex in rd.load_task().train]
    direct = representation_gradients(model, enc, formatter.tokenizer.pad_token_id, layer=1, batch_size=6,
                                      description=None).signatures
    torch.testing.assert_close(train.repgrads, direct, rtol=1e-5, atol=1e-7)
    # reused; another layer is another feature file key and another scores key
    again = attribute(run, AttributeArgs(methods=("rept",)))
    assert again[0].reused and not results[0].reused
    other = attribute(run, AttributeArgs(methods=("rept",), method_args={"rept": {"layer": 2}}))
    assert not other[0].reused
    _, meta2 = read_scores(run / "scores" / "epoch-1" / "rept.safetensors")
    assert meta2["diagnostics"]["layer"] == 2 and meta2["diagnostics"]["layer_rule"] == "fixed"
    # extraction batch size changes nothing beyond rounding
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("features", "scores"))
    attribute(copy, AttributeArgs(methods=("rept",), extract_batch_size=1, chunk_size=4))
    one, _ = read_scores(copy / "scores" / "epoch-1" / "rept.safetensors")
    attribute(run, AttributeArgs(methods=("rept",)))
    four, _ = read_scores(run / "scores" / "epoch-1" / "rept.safetensors")
    torch.testing.assert_close(one, four, rtol=1e-6, atol=1e-7)


def test_bad_layer_is_one_line(run, capsys):
    code = main(["attribute", "--run", str(run), "--methods", "rept", "--method-arg", "rept.layer=9"])
    err = capsys.readouterr().err
    assert code == 2 and "out of range" in err


def test_explain_tokens(run, tmp_path, capsys):
    code = main(["explain", "--run", str(run), "--prompt", "Question 7: name colour 1?", "--response",
                 "green grass 7", "--methods", "rept,repsim", "--top-k", "3", "--tokens", "2", "--json",
                 "--cache-dir", str(tmp_path / "cache")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    rows = out["queries"][0]["top"]["rept"]
    assert len(rows) == 3 and all(len(r["tokens"]) == 2 for r in rows)
    assert all("tokens" not in r for r in out["queries"][0]["top"]["repsim"])
    # brute force on the query run: every listed token's score is cos(s_query, s_q)
    from llm_influence.explain import CHECKPOINT
    from llm_influence.training.load import load_finetuned
    qrun = RunDir(out["query_run"])
    model, formatter, _ = load_finetuned(qrun, CHECKPOINT)
    task = qrun.load_task()
    pad = formatter.tokenizer.pad_token_id
    q_rows = representation_gradients(model, [formatter.encode(task.test[0])], pad, layer=1,
                                      description=None).signatures[0]
    method = make_method("rept")
    by_id = {ex.id: ex for ex in task.train}
    for r in rows:
        e = formatter.encode(by_id[r["id"]])
        t = token_signatures(model, [e], pad, layer=1)[0]
        all_scores = method.token_scores(q_rows, t.hidden, t.grads).numpy()
        best = np.argsort(-all_scores, kind="stable")[:2]
        assert [x["position"] for x in r["tokens"]] == [t.positions[j] + 1 for j in best]
        np.testing.assert_allclose([x["score"] for x in r["tokens"]], all_scores[best], rtol=1e-5, atol=1e-7)
        assert [x["token"] for x in r["tokens"]] == [formatter.tokenizer.decode([t.token_ids[j]]) for j in best]
    # the table shows them too
    code = main(["explain", "--run", str(run), "--prompt", "Question 7: name colour 1?", "--response",
                 "green grass 7", "--methods", "rept", "--top-k", "2", "--tokens", "1",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0 and "top tokens" in capsys.readouterr().out
    code = main(["explain", "--run", str(run), "--prompt", "x", "--response", "y", "--methods", "repsim",
                 "--tokens", "2", "--cache-dir", str(tmp_path / "cache")])
    assert code == 2 and "--tokens" in capsys.readouterr().err


DRIVER = r"""
import sys
from llm_influence import distributed
from llm_influence.attribute import AttributeArgs, attribute
attribute(sys.argv[1], AttributeArgs(methods=("rept", "dra"), chunk_size=2, extract_batch_size=3))
distributed.shutdown()
"""


def test_two_gloo_processes_equal_one_process(run, tmp_path, monkeypatch):
    two, one = tmp_path / "two", tmp_path / "one"
    for d in (two, one):
        shutil.copytree(run, d, ignore=shutil.ignore_patterns("features", "scores"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}", str(tmp_path / "driver.py"), str(two)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    attribute(one, AttributeArgs(methods=("rept", "dra"), chunk_size=2, extract_batch_size=3))
    for name in ("rept", "dra"):
        a, meta_a = read_scores(one / "scores" / "epoch-1" / f"{name}.safetensors")
        b, meta_b = read_scores(two / "scores" / "epoch-1" / f"{name}.safetensors")
        assert torch.equal(a, b), name
        assert meta_a["diagnostics"] == meta_b["diagnostics"], name


def test_measurement_gradient_under_measure(run, tmp_path):
    """``--measure logprob:TEXT``: the test signatures' gradients are those of -log p(TEXT | prompt)."""
    from llm_influence.features.measure import encode_continuation, parse_measure
    from llm_influence.training.load import load_finetuned

    copy = tmp_path / "m"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("features", "scores"))
    attribute(copy, AttributeArgs(methods=("rept",), measure="logprob:green grass", method_args={"rept": {"layer": 1}}))
    scores, meta = read_scores(copy / "scores" / "epoch-1" / "rept.safetensors")
    rd = RunDir(copy)
    measurement = parse_measure("logprob:green grass")
    spec = make_method("rept", layer=1).feature_options()
    test = extract_features(rd, "epoch-1", "test", need={"repgrads"}, measurement=measurement, **spec)
    plain = extract_features(rd, "epoch-1", "test", need={"repgrads"}, **spec)
    model, formatter, _ = load_finetuned(rd, "epoch-1")
    enc = [encode_continuation(formatter, ex.prompt, "green grass") for ex in rd.load_task().test]
    want = representation_gradients(model, enc, formatter.tokenizer.pad_token_id, layer=1, description=None,
                                    measure=measurement.objective()).signatures
    torch.testing.assert_close(test.repgrads, want, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(test.repgrads[:, 1], plain.repgrads[:, 1])  # not the loss's gradient
    torch.testing.assert_close(test.repgrads[:, 0], plain.repgrads[:, 0])  # the same prompt, the same h_p
    train = extract_features(rd, "epoch-1", "train", need={"repgrads"}, **spec)
    torch.testing.assert_close(scores, make_method("rept", layer=1).fit(train).score(test), rtol=0, atol=0)


def test_explorer_token_view_equals_brute_force_and_is_cached(run, tmp_path, monkeypatch):
    """The explorer's RepT entries carry, for every listed training example, its best tokens
    against the selected test example: the same cosines as scoring every token by hand, and
    a second page build reads them from the cache beside the scores file."""
    from llm_influence import token_attribution
    from llm_influence.report.html import extract_payload, write_html_report
    from llm_influence.training.load import load_finetuned

    attribute(run, AttributeArgs(methods=("rept", "repsim")))
    html = write_html_report(tmp_path, [run], top_k=3, html_path=tmp_path / "page.html", tokens=2)
    task_payload = extract_payload(html.read_text())["tasks"][0]
    methods = {m["name"]: m for m in task_payload["checkpoints"][0]["methods"]}
    assert "topk_tokens" not in methods["repsim"]
    entry = methods["rept"]
    rd = RunDir(run)
    model, formatter, _ = load_finetuned(rd, "epoch-1")
    pad = formatter.tokenizer.pad_token_id
    task = rd.load_task()
    method = make_method("rept")
    for i, row in enumerate(entry["topk"]):
        s_test = representation_gradients(model, [formatter.encode(task.test[i])], pad, layer=1,
                                          description=None).signatures[0]
        for r, j in enumerate(row):
            t = token_signatures(model, [formatter.encode(task.train[j])], pad, layer=1)[0]
            all_scores = method.token_scores(s_test, t.hidden, t.grads).numpy()
            best = np.argsort(-all_scores, kind="stable")[:2]
            shown = entry["topk_tokens"][i][r]
            assert [x["position"] for x in shown] == [t.positions[b] + 1 for b in best]
            np.testing.assert_allclose([x["score"] for x in shown], all_scores[best], rtol=1e-5, atol=1e-7)
    assert (run / "scores" / "epoch-1" / token_attribution.EXPLORER_FILE).is_file()

    def no_model(*a, **k):
        raise AssertionError("the cached token view was recomputed")

    monkeypatch.setattr(token_attribution, "top_tokens", no_model)
    again = write_html_report(tmp_path, [run], top_k=3, html_path=tmp_path / "again.html", tokens=2)
    methods2 = {m["name"]: m for m in extract_payload(again.read_text())["tasks"][0]["checkpoints"][0]["methods"]}
    assert methods2["rept"]["topk_tokens"] == entry["topk_tokens"]
