"""Killing `llm-influence finetune` and running the same command again (issue 8, item 1).

Real processes: ``python -m llm_influence.cli finetune`` on tiny-llama (smoke profile) is
interrupted with SIGINT after its first optimiser steps (exit status 130 and the one-line
resume hint); the same command is started again and killed with SIGKILL after its third
epoch's row appears in ``train_log.jsonl``; run a third time, it must resume after the last
complete checkpoint without redoing (or rewriting) finished epochs, and end with the
adapter, optimizer state and training log of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

EPOCHS = 6


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("task")
    colours = ["red", "green", "blue"]
    with open(folder / "train.jsonl", "w") as fh:
        for i in range(12):
            fh.write(json.dumps({"prompt": f"Say colour number {i % 3} ({i}).", "response": f"{colours[i % 3]} it is.",
                                 "group": colours[i % 3]}) + "\n")
    with open(folder / "test.jsonl", "w") as fh:
        for i, c in enumerate(colours):
            fh.write(json.dumps({"prompt": f"Say colour number {i}.", "response": f"{c} it is.", "group": c}) + "\n")
    return f"jsonl:{folder / 'train.jsonl'},{folder / 'test.jsonl'}"


def _command(task: str, out: Path, quiet: bool = True) -> list[str]:
    # 12 examples / batch 4 = 3 steps per epoch, 18 steps in all. Without --quiet the
    # status lines ("resuming after epoch N") are printed.
    return [sys.executable, "-m", "llm_influence.cli", "finetune", "--task", task, "--profile", "smoke",
            "--out", str(out), "--epochs", str(EPOCHS), "--train-batch-size", "4", "--no-early-stopping"] + (
        ["--quiet"] if quiet else [])


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(task: str, out: Path, quiet: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(_command(task, out, quiet), capture_output=True, text=True, env=ENV, timeout=300)


def _log(run: Path) -> list[dict]:
    if not (run / "train_log.jsonl").is_file():
        return []
    rows = []
    for line in (run / "train_log.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows


def _sigint_default() -> None:
    """Give the child SIGINT's default action: a test process started as a background job of a
    non-interactive shell inherits SIGINT ignored, and so would the CLI, which then never sees
    the interrupt this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait(task: str, out: Path, ready, timeout: float = 120.0) -> subprocess.Popen:
    proc = subprocess.Popen(_command(task, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=_sigint_default)
    deadline = time.time() + timeout
    while not ready(_log(out)):
        if proc.poll() is not None:
            pytest.fail(f"finetune ended before the interruption point: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("finetune did not reach the interruption point in time")
        time.sleep(0.005)
    return proc


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _files(run: Path, epoch: int) -> dict[str, tuple[int, int, bytes]]:
    """name -> (inode, mtime_ns, bytes) of a checkpoint's files."""
    folder = run / "checkpoints" / f"epoch-{epoch}"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def _assert_same_as_reference(run: Path, ref: Path) -> None:
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        a = load_file(str(ref / "checkpoints" / f"epoch-{EPOCHS}" / name))
        b = load_file(str(run / "checkpoints" / f"epoch-{EPOCHS}" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    # The log holds every step and epoch exactly once, with the uninterrupted losses.
    assert _without_seconds(_log(run)) == _without_seconds(_log(ref))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"epoch-{e}" for e in range(EPOCHS + 1)]


@pytest.fixture(scope="module")
def reference(task_files, tmp_path_factory) -> Path:
    """The uninterrupted run, in this process (one thread, as the subprocesses; in-process and
    subprocess runs are bitwise equal, see test_reliability_determinism)."""
    from llm_influence.cli import main

    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(_command(task_files, out)[3:]) == 0
    return out


def test_sigint_then_sigkill_then_rerun_equals_uninterrupted(task_files, reference, tmp_path):
    run = tmp_path / "run"
    # 1. SIGINT in the middle of epoch 1: status 130, the one-line hint, nothing half-written.
    proc = _start_and_wait(task_files, run, lambda rows: sum(r["kind"] == "step" for r in rows) >= 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err == "llm-influence: interrupted; run the same command again to resume\n"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]

    # 2. The same command again, killed with SIGKILL once epoch 3 is logged.
    proc = _start_and_wait(task_files, run, lambda rows: any(r["kind"] == "epoch" and r["epoch"] >= 3 for r in rows))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch-"))
    assert EPOCHS not in done, "the kill came too late to test anything"
    complete = [e for e in done if (run / "checkpoints" / f"epoch-{e}" / "trainer_state.json").is_file()]
    last = max(complete)
    assert last >= 2
    before = {e: _files(run, e) for e in complete}

    # 3. Once more: it resumes after the last complete epoch and ends as if never stopped.
    again = _run(task_files, run, quiet=False)
    assert again.returncode == 0, again.stderr
    assert f"resuming after epoch {last}" in again.stderr
    for e in complete:  # finished epochs were neither redone nor rewritten: same inodes, times, bytes
        assert _files(run, e) == before[e], e
    _assert_same_as_reference(run, reference)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp folders left
