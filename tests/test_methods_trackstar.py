"""``trackstar`` and ``less`` against computations written out independently: an explicit
loop over examples and checkpoints, the AdamW moments read straight from a real tiny-llama
checkpoint's ``optimizer.safetensors`` (assigned to the LoRA matrices by the model's own
parameter order), explicit ``d x d`` matrices ``R`` and their inverse square roots by
eigendecomposition, and the learning rates read from ``train_log.jsonl``."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_influence.attribute import AttributeArgs, attribute, read_scores, score_matrix
from llm_influence.cli import main
from llm_influence.config import TrainArgs
from llm_influence.data import Example, TaskData
from llm_influence.errors import UserError
from llm_influence.features.extract import extract_features
from llm_influence.features.optimizer import load_adam_moments
from llm_influence.methods import Scoring, get_method_class, make_method
from llm_influence.models import LoraSpec
from llm_influence.models.lora import lora_parameters
from llm_influence.rundir import RunDir
from llm_influence.training import finetune
from llm_influence.training.load import load_finetuned

EPOCHS = 2


def _task():
    train = [Example(f"t{i}", f"Question {i}: name colour {i % 2}?", ["red sky", "green grass"][i % 2] + f" {i}",
                     ["red", "green"][i % 2]) for i in range(7)]
    test = [Example(f"q{i}", f"Question {10 + i}: name colour {i % 2}?", ["red sky", "green grass"][i % 2],
                    ["red", "green"][i % 2]) for i in range(3)]
    return TaskData("colours", train, test)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("trackstar") / "run"
    finetune(path, _task(), model_name="tiny-llama", lora=LoraSpec(r=2, alpha=8, dropout=0.0),
             args=TrainArgs(epochs=EPOCHS, batch_size=3, lr=5e-3, max_length=48, seed=1))
    return path


# ---------------------------------------------------------------------------------------
# the independent reference


def _epoch_lrs(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    out: dict[int, list[float]] = {}
    for row in rows:
        if row["kind"] == "step":
            out.setdefault(row["epoch"], []).append(row["lr"])
    return {e: sum(v) / len(v) for e, v in out.items()}


def _raw_state(run: Path, epoch: int) -> dict:
    """The checkpoint's AdamW state straight from its files, keyed by LoRA block in the
    fine-tuned model's parameter order (index i = i-th trainable parameter)."""
    folder = run / "checkpoints" / f"epoch-{epoch}"
    tensors = load_file(str(folder / "optimizer.safetensors"))
    group = json.loads((folder / "trainer_state.json").read_text())["param_groups"][0]
    model, _, _ = load_finetuned(RunDir(run), f"epoch-{epoch}")
    names = list(lora_parameters(model))
    state = {name: {"m": tensors[f"state.{i}.exp_avg"].double(), "v": tensors[f"state.{i}.exp_avg_sq"].double(),
                    "t": int(tensors[f"state.{i}.step"])} for i, name in enumerate(names)}
    return {"state": state, "names": names, "beta1": group["betas"][0], "beta2": group["betas"][1],
            "eps": group["eps"]}


def _grads(run: Path, epoch: int, split: str) -> tuple[list[str], torch.Tensor]:
    f = extract_features(run, f"epoch-{epoch}", split, need={"grads"})
    return f.blocks, torch.stack([torch.cat([f.grads[b][i].reshape(-1).double() for b in f.blocks])
                                  for i in range(f.n)])


def _blocks_slices(run: Path, blocks: list[str]) -> list[slice]:
    f = extract_features(run, "epoch-1", "train", need={"grads"})
    out, start = [], 0
    for b in blocks:
        size = f.grads[b][0].numel()
        out.append(slice(start, start + size))
        start += size
    return out


def _inv_sqrt(R: torch.Tensor, delta: float) -> torch.Tensor:
    w, V = torch.linalg.eigh(R)
    return V @ torch.diag((w + delta) ** -0.5) @ V.T


def _paper_lambda(train_eigs, eval_eigs) -> float:
    tr = sorted((max(x, 0.0) for x in train_eigs), reverse=True)
    ev = sorted((max(x, 0.0) for x in eval_eigs), reverse=True)
    top = max(tr[0], ev[0])
    rank = min(sum(x > 1e-12 * top for x in tr), sum(x > 1e-12 * top for x in ev))
    k = max(1, round(1000 / 65536 * rank))
    return tr[k - 1] / (ev[k - 1] + tr[k - 1])


def _trackstar_reference(run: Path, epochs: list[int], weights: dict[int, float], *, mixing, structure: str,
                         ratio: float = 0.1) -> torch.Tensor:
    total = None
    for epoch in epochs:
        raw = _raw_state(run, epoch)
        blocks, G = _grads(run, epoch, "train")
        _, Q = _grads(run, epoch, "test")
        assert blocks == raw["names"]
        scale = torch.cat([1.0 / ((raw["state"][b]["v"] / (1 - raw["beta2"] ** raw["state"][b]["t"])).sqrt()
                                  + raw["eps"]).reshape(-1) for b in blocks])
        U = [G[i] * scale for i in range(G.shape[0])]           # one loop iteration per training example
        W = [Q[t] * scale for t in range(Q.shape[0])]           # ... and per test example
        n, m, d = len(U), len(W), scale.numel()
        groups = [slice(0, d)] if structure == "joint" else _blocks_slices(run, blocks)
        R_train = [sum(torch.outer(u[s], u[s]) for u in U) / n for s in groups]
        R_eval = [sum(torch.outer(w[s], w[s]) for w in W) / m for s in groups]
        if mixing == "auto":
            lam = _paper_lambda(torch.cat([torch.linalg.eigvalsh(R) for R in R_train]).tolist(),
                                torch.cat([torch.linalg.eigvalsh(R) for R in R_eval]).tolist())
        else:
            lam = mixing
        maps = []
        for s, Rt, Re in zip(groups, R_train, R_eval):
            R = lam * Re + (1 - lam) * Rt
            maps.append((s, _inv_sqrt(R, ratio * float(torch.trace(R)) / R.shape[0])))
        def encode(u):
            e = torch.cat([M @ u[s] for s, M in maps])
            return e / e.norm()
        enc_train = [encode(u) for u in U]
        enc_test = [encode(w) for w in W]
        scores = torch.tensor([[float(enc_test[t] @ enc_train[i]) for i in range(n)] for t in range(m)],
                              dtype=torch.float64)
        total = weights[epoch] * scores if total is None else total + weights[epoch] * scores
    return total


def _less_reference(run: Path, weights: dict[int, float]) -> torch.Tensor:
    total = None
    for epoch in sorted(weights):
        raw = _raw_state(run, epoch)
        blocks, G = _grads(run, epoch, "train")
        _, Q = _grads(run, epoch, "test")
        b1, b2, eps = raw["beta1"], raw["beta2"], raw["eps"]
        m0 = torch.cat([raw["state"][b]["m"].reshape(-1) for b in blocks])
        v0 = torch.cat([raw["state"][b]["v"].reshape(-1) for b in blocks])
        t = raw["state"][blocks[0]]["t"] + 1
        scores = torch.zeros(Q.shape[0], G.shape[0], dtype=torch.float64)
        for i in range(G.shape[0]):
            g = G[i]
            m_hat = (b1 * m0 + (1 - b1) * g) / (1 - b1 ** t)
            v_hat = (b2 * v0 + (1 - b2) * g * g) / (1 - b2 ** t)
            gamma = m_hat / (v_hat.sqrt() + eps)
            for j in range(Q.shape[0]):
                scores[j, i] = float(Q[j] @ gamma) / (float(Q[j].norm()) * float(gamma.norm()))
        total = weights[epoch] * scores if total is None else total + weights[epoch] * scores
    return total


# ---------------------------------------------------------------------------------------
# tests


def test_adam_moments_are_assigned_to_blocks_in_parameter_order(run):
    train = extract_features(run, "epoch-2", "train", need={"grads", "optimizer"})
    raw = _raw_state(run, 2)
    assert train.blocks == raw["names"]
    mo = train.optimizer
    assert mo.step == 2 * math.ceil(7 / 3) and mo.betas[mo.blocks[0]] == (0.9, 0.999)
    for b in raw["names"]:
        assert torch.equal(mo.exp_avg_sq[b].double(), raw["state"][b]["v"])
        assert torch.equal(mo.exp_avg[b].double(), raw["state"][b]["m"])
    assert load_adam_moments(run / "checkpoints" / "epoch-0", train.blocks) is None  # no step taken yet
    with pytest.raises(UserError, match="cannot assign"):
        load_adam_moments(run / "checkpoints" / "epoch-2", list(reversed(train.blocks)))


@pytest.mark.parametrize("config", [
    {"checkpoints": "all", "mixing": 0.7, "structure": "joint"},
    {"checkpoints": "last", "mixing": "auto", "structure": "block"},
])
def test_trackstar_equals_the_formula_written_out(run, config):
    attribute(run, AttributeArgs(methods=("trackstar",), method_args={"trackstar": dict(config)}))
    scores, meta = read_scores(run / "scores" / f"epoch-{EPOCHS}" / "trackstar.safetensors")
    lrs = _epoch_lrs(run)
    if config["checkpoints"] == "all":
        expected = _trackstar_reference(run, [1, 2], lrs, mixing=config["mixing"], structure=config["structure"])
    else:
        expected = _trackstar_reference(run, [2], {2: 1.0}, mixing=config["mixing"], structure=config["structure"])
    assert scores.dtype == torch.float64 and scores.shape == (3, 7)
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-10)
    diag = meta["diagnostics"]["checkpoints"]
    assert len(diag) == (2 if config["checkpoints"] == "all" else 1)
    assert all(c["optimizer_step"] in (3, 6) and 0.0 <= c["mixing"] <= 1.0 for c in diag)
    if config["checkpoints"] == "last":
        assert scores.abs().max() <= 1.0 + 1e-12  # one checkpoint, weight 1: cosines


def test_trackstar_without_hessian_is_the_corrected_gradient_cosine(run):
    attribute(run, AttributeArgs(methods=("trackstar",), method_args={"trackstar": {"hessian": "none"}}))
    scores, _ = read_scores(run / "scores" / f"epoch-{EPOCHS}" / "trackstar.safetensors")
    raw = _raw_state(run, 2)
    blocks, G = _grads(run, 2, "train")
    _, Q = _grads(run, 2, "test")
    scale = torch.cat([1.0 / ((raw["state"][b]["v"] / (1 - 0.999 ** raw["state"][b]["t"])).sqrt() + 1e-8).reshape(-1)
                       for b in blocks])
    U, W = G * scale, Q * scale
    expected = (W / W.norm(dim=1, keepdim=True)) @ (U / U.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


def test_less_equals_the_formula_written_out(run):
    attribute(run, AttributeArgs(methods=("less",)))
    scores, meta = read_scores(run / "scores" / f"epoch-{EPOCHS}" / "less.safetensors")
    lrs = _epoch_lrs(run)
    assert lrs[1] > lrs[2] > 0
    torch.testing.assert_close(scores, _less_reference(run, lrs), rtol=1e-8, atol=1e-12)
    assert [c["weight"] for c in meta["diagnostics"]["checkpoints"]] == [lrs[1], lrs[2]]


def test_an_orthogonal_full_projection_inside_the_method_changes_nothing(run):
    """A rotation of each block (``project_kind=orthogonal``, ``project_dim`` = all parameters)
    preserves every inner product and the trace: the encodings' cosines are unchanged."""
    rd = RunDir(run)
    train = extract_features(rd, "last", "train", need={"grads", "optimizer"})
    test = extract_features(rd, "last", "test", need={"grads"})
    d = sum(g[0].numel() for g in train.grads.values())
    for name, extra in (("trackstar", {}), ("trackstar", {"structure": "block", "mixing": 0.5}), ("less", {"checkpoints": "last"})):
        plain = make_method(name, **extra).fit(train).score(test)
        rotated_method = make_method(name, project_dim=d, project_kind="orthogonal", project_seed=3, **extra)
        rotated = rotated_method.fit(train).score(test)
        torch.testing.assert_close(rotated, plain, rtol=1e-8, atol=1e-10)
        assert rotated_method.diagnostics["checkpoints"][0]["projection"]["dim"] == d
    small = make_method("trackstar", project_dim=16).fit(train).score(test)
    assert small.shape == (3, 7) and not torch.allclose(small, make_method("trackstar").fit(train).score(test))


def test_scoring_declarations_chunks_and_batch_size(run, tmp_path):
    assert get_method_class("trackstar").scoring is Scoring.WHOLE  # R couples all training examples
    assert get_method_class("less").scoring is Scoring.SEPARABLE
    rd = RunDir(run)
    train = extract_features(rd, "last", "train", need={"grads", "optimizer"})
    test = extract_features(rd, "last", "test", need={"grads"})
    less = make_method("less", checkpoints="last")
    whole = less.fit(train).score(test)
    chunked = score_matrix(make_method("less", checkpoints="last"), train, test, chunk_size=2)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-15)  # a column depends only on its example
    other = tmp_path / "copy"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("features", "scores"))
    methods = ("trackstar", "less")
    a = attribute(run, AttributeArgs(methods=methods, extract_batch_size=1, force=True))
    b = attribute(other, AttributeArgs(methods=methods, extract_batch_size=5, force=True))
    for ra, rb in zip(a, b):
        sa, _ = read_scores(ra.path)
        sb, _ = read_scores(rb.path)
        torch.testing.assert_close(sa, sb, rtol=2e-4, atol=1e-6)


def test_errors_name_the_way_out(run, capsys):
    with pytest.raises(UserError, match="project_dim"):
        attribute(run, AttributeArgs(methods=("trackstar",), project_dim=16))
    rd = RunDir(run)
    train0 = extract_features(rd, "epoch-0", "train", need={"grads", "optimizer"})
    test0 = extract_features(rd, "epoch-0", "test", need={"grads"})
    assert train0.optimizer is None
    for name in ("trackstar", "less"):
        with pytest.raises(UserError, match="no AdamW state"):
            make_method(name, checkpoints="last").fit(train0).score(test0)
    # without the optimizer correction, a checkpoint without state and stored projections are fine
    assert make_method("trackstar", optimizer_correction=False).fit(train0).score(test0).shape == (3, 7)
    results = attribute(run, AttributeArgs(methods=("trackstar",), project_dim=16,
                                           method_args={"trackstar": {"optimizer_correction": False}}))
    assert read_scores(results[0].path)[1]["projection"]["dim"] == 16
    capsys.readouterr()
    status = main(["attribute", "--run", str(run), "--methods", "trackstar", "--method-arg",
                   "trackstar.mixing=2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "mixing" in err and len(err.splitlines()) == 1


def test_explain_runs_trackstar_and_less_on_a_run(run, tmp_path, capsys):
    status = main(["explain", "--run", str(run), "--prompt", "Question 3: name colour 1?", "--response", "green grass",
                   "--methods", "trackstar,less", "--method-arg", "less.checkpoints=last", "--json",
                   "--cache-dir", str(tmp_path / "cache"), "--top-k", "3", "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert status == 0 and out["measure"] == "loss"
    assert [len(out["queries"][0]["top"][m]) for m in ("trackstar", "less")] == [3, 3]
    status = main(["explain", "--run", str(run), "--prompt", "p", "--response", "r", "--methods", "less",
                   "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "less.checkpoints=last" in err


DRIVER = r"""
import sys
from llm_influence import distributed
from llm_influence.attribute import AttributeArgs, attribute
world = distributed.current()
assert world.size == 2, world
attribute(sys.argv[1], AttributeArgs(methods=("trackstar", "less"), chunk_size=2, extract_batch_size=3,
                                     measure="logprob:green", method_args={"trackstar": {"checkpoints": "all"}}))
distributed.shutdown()
"""


def test_two_processes_equal_one_process(run, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    for dest in (one, two):
        shutil.copytree(run, dest, ignore=shutil.ignore_patterns("features", "scores"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "driver.py").write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}", str(tmp_path / "driver.py"), str(two)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    attribute(one, AttributeArgs(methods=("trackstar", "less"), chunk_size=2, extract_batch_size=3,
                                 measure="logprob:green", method_args={"trackstar": {"checkpoints": "all"}}))
    for name in ("trackstar", "less"):
        s1, m1 = read_scores(one / "scores" / f"epoch-{EPOCHS}" / f"{name}.safetensors")
        s2, m2 = read_scores(two / "scores" / f"epoch-{EPOCHS}" / f"{name}.safetensors")
        assert torch.equal(s1, s2), name
        assert m2["measure"]["name"] == "logprob" and m2["measure"]["argument"] == "green"
