"""The CLI: tasks, finetune and generate, end to end on tiny-llama; errors exit 2."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from llm_influence.cli import main


def test_tasks_json_lists_sizes(data_dir, capsys):
    assert main(["tasks", "--json", "--data-dir", str(data_dir)]) == 0
    rows = {r["task"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows["mixed-small"]["train"], rows["mixed-small"]["test"]) == (40, 40)
    assert rows["backdoor-5"]["groups"]["trigger_5"] == 300


def test_finetune_then_generate(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    status = main(["finetune", "--task", "mixed-small", "--profile", "smoke", "--out", str(run), "--quiet",
                   "--data-dir", str(data_dir), "--epochs", "2", "--lr", "0.002", "--lora-r", "2",
                   "--train-per-group", "3", "--test-per-group", "2"])
    assert status == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["finetune"]["train"]["epochs"] == 2 and cfg["finetune"]["train"]["lr"] == 0.002
    assert cfg["finetune"]["lora"]["r"] == 2 and cfg["finetune"]["model"] == "tiny-llama"
    assert len(cfg["task"]["train_ids"]) == 6 and len(cfg["task"]["test_ids"]) == 2
    weights = load_file(str(run / "checkpoints" / "epoch-2" / "adapter_model.safetensors"))
    assert all(t.shape[0] == 2 or t.shape[1] == 2 for t in weights.values())
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert any(t.abs().sum() > 0 for t in lora_b)  # training moved B away from its zero init
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--prompt", "Hello", "--max-new-tokens", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    from llm_influence.models.generation import generate
    from llm_influence.rundir import RunDir
    from llm_influence.training.load import load_finetuned

    model, fmt, _ = load_finetuned(RunDir(run), "last")
    assert out == generate(model, fmt, ["Hello"], max_new_tokens=5)[0] + "\n"


def test_generate_is_greedy_and_uses_the_adapter(tmp_path, data_dir, capsys):
    from llm_influence.models.generation import generate
    from llm_influence.rundir import RunDir
    from llm_influence.training.load import load_finetuned

    run = tmp_path / "run"
    main(["finetune", "--task", "mixed-small", "--profile", "smoke", "--out", str(run), "--quiet",
          "--data-dir", str(data_dir), "--epochs", "1"])
    model, fmt, name = load_finetuned(RunDir(run), "last")
    assert name == "epoch-1"
    a = generate(model, fmt, ["Tell me a story", "Hi"], max_new_tokens=6)
    b = generate(model, fmt, ["Hi"], max_new_tokens=6)
    assert a[1] == b[0]  # left padding in a batch does not change a greedy completion
    ids = fmt.encode_prompt("Hi")
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             pad_token_id=fmt.tokenizer.pad_token_id)
    assert fmt.tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True) == b[0]


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["generate", "--run", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["finetune", "--task", "mixed-small", "--profile", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "argument --profile: invalid choice: 'nope'" in capsys.readouterr().err
