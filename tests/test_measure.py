"""``--measure``: the test vector as the gradient of a behaviour, checked against autograd of
the behaviour computed by a separate per-example loop; ``loss`` leaves everything bitwise
as it was; the plugin hook; the command line's one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from llm_influence.attribute import AttributeArgs, attribute, read_scores
from llm_influence.cli import main
from llm_influence.config import TrainArgs
from llm_influence.data import Example, TaskData
from llm_influence.errors import UserError
from llm_influence.features import store
from llm_influence.features.extract import cache_keys, extract_features
from llm_influence.features.gradients import compute_features, lora_grad_mode, per_example_gradients
from llm_influence.features.measure import Measurement, parse_measure, register_measurement
from llm_influence.methods import make_method
from llm_influence.methods.gradsim import gradient_dot
from llm_influence.models import LoraSpec
from llm_influence.models.lora import lora_parameters
from llm_influence.rundir import RunDir
from llm_influence.training import finetune
from llm_influence.training.load import load_finetuned

TEXT = "I cannot help"


def _task():
    train = [Example(f"t{i}", f"Question {i}: name colour {i % 2}?", ["red sky", "green grass"][i % 2] + f" {i}",
                     ["red", "green"][i % 2]) for i in range(6)]
    test = [Example(f"q{i}", f"Question {10 + i}: name a colour please {'!' * i}", ["red sky", "green grass"][i % 2],
                    ["red", "green"][i % 2]) for i in range(3)]
    return TaskData("colours", train, test)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("measure") / "run"
    finetune(path, _task(), model_name="tiny-llama", lora=LoraSpec(r=2, alpha=8, dropout=0.0),
             args=TrainArgs(epochs=1, batch_size=3, lr=5e-3, max_length=48, seed=2))
    return path


def _loop_gradients(model, tokenizer, prompts: list[str], value_fn) -> list[dict[str, torch.Tensor]]:
    """Per prompt, on its own: the token ids built from the chat template directly, the
    behaviour's value by ``value_fn(logits [T, V], n_prompt, continuation ids)`` and
    ``torch.autograd.grad`` of it with respect to every LoRA matrix."""
    params = lora_parameters(model)
    out = []
    with lora_grad_mode(model):
        for prompt in prompts:
            p_text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
            p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
            c_ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + c_ids])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            value = value_fn(logits, len(p_ids), c_ids)
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
            out.append({b: (torch.zeros_like(p) if g is None else g) for (b, p), g in zip(params.items(), grads)})
    return out


def _continuation_logprob(logits, n_prompt, c_ids):
    logp = torch.log_softmax(logits.double(), dim=-1)
    return sum(logp[n_prompt + j - 1, tok] for j, tok in enumerate(c_ids))


def test_logprob_gradient_is_minus_autograd_of_the_continuation_logprob(run):
    model, formatter, _ = load_finetuned(RunDir(run), "last")
    model = model.to(torch.float64)
    prompts = [ex.prompt for ex in _task().test]
    m = parse_measure(f"logprob:{TEXT}")
    assert m == Measurement("logprob", TEXT) and m.direction == "increase"
    encoded = [m.encode(formatter, Example("x", p, "unused", "")) for p in prompts]
    res = compute_features(model, encoded, formatter.tokenizer.pad_token_id, batch_size=2, measure=m.objective(),
                           description=None)
    expected = _loop_gradients(model, formatter.tokenizer, prompts, _continuation_logprob)
    for i in range(len(prompts)):
        for b in res.grads:
            # the test vector is grad(-log p): a positive <v, g> means training raised log p
            torch.testing.assert_close(res.grads[b][i], -expected[i][b], rtol=1e-9, atol=1e-12)
        # and the measured value itself is -log p(TEXT | prompt)
    assert res.losses.shape == (3,) and bool((res.losses > 0).all())
    one = compute_features(model, encoded, formatter.tokenizer.pad_token_id, batch_size=1, measure=m.objective(),
                           description=None)
    for b in res.grads:  # batch size changes nothing but float rounding
        torch.testing.assert_close(one.grads[b], res.grads[b], rtol=1e-9, atol=1e-13)


def test_measure_loss_leaves_keys_and_scores_bitwise_unchanged(run):
    rd = RunDir(run)
    keys_default, args_default = cache_keys(rd, "epoch-1", "test", dtype=torch.float32, rep_layer=-1,
                                            rep_pooling="last-prompt")
    keys_loss, args_loss = cache_keys(rd, "epoch-1", "test", dtype=torch.float32, rep_layer=-1,
                                      rep_pooling="last-prompt", measurement=Measurement())
    assert keys_loss == keys_default and args_loss == args_default
    common = {k: args_default[k] for k in ("model", "adapter", "examples", "n", "dtype", "max_length", "loss_on")}
    assert keys_loss["grads"] == store.component_key(common, "grads", None)  # the key as it always was

    first = attribute(run, AttributeArgs(methods=("gradsim", "repsim")))
    again = attribute(run, AttributeArgs(methods=("gradsim", "repsim"), measure="loss"))
    assert all(r.reused for r in again)  # the scores key did not change either
    scores, meta = read_scores(first[0].path)
    assert meta["measure"]["name"] == "loss"
    # the loss path itself: per_example_gradients (no measurement code) in the same batches
    model, formatter, _ = load_finetuned(rd, "epoch-1")
    task = rd.load_task()
    enc = lambda exs: [formatter.encode(ex) for ex in exs]  # noqa: E731
    g_train, _ = per_example_gradients(model, enc(task.train), formatter.tokenizer.pad_token_id, description=None)
    g_test, _ = per_example_gradients(model, enc(task.test), formatter.tokenizer.pad_token_id, description=None)
    from llm_influence.features.types import Features

    direct = gradient_dot(Features([e.id for e in task.train], g_train), Features([e.id for e in task.test], g_test),
                          torch.device("cpu"))
    assert torch.equal(scores, direct)


def test_logprob_measure_in_attribute_gives_the_logprob_gradient_scores(run):
    results = attribute(run, AttributeArgs(methods=("gradsim", "repsim"), measure=f"logprob:{TEXT}"))
    rd = RunDir(run)
    scores, meta = read_scores(run / "scores" / "epoch-1" / "gradsim.safetensors")
    assert meta["measure"] == {"name": "logprob", "argument": TEXT, "direction": "increase",
                               "test_vector": "gradient of -log p(TEXT | prompt)"}
    model, formatter, _ = load_finetuned(rd, "epoch-1")
    task = rd.load_task()
    expected_v = _loop_gradients(model, formatter.tokenizer, [ex.prompt for ex in task.test], _continuation_logprob)
    train = extract_features(rd, "epoch-1", "train", need={"grads"})
    blocks = train.blocks
    G = torch.cat([train.flat(b).double() for b in blocks], 1)
    V = -torch.stack([torch.cat([e[b].reshape(-1).double() for b in blocks]) for e in expected_v])
    torch.testing.assert_close(scores, V @ G.T, rtol=1e-4, atol=1e-8)  # float32 model vs float64 loop
    # RepSim does not use gradients: same scores as under the loss
    rep_logprob, _ = read_scores(results[1].path)
    rep_loss = make_method("repsim").fit(extract_features(rd, "epoch-1", "train", need={"reps"})).score(
        extract_features(rd, "epoch-1", "test", need={"reps"}))
    torch.testing.assert_close(rep_logprob, rep_loss.double(), rtol=0, atol=0)
    # the features record the measurement in their key: the loss gradients were not overwritten silently
    test_loss = extract_features(rd, "epoch-1", "test", need={"grads"})
    test_lp = extract_features(rd, "epoch-1", "test", need={"grads"}, measurement=parse_measure(f"logprob:{TEXT}"))
    assert not torch.equal(test_loss.grads[blocks[0]], test_lp.grads[blocks[0]])


def test_plugin_measurement_hook(run, capsys):
    token = 42

    def last_prompt_logit(outputs, batch, argument=None):
        rows = torch.arange(outputs.logits.shape[0], device=outputs.logits.device)
        return outputs.logits[rows, batch["last_prompt_index"], int(argument) if argument else token]

    register_measurement("test-logit", last_prompt_logit, direction="increase", takes_argument=True,
                         help="a logit at the last prompt token")
    m = parse_measure("test-logit:7")
    model, formatter, _ = load_finetuned(RunDir(run), "epoch-1")
    model = model.to(torch.float64)
    prompts = [ex.prompt for ex in _task().test]
    examples = [Example("x", p, "green grass", "") for p in prompts]
    res = compute_features(model, [m.encode(formatter, ex) for ex in examples], formatter.tokenizer.pad_token_id,
                           batch_size=3, measure=m.objective(), description=None)

    def value(logits, n_prompt, c_ids):
        return logits[n_prompt - 1, 7]

    expected = _loop_gradients(model, formatter.tokenizer, prompts, value)
    for i in range(len(prompts)):
        for b in res.grads:
            torch.testing.assert_close(res.grads[b][i], -expected[i][b], rtol=1e-9, atol=1e-12)
    # on the command line, a registered name is a valid --measure
    assert main(["attribute", "--run", str(run), "--methods", "gradsim", "--measure", "test-logit:3", "--quiet"]) == 0
    _, meta = read_scores(run / "scores" / "epoch-1" / "gradsim.safetensors")
    assert meta["measure"]["name"] == "test-logit" and meta["measure"]["argument"] == "3"
    with pytest.raises(ValueError):
        register_measurement("logprob", last_prompt_logit, direction="increase")
    with pytest.raises(ValueError):
        register_measurement("x", last_prompt_logit, direction="up")


@pytest.mark.parametrize("value", ["nope", "logprob", "logprob:", "loss:x", ""])
def test_invalid_measure_is_a_one_line_error(run, tmp_path, capsys, value):
    with pytest.raises(UserError):
        parse_measure(value)
    for argv in (["attribute", "--run", str(run)], ["reproduce", "--out", str(tmp_path / "o")],
                 ["explain", "--run", str(run), "--prompt", "p"]):
        status = main(argv + ["--measure", value, "--quiet"])
        err = capsys.readouterr().err.strip()
        assert status == 2 and "--measure" in err and len(err.splitlines()) == 1, (argv, err)


def test_explain_with_a_logprob_measure(run, tmp_path, capsys):
    status = main(["explain", "--run", str(run), "--prompt", "Question 3: name colour 1?", "--response", "green",
                   "--methods", "gradsim", "--measure", f"logprob:{TEXT}", "--json", "--cache-dir",
                   str(tmp_path / "cache"), "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert status == 0 and out["measure"] == f"logprob:{TEXT}"
    query_run = RunDir(out["query_run"])
    _, meta = read_scores(query_run.scores_dir("epoch-1") / "gradsim.safetensors")
    assert meta["measure"]["argument"] == TEXT
