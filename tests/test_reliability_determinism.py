"""The same command twice gives bitwise-identical scores on CPU (issue 8, item 6).

``finetune`` + ``attribute`` + ``evaluate`` (tiny-llama, smoke profile, every paper method
plus TracIn, every checkpoint) run once in this process and once in a fresh subprocess
(another string hash seed), into two different run directories: every scores tensor,
the scores files' cache keys and solver diagnostics, and the checkpoint files are
identical bit for bit; so are the metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from llm_influence.cli import main

METHODS = "datainf,lissa,gradsim,repsim,exact,tracin"


def _commands(task: str, out: Path) -> list[list[str]]:
    return [["finetune", "--task", task, "--profile", "smoke", "--out", str(out), "--quiet"],
            ["attribute", "--run", str(out), "--methods", METHODS, "--checkpoint", "all", "--quiet"],
            ["evaluate", "--run", str(out), "--quiet"]]


def _scores(run: Path) -> dict[str, tuple[torch.Tensor, dict]]:
    out = {}
    for path in sorted((run / "scores").rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            meta = {k: json.loads(v) for k, v in fh.metadata().items()}
            out[str(path.relative_to(run))] = (fh.get_tensor("scores"), meta)
    return out


def test_same_command_twice_gives_bitwise_identical_scores(tmp_path, capsys):
    colours = ["red", "green", "blue"]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Say colour {i % 3} ({i}).", "response": f"{colours[i % 3]} it is.",
                                         "group": colours[i % 3]}) + "\n" for i in range(12)))
    test.write_text("".join(json.dumps({"prompt": f"Say colour {i}.", "response": f"{c} it is.", "group": c}) + "\n"
                            for i, c in enumerate(colours)))
    task = f"jsonl:{train},{test}"
    a, b = tmp_path / "a", tmp_path / "b"
    for argv in _commands(task, a):
        assert main(argv) == 0
    # The same three commands in one fresh process (another string hash seed, nothing cached).
    script = ("import sys; from llm_influence.cli import main\n"
              f"for argv in {_commands(task, b)!r}:\n    assert main(argv) == 0, argv\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345"})
    assert proc.returncode == 0, proc.stderr

    sa, sb = _scores(a), _scores(b)
    assert sorted(sa) == sorted(f"scores/epoch-{e}/{m}.safetensors" for e in (1, 2) for m in METHODS.split(","))
    assert sa.keys() == sb.keys()
    volatile = {"seconds", "feature_seconds"}
    for name in sa:
        (ta, ma), (tb, mb) = sa[name], sb[name]
        assert ta.dtype == tb.dtype and ta.shape == tb.shape == (3, 12)
        assert torch.equal(ta, tb), name  # bitwise: torch.equal compares every element exactly
        assert ta.view(torch.int32).tolist() == tb.view(torch.int32).tolist(), name
        assert {k: v for k, v in ma.items() if k not in volatile} == {k: v for k, v in mb.items() if k not in volatile}
    for epoch in range(3):
        for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"):
            path = f"checkpoints/epoch-{epoch}/{name}"
            assert (a / path).read_bytes() == (b / path).read_bytes(), path
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    strip = lambda m: {c: {k: {x: y for x, y in v.items() if x not in volatile | {"scores_sha256"}}  # noqa: E731
                           for k, v in per.items()} for c, per in m["checkpoints"].items()}
    assert strip(ma) == strip(mb)
