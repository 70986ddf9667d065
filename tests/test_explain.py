"""`explain` on tiny-llama: the ranking equals the attribute stage's on the same run, a
second query reuses the training features (only the query goes through the model), the
generated response is the greedy one, the fresh-LoRA path equals projected full-weight
gradients, tied scores share their rank in every output, and the CLI's JSON / CSV / batch
modes and errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from llm_influence.attribute import AttributeArgs, attribute, read_scores
from llm_influence.cli import main
from llm_influence.config import TrainArgs
from llm_influence.data import Example, TaskData
from llm_influence.evaluation.metrics import rank_training, tie_ranks
from llm_influence.explain import (TIE_NOTE, Explanation, ExplainArgs, ExplainResult, Query, args_from_run, explain,
                                   print_tables, to_json, top_influencers, write_csv)
from llm_influence.models import LoraSpec
from llm_influence.rundir import RunDir, write_examples
from llm_influence.training import finetune
from test_attribute import _task  # the same six-example colours task

METHODS = ("gradsim", "datainf", "repsim")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("explain") / "run"
    finetune(path, _task(), model_name="tiny-llama", lora=LoraSpec(r=2, alpha=8, dropout=0.0),
             args=TrainArgs(epochs=2, batch_size=3, lr=5e-3, max_length=48, seed=1))
    attribute(path, AttributeArgs(methods=METHODS))
    return path


class ForwardCounter:
    """Counts the example rows that go through the model's forward pass."""

    def __init__(self, monkeypatch):
        from transformers.models.llama import modeling_llama

        self.rows = 0
        original = modeling_llama.LlamaForCausalLM.forward
        counter = self

        def counted(module, *args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            counter.rows += int(ids.shape[0]) if ids is not None else 0
            return original(module, *args, **kwargs)

        monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", counted)


def test_explain_ranks_like_attribute_on_the_run(run, tmp_path):
    task = RunDir(run).load_task()
    queries = [Query(f"x{i}", ex.prompt, ex.response) for i, ex in enumerate(task.test)]
    result = explain(queries, args_from_run(run, methods=METHODS, top_k=4, cache_dir=tmp_path / "cache"))
    for method in METHODS:
        scores, meta = read_scores(run / "scores" / "epoch-2" / f"{method}.safetensors")
        order = rank_training(scores)
        for i, e in enumerate(result.explanations):
            assert not e.generated and e.query.response == task.test[i].response
            got = e.top[method]
            assert [x.id for x in got] == [meta["train_ids"][j] for j in order[i, :4].tolist()]
            assert [x.rank for x in got] == tie_ranks(scores)[i, :4].tolist()
            torch.testing.assert_close(torch.tensor([x.score for x in got], dtype=torch.float64),
                                       scores[i, order[i, :4]], rtol=1e-5, atol=1e-7)
            assert [x.group for x in got] == [task.train[j].group for j in order[i, :4].tolist()]


def test_second_query_costs_only_the_query_forward_passes(run, tmp_path, monkeypatch):
    counter = ForwardCounter(monkeypatch)
    args = args_from_run(run, methods=("datainf", "repsim"), top_k=3, cache_dir=tmp_path / "cache")
    first = explain([Query("a", "Question 20: name colour 1?", "green grass")], args)
    n_train = len(RunDir(run).load_task().train)
    assert not first.train_features_reused
    assert counter.rows >= n_train + 1
    counter.rows = 0
    second = explain([Query("b", "Question 21: name colour 0?", "red sky")], args)
    assert second.train_features_reused
    assert counter.rows == 1  # one gradient + representation pass for the one query
    assert second.query_run == first.query_run


def test_without_response_the_greedy_generation_is_explained(tmp_path):
    from llm_influence.models.generation import generate
    from llm_influence.training.load import load_finetuned

    # a run whose greedy output is not blank (the colour run's tiny model emits newlines)
    train = [Example(f"t{i}", f"Question {i}: name colour {i % 2}?", ["red sky", "green grass"][i % 2],
                     ["red", "green"][i % 2]) for i in range(6)]
    run = tmp_path / "run"
    finetune(run, TaskData("c", train, []), model_name="tiny-llama", lora=LoraSpec(r=4, alpha=32, dropout=0.0),
             args=TrainArgs(epochs=8, batch_size=3, lr=3e-2, max_length=48, seed=1, validation="none"))
    prompt = "Question 30: name colour 0?"
    result = explain([Query("g", prompt)], args_from_run(run, methods=("repsim",), top_k=2,
                                                        max_new_tokens=6, cache_dir=tmp_path / "c"))
    model, formatter, _ = load_finetuned(RunDir(run), "last")
    expected = generate(model, formatter, [prompt], max_new_tokens=6)[0]
    (e,) = result.explanations
    assert expected.strip() and e.generated and e.query.response == expected


def test_fresh_lora_scores_are_projected_full_weight_gradients(tmp_path, tiny):
    """Without an adapter, gradsim = sum over target modules of <s dW_test A^T, s dW_train A^T>
    with s = alpha / r and dW the full weight gradient of the example's mean response loss."""
    from safetensors.torch import load_file

    from llm_influence.models.formatting import ChatFormatter, collate, model_inputs
    from llm_influence.models.loss import per_example_loss

    train = _task().train[:3]
    write_examples(tmp_path / "train.jsonl", train)
    spec = LoraSpec(r=2, alpha=6, dropout=0.0)
    args = ExplainArgs(model="tiny-llama", train=tmp_path / "train.jsonl", methods=("gradsim",), top_k=3,
                       max_length=48, lora=spec, seed=3, cache_dir=tmp_path / "cache")
    query = Query("q", "Question 9: name colour 1?", "green grass")
    result = explain([query], args)
    scores = {x.id: x.score for x in result.explanations[0].top["gradsim"]}

    adapter = load_file(str(result.query_run / "checkpoints" / "epoch-1" / "adapter_model.safetensors"))
    model, tokenizer = tiny
    formatter = ChatFormatter(tokenizer, max_length=48, loss_on="response")
    modules = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}

    def projected(ex: Example) -> torch.Tensor:
        batch = collate([formatter.encode(ex)], tokenizer.pad_token_id)
        model.zero_grad()
        with torch.enable_grad():
            out = model(**model_inputs(batch))
            per_example_loss(out.logits, batch["labels"]).sum().backward()
        parts = []
        for name, module in modules.items():
            a = next(v for k, v in adapter.items() if k.endswith(f"{name}.lora_A.weight"))
            parts.append((spec.alpha / spec.r) * module.weight.grad @ a.T)
        model.zero_grad()
        return torch.cat([p.flatten() for p in parts])

    v = projected(Example("q", query.prompt, query.response, ""))
    for ex in train:
        assert scores[ex.id] == pytest.approx(float(v @ projected(ex)), rel=1e-4)


def test_cli_batch_json_and_csv(run, tmp_path, capsys):
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"id": "first", "prompt": "Question 40: name colour 0?", "response": "red sky"})
                       + "\n" + json.dumps({"prompt": "Question 41: name colour 1?", "response": "green"}) + "\n")
    common = ["explain", "--run", str(run), "--queries", str(queries), "--methods", "gradsim,repsim", "--top-k", "3",
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(common + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [q["id"] for q in data["queries"]] == ["first", "q1"]
    assert data["ties"] == TIE_NOTE
    assert all(isinstance(x["tied"], bool) and x["rank"] >= 1 for q in data["queries"] for m in q["top"].values()
               for x in m)
    assert all(len(q["top"][m]) == 3 for q in data["queries"] for m in ("gradsim", "repsim"))
    assert main(common + ["--csv", str(tmp_path / "out.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8")))
    assert len(rows) == 2 * 2 * 3
    first_gradsim = [r["train_id"] for r in rows if r["query_id"] == "first" and r["method"] == "gradsim"]
    assert first_gradsim == [x["id"] for x in data["queries"][0]["top"]["gradsim"]]
    assert [r["tied"] for r in rows[:3]] == [str(int(x["tied"])) for x in data["queries"][0]["top"]["gradsim"]]
    assert float(rows[0]["score"]) == data["queries"][0]["top"]["gradsim"][0]["score"]


def test_tied_scores_share_their_rank_in_every_output(tmp_path):
    train = [Example(f"t{j}", f"prompt {j}", f"response {j}", "ab"[j % 2]) for j in range(5)]
    # scores: t1 and t3 tie for the top, t0 is third, t2 and t4 tie last (t4 beyond the top 4)
    scores = torch.tensor([[0.5, 2.0, -1.0, 2.0, -1.0]], dtype=torch.float64)
    (rows,) = top_influencers(scores, train, top=4)
    assert [(x.id, x.rank, x.tied) for x in rows] == [("t1", 1, True), ("t3", 1, True), ("t0", 3, False),
                                                       ("t2", 4, True)]
    assert [x.score for x in rows] == [2.0, 2.0, 0.5, -1.0]
    result = ExplainResult([Explanation(Query("q", "a prompt", "a response"), False, {"repsim": rows})],
                           Path("query-run"), 0.0, False)
    data = to_json(result)
    assert data["ties"] == TIE_NOTE and "training-file order" in TIE_NOTE
    assert [(x["rank"], x["tied"]) for x in data["queries"][0]["top"]["repsim"]] == \
        [(1, True), (1, True), (3, False), (4, True)]
    csv_rows = list(csv.DictReader(open(write_csv(tmp_path / "t.csv", result), encoding="utf-8")))
    assert [(r["train_id"], r["rank"], r["tied"]) for r in csv_rows] == \
        [("t1", "1", "1"), ("t3", "1", "1"), ("t0", "3", "0"), ("t2", "4", "1")]
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200, color_system=None)
    print_tables(result, console)
    text = console.file.getvalue()
    assert [line.split()[1] for line in text.splitlines() if " t" in line and "│" in line] == ["1=", "1=", "3", "4="]
    assert text.count("Ties: ") == 1 and f"Ties: {TIE_NOTE}." in " ".join(text.split())


def test_abs_ranking_lists_by_magnitude_and_keeps_the_sign():
    train = [Example(f"t{j}", f"prompt {j}", f"response {j}", "ab"[j % 2]) for j in range(4)]
    scores = torch.tensor([[0.5, -3.0, 2.0, -0.1]], dtype=torch.float64)
    (by_score,) = top_influencers(scores, train, top=4)
    (by_abs,) = top_influencers(scores, train, top=4, rank_by="abs")
    assert [x.id for x in by_score] == ["t2", "t0", "t3", "t1"]
    assert [x.id for x in by_abs] == ["t1", "t2", "t0", "t3"]   # |IF|: 3.0, 2.0, 0.5, 0.1
    assert [x.score for x in by_abs] == [-3.0, 2.0, 0.5, -0.1]


def test_cli_rank_by_abs_equals_rank_training_abs_with_lissa_paper(run, tmp_path, capsys):
    task = RunDir(run).load_task()
    query = task.test[0]
    common = ["explain", "--run", str(run), "--prompt", query.prompt, "--response", query.response,
              "--methods", "lissa-paper", "--top-k", "5", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--json"]
    assert main(common + ["--rank-by", "abs"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rank_by"] == "abs"
    query_run = Path(data["query_run"])
    scores, meta = read_scores(next((query_run / "scores").glob("*/lissa-paper.safetensors")))
    order = rank_training(scores, "abs")[0, :5].tolist()
    assert [x["id"] for x in data["queries"][0]["top"]["lissa-paper"]] == [meta["train_ids"][j] for j in order]
    assert main(common + ["--rank-by", "nonsense"]) == 2


@pytest.mark.parametrize("line, message", [
    ('{"response": "x"}', "queries.jsonl:1: field 'prompt'"),
    ('{"prompt": "p", "response": 3}', "queries.jsonl:1: field 'response'"),
    ('{"prompt": "p", "id": "a"}\n{"prompt": "q", "id": "a"}', "queries.jsonl:2: field 'id': duplicate"),
    ('not json', "queries.jsonl:1: invalid JSON"),
])
def test_bad_query_files_exit_2_with_one_line(run, tmp_path, capsys, line, message):
    path = tmp_path / "queries.jsonl"
    path.write_text(line + "\n")
    status = main(["explain", "--run", str(run), "--queries", str(path), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err and len(err.splitlines()) == 1


def test_bad_arguments_exit_2(run, tmp_path, capsys):
    cases = [
        (["--model", "tiny-llama", "--prompt", "p"], "give --model and --train"),
        (["--model", "tiny-llama", "--train", str(tmp_path / "nope.jsonl"), "--prompt", "p"], "nope.jsonl: no such file"),
        (["--run", str(run), "--adapter", str(tmp_path), "--prompt", "p"], "do not also give"),
        (["--model", "tiny-llama", "--train", str(run / "data" / "train.jsonl"), "--adapter", str(tmp_path),
          "--prompt", "p"], "not a peft adapter folder"),
        (["--run", str(run), "--prompt", "p", "--methods", "nosuch"], "nosuch"),
        (["--run", str(run), "--prompt", "p", "--top-k", "0"], "--top-k"),
        (["--run", str(run)], "give a --prompt or a --queries file"),
    ]
    for extra, message in cases:
        status = main(["explain", "--cache-dir", str(tmp_path / "c"), *extra])
        err = capsys.readouterr().err.strip()
        assert status == 2, extra
        assert message in err and len(err.splitlines()) == 1, (extra, err)
