"""``torchrun``: two CPU processes (gloo) give the scores of one process.

The attribute stage runs under ``python -m torch.distributed.run --nproc_per_node=2`` on a
tiny-llama run (extraction sharded by chunk, rank 0 assembles; scoring sharded by
training chunk) and is compared with the same stage in this process: bitwise for every
method, except ``projected`` in its primal form (``D <= n``), whose ``D x D`` Gram sum is
all-reduced (equal to float64 rounding, checked at rtol 1e-5 after the float32 cast).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_influence import distributed
from llm_influence.attribute import AttributeArgs, attribute, read_scores
from llm_influence.config import TrainArgs
from llm_influence.data import Example, TaskData
from llm_influence.features import extract
from llm_influence.models import LoraSpec
from llm_influence.training import finetune

METHODS = ("gradsim", "gradsim-cos", "repsim", "datainf", "lissa", "exact", "exact-full", "ekfac", "tracin",
           "projected")
PROJECTED_METHODS = ("datainf", "gradsim", "projected")
N_TRAIN, CHUNK, PROJECT_DIM = 13, 2, 8  # 7 chunks: rank 0 owns chunks 1-4, rank 1 chunks 5-7

DRIVER = r"""
import sys
from llm_influence import distributed
from llm_influence.attribute import AttributeArgs, attribute
world = distributed.current()
assert world.size == 2 and world.backend == "gloo", world
attribute(sys.argv[1], AttributeArgs(methods=tuple(sys.argv[3].split(",")), chunk_size=int(sys.argv[4]), extract_batch_size=3))
attribute(sys.argv[2], AttributeArgs(methods=tuple(sys.argv[5].split(",")), chunk_size=int(sys.argv[4]), extract_batch_size=3,
                                     project_dim=int(sys.argv[6]), project_seed=5))
distributed.shutdown()
"""


def test_owner_partitions_items_into_contiguous_ranges():
    for count in (1, 2, 7, 13):
        for size in (1, 2, 3, 5):
            owners = [distributed.owner(i, count, size) for i in range(count)]
            assert owners == sorted(owners) and set(owners) <= set(range(size))
            if count >= size:
                assert set(owners) == set(range(size))  # nobody idle when there is enough work
            per_rank = [distributed.mine(count, distributed.World(rank=r, size=size)) for r in range(size)]
            assert sorted(sum(per_rank, [])) == list(range(count))
    assert distributed.chunk_ranges(5, 2) == [(0, 2), (2, 4), (4, 5)] and distributed.chunk_ranges(0, 3) == []
    assert distributed.current().size == 1  # no WORLD_SIZE in the test environment
    assert distributed.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
    assert distributed.broadcast_flags([True, False]) == [True, False]


def _task() -> TaskData:
    train = [Example(f"t{i}", f"Question {i}: which colour is thing {i}?", ["red sky", "green grass"][i % 2]
                     + f" number {i}", ["red", "green"][i % 2]) for i in range(N_TRAIN)]
    test = [Example(f"q{i}", f"Question {30 + i}: which colour?", ["red sky", "green grass"][i % 2],
                    ["red", "green"][i % 2]) for i in range(3)]
    return TaskData("colours", train, test)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "run"
    finetune(path, _task(), model_name="tiny-llama", lora=LoraSpec(r=2, alpha=8, dropout=0.0),
             args=TrainArgs(epochs=1, batch_size=4, lr=5e-3, max_length=40, seed=3))
    return path


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("features", "scores"))
    return dest


def test_two_gloo_processes_equal_one_process(base_run, tmp_path, monkeypatch):
    full2, proj2 = _copy(base_run, tmp_path / "full2"), _copy(base_run, tmp_path / "proj2")
    full1, proj1 = _copy(base_run, tmp_path / "full1"), _copy(base_run, tmp_path / "proj1")
    # CPU processes (gloo) also on a machine with a GPU, and a CPU reference in this process
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(tmp_path / "driver.py"),
           str(full2), str(proj2), ",".join(METHODS), str(CHUNK), ",".join(PROJECTED_METHODS), str(PROJECT_DIM)]
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    attribute(full1, AttributeArgs(methods=METHODS, chunk_size=CHUNK, extract_batch_size=3))
    attribute(proj1, AttributeArgs(methods=PROJECTED_METHODS, chunk_size=CHUNK, extract_batch_size=3,
                                   project_dim=PROJECT_DIM, project_seed=5))

    for name in METHODS:
        one, meta1 = read_scores(full1 / "scores" / "epoch-1" / f"{name}.safetensors")
        two, meta2 = read_scores(full2 / "scores" / "epoch-1" / f"{name}.safetensors")
        assert torch.equal(one, two), name  # bitwise
        assert meta1["train_ids"] == meta2["train_ids"] and meta1["diagnostics"] == meta2["diagnostics"], name
    _, meta = read_scores(full2 / "scores" / "epoch-1" / "projected.safetensors")
    assert meta["diagnostics"]["solver"].startswith("woodbury")
    for name in PROJECTED_METHODS:
        one, _ = read_scores(proj1 / "scores" / "epoch-1" / f"{name}.safetensors")
        two, meta = read_scores(proj2 / "scores" / "epoch-1" / f"{name}.safetensors")
        assert meta["projection"] == {"dim": PROJECT_DIM, "seed": 5, "kind": "gaussian"}
        if name == "projected":
            assert meta["diagnostics"]["solver"].startswith("primal")  # D = 8 <= n = 13: all-reduced sum
            torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(one, two), name

    # the features: the same bytes, made by two ranks (rank 0 logged only its own chunks)
    for run1, run2 in ((full1, full2), (proj1, proj2)):
        f1 = extract.extract_features(run1, "last", "train", need={"grads"})
        f2 = extract.extract_features(run2, "last", "train", need={"grads"})
        assert all(torch.equal(f1.grads[b], f2.grads[b]) for b in f1.grads)
    summary = json.loads((full2 / "features" / "epoch-1" / "train.json").read_text())
    assert summary["arguments"]["world_size"] == 2 and summary["arguments"]["chunk_size"] == CHUNK
    logged = sorted(set(int(i) for i in re.findall(r"full2/features/epoch-1: train chunk (\d+)/7", proc.stderr)))
    assert logged == [1, 2, 3, 4]  # chunks 5-7 were computed by the (quiet) rank 1
    config = json.loads((full2 / "config.json").read_text())
    assert config["attribute"]["methods"] == list(METHODS)
