"""`reproduce` under torchrun (2 CPU processes, gloo): rank 0 fine-tunes, both ranks share
the attribute stage, rank 0 evaluates and writes; the scores equal a single process's
bitwise and the tables are the same."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from llm_influence.attribute import read_scores
from llm_influence.cli import main

ARGS = ["reproduce", "--profile", "smoke", "--tasks", "mixed-small", "--methods", "gradsim,datainf,exact",
        "--studies", "", "--chunk-size", "3", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reproduce_under_torchrun_equals_one_process(tmp_path, data_dir, monkeypatch):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               LLM_INFLUENCE_DATA=str(data_dir))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "llm_influence.cli", *ARGS, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("mixed-small") == 1  # only rank 0 prints the table

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*ARGS, "--out", str(tmp_path / "one"), "--data-dir", str(data_dir)]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())["tasks"]["mixed-small"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["tasks"]["mixed-small"]
    assert {m: (v["acc"], v["cover"]) for m, v in one["methods"].items()} == \
        {m: (v["acc"], v["cover"]) for m, v in two["methods"].items()}
    for method in ("gradsim", "datainf", "exact"):
        a, _ = read_scores(tmp_path / "one" / "runs" / "mixed-small" / "scores" / one["checkpoint"] / f"{method}.safetensors")
        b, _ = read_scores(tmp_path / "two" / "runs" / "mixed-small" / "scores" / two["checkpoint"] / f"{method}.safetensors")
        assert torch.equal(a, b), method
    assert (tmp_path / "two" / "report.html").is_file() and (tmp_path / "two" / "report.md").is_file()
