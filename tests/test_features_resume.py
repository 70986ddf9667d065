"""Chunked, resumable extraction and the memory-mapped feature store.

* an ``attribute`` command killed (SIGKILL, SIGINT) during feature extraction and run again
  reuses the finished chunks, computes only the rest, and ends with scores bitwise equal
  to an uninterrupted run;
* a damaged chunk is recomputed, alone;
* features assembled from chunks equal a one-chunk extraction (K-FAC factors from chunk sums);
* scores from memory-mapped features scored in training chunks equal the in-memory scores,
  and chunked scoring of a memory-mapped training set holds about one chunk (gradsim) or one
  block (datainf) in anonymous memory, not the whole set;
* ``--dtype bf16`` runs on the CPU (autocast) and stores float32 gradients; ``--dtype fp16``
  on a CPU is a one-line error (exit 2).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from llm_influence.attribute import AttributeArgs, attribute, read_scores, score_matrix
from llm_influence.config import TrainArgs
from llm_influence.data import Example, TaskData
from llm_influence.features import extract, store
from llm_influence.features.types import Features
from llm_influence.methods import make_method
from llm_influence.models import LoraSpec
from llm_influence.training import finetune
from test_reliability_interrupt import _sigint_default  # the child CLI must see SIGINT

METHODS = ("datainf", "lissa", "gradsim", "repsim", "exact", "ekfac", "projected")
N_TRAIN, CHUNK = 12, 2

# the same `attribute` command, with every chunk made slow (so it can be interrupted)
DRIVER = r"""
import sys, time
import llm_influence.features.extract as ex
real = ex.compute_features
def slow(*args, **kwargs):
    out = real(*args, **kwargs)
    time.sleep(float(sys.argv[1]))
    return out
ex.compute_features = slow
from llm_influence.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _task() -> TaskData:
    train = [Example(f"t{i}", f"Question {i}: which colour is thing {i}?", ["red sky", "green grass", "blue sea"][i % 3]
                     + f" number {i}", ["red", "green", "blue"][i % 3]) for i in range(N_TRAIN)]
    test = [Example(f"q{i}", f"Question {20 + i}: which colour?", ["red sky", "green grass", "blue sea"][i % 3],
                    ["red", "green", "blue"][i % 3]) for i in range(3)]
    return TaskData("colours", train, test)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "run"
    finetune(path, _task(), model_name="tiny-llama", lora=LoraSpec(r=2, alpha=8, dropout=0.0),
             args=TrainArgs(epochs=1, batch_size=4, lr=5e-3, max_length=40, seed=2))
    return path


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("features", "scores"))
    return dest


def _command(run: Path) -> list[str]:
    return ["attribute", "--run", str(run), "--methods", ",".join(METHODS), "--chunk-size", str(CHUNK),
            "--extract-batch-size", "3"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


def _chunk_files(run: Path) -> list[Path]:
    """The training chunks stored for every component (grads, kfac and reps are written in turn)."""
    folder = run / "features" / "epoch-1"
    names = [{p.name for p in folder.glob(f"chunks/train.{c}.*/*.safetensors")} for c in ("grads", "kfac", "reps")]
    return sorted(folder / "chunks" / name for name in set.intersection(*names))


def _interrupt(run: Path, sig: int) -> tuple[subprocess.Popen, list[Path], str]:
    """Start the slow command, send ``sig`` once the first training chunk is stored."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "1.5", *_command(run)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    deadline = time.time() + 120
    while not _chunk_files(run):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no chunk appeared: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc, _chunk_files(run), err


@pytest.fixture(scope="module")
def uninterrupted(base_run, tmp_path_factory) -> Path:
    run = _copy(base_run, tmp_path_factory.mktemp("whole") / "run")
    attribute(run, AttributeArgs(methods=METHODS, chunk_size=CHUNK, extract_batch_size=3))
    return run


def _assert_same_scores(a: Path, b: Path) -> None:
    for name in METHODS:
        sa, _ = read_scores(a / "scores" / "epoch-1" / f"{name}.safetensors")
        sb, _ = read_scores(b / "scores" / "epoch-1" / f"{name}.safetensors")
        assert torch.equal(sa, sb), name
    fa = extract.extract_features(a, "last", "train", need={"grads", "kfac"})
    fb = extract.extract_features(b, "last", "train", need={"grads", "kfac"})
    assert all(torch.equal(fa.grads[k], fb.grads[k]) for k in fa.grads)
    assert all(torch.equal(fa.kfac[k].input_cov, fb.kfac[k].input_cov) for k in fa.kfac)


def test_sigkill_then_rerun_resumes_and_matches_bitwise(base_run, uninterrupted, tmp_path):
    run = _copy(base_run, tmp_path / "killed")
    proc, finished, _ = _interrupt(run, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= len(finished) < N_TRAIN // CHUNK
    assert not (run / "scores").exists() and not (run / "features/epoch-1/train.grads.safetensors").exists()
    ranges = [tuple(int(x) for x in p.stem.split("-")) for p in finished]

    rerun = subprocess.run([sys.executable, "-m", "llm_influence.cli", *_command(run)], env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stderr
    assert f"train: {len(finished)} of {N_TRAIN // CHUNK} chunk(s) already finished, reusing them" in log
    computed = [(int(a), int(b) + 1) for a, b in re.findall(r"train chunk \d+/\d+ \(examples (\d+)\.\.(\d+)\) computed",
                                                           log)]
    assert sorted(computed + ranges) == [(a, a + CHUNK) for a in range(0, N_TRAIN, CHUNK)]  # each chunk once
    assert not set(computed) & set(ranges)
    assert not (run / "features/epoch-1/chunks").exists()  # removed after assembly

    _assert_same_scores(run, uninterrupted)


def test_sigint_stops_cleanly_and_the_rerun_reuses_chunks(base_run, uninterrupted, tmp_path, monkeypatch):
    run = _copy(base_run, tmp_path / "interrupted")
    proc, finished, err = _interrupt(run, signal.SIGINT)
    assert proc.returncode == 130 and "run the same command again to resume" in err
    assert finished and not list(run.glob("features/epoch-1/chunks/*/.*.tmp"))  # no temporary leftovers
    seen: list[int] = []
    real = extract.compute_features

    def spy(model, encoded, *args, **kwargs):
        seen.append(len(encoded))
        return real(model, encoded, *args, **kwargs)

    monkeypatch.setattr(extract, "compute_features", spy)
    attribute(run, AttributeArgs(methods=METHODS, chunk_size=CHUNK, extract_batch_size=3))
    # training examples computed again: all but the finished chunks (plus the 3 test examples)
    assert sum(seen) == N_TRAIN - CHUNK * len(finished) + 3
    monkeypatch.undo()
    _assert_same_scores(run, uninterrupted)


def test_damaged_chunk_is_recomputed_alone_and_chunks_equal_one_pass(base_run, tmp_path, monkeypatch):
    run = _copy(base_run, tmp_path / "run")
    folder = run / "features" / "epoch-1"
    first = extract.extract_features(run, "last", "train", need={"grads", "kfac", "reps"}, chunk_size=5,
                                     keep_chunks=True)
    kept = {b: g.clone() for b, g in first.grads.items()}
    # an interrupted state: the chunks exist, the assembled file does not, one chunk is damaged
    store.component_path(folder, "train", "grads").unlink()
    chunk = sorted(folder.glob("chunks/train.grads.*/*.safetensors"))[1]
    data = bytearray(chunk.read_bytes())
    data[-4] ^= 0x11
    chunk.write_bytes(bytes(data))
    seen: list[int] = []
    real = extract.compute_features
    monkeypatch.setattr(extract, "compute_features",
                        lambda model, enc, *a, **k: (seen.append(len(enc)), real(model, enc, *a, **k))[1])
    again = extract.extract_features(run, "last", "train", need={"grads", "kfac", "reps"}, chunk_size=5)
    assert seen == [5]  # examples 5..9 only
    assert all(torch.equal(again.grads[b], kept[b]) for b in kept)
    assert not list(folder.glob("chunks/train.grads.*"))  # removed after assembly (kfac/reps were kept)
    monkeypatch.undo()

    # one chunk for the whole split: equal up to float32 rounding (other batches), K-FAC
    # factors (assembled from per-chunk float64 sums) likewise
    whole = extract.extract_features(run, "last", "train", need={"grads", "kfac", "reps"}, chunk_size=100,
                                     force=True)
    for b in kept:
        torch.testing.assert_close(whole.grads[b], kept[b], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(whole.kfac[b].input_cov, first.kfac[b].input_cov, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(whole.kfac[b].grad_cov, first.kfac[b].grad_cov, rtol=1e-4, atol=1e-9)
        assert whole.kfac[b].n_tokens == first.kfac[b].n_tokens
    torch.testing.assert_close(whole.reps, first.reps, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- memory-mapped store

def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def _synthetic(n: int, shapes: dict[str, tuple[int, int]], seed: int, prefix: str) -> Features:
    gen = torch.Generator().manual_seed(seed)
    return Features(ids=[f"{prefix}{i}" for i in range(n)],
                    grads={b: torch.randn(n, *s, generator=gen) for b, s in shapes.items()},
                    reps=torch.randn(n, 16, generator=gen))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_memory_mapped_chunked_scores_equal_in_memory_scores(tmp_path, monkeypatch):
    shapes = {"a.lora_A": (3, 40), "a.lora_B": (40, 3), "b.lora_A": (3, 24)}
    train, test = _synthetic(50, shapes, 0, "t"), _synthetic(7, shapes, 1, "q")
    store.save_features(tmp_path, "train", train, keys={"grads": "k", "reps": "r"})
    monkeypatch.setattr(store, "MMAP_MIN_BYTES", 0)
    mapped, missing = store.load_features(tmp_path, "train", {"grads": "k", "reps": "r"})
    assert not missing and _mapped(store.component_path(tmp_path, "train", "grads"))
    for name in ("gradsim", "gradsim-cos", "repsim", "datainf", "lissa", "exact", "exact-full", "projected"):
        in_memory = make_method(name).fit(train).score(test)
        chunked = score_matrix(make_method(name), mapped, test, chunk_size=8)
        torch.testing.assert_close(chunked, in_memory, rtol=1e-10, atol=1e-12, msg=name)
        # the same chunked computation on in-memory tensors: bitwise the same
        assert torch.equal(score_matrix(make_method(name), train, test, chunk_size=8), chunked), name


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


class PeakAnon:
    """Peak anonymous resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_chunked_scoring_of_a_mapped_training_set_does_not_materialise_it(tmp_path, monkeypatch):
    """96 MB of float32 training gradients (4 blocks of 24 MB): chunked gradsim holds one
    chunk, datainf one block in float64 (48 MB), never all four blocks (192 MB in float64)."""
    shapes = {f"l{i}.lora_A": (4, 1500) for i in range(4)}
    n = 1000
    block_f64 = n * 6000 * 8
    gen = torch.Generator().manual_seed(0)
    train = Features(ids=[f"t{i}" for i in range(n)], grads={b: torch.randn(n, *s, generator=gen) for b, s in shapes.items()})
    test = Features(ids=["q0", "q1"], grads={b: g[:2].clone() for b, g in train.grads.items()})
    store.save_features(tmp_path, "train", train, keys={"grads": "k"})
    del train
    monkeypatch.setattr(store, "MMAP_MIN_BYTES", 0)
    mapped, _ = store.load_features(tmp_path, "train", {"grads": "k"})
    with PeakAnon() as peak:
        gradsim = score_matrix(make_method("gradsim"), mapped, test, chunk_size=50)
    # A 50-example chunk of all 4 blocks in float32 and float64 is 50 * 6000 * 4 * 12 B = 14.4 MB
    # (measured 9-13 MB); materialising the set would take >= 96 MB.
    chunk_bytes = 50 * 6000 * 4 * (4 + 8)
    assert peak.growth < 2 * chunk_bytes, peak.growth
    with PeakAnon() as peak:
        datainf = score_matrix(make_method("datainf"), mapped, test, chunk_size=50)
    assert peak.growth < 2.5 * block_f64, peak.growth  # about one float64 block at a time
    assert gradsim.shape == datainf.shape == (2, n)
    assert int(gradsim[0].argmax()) == 0 and int(gradsim[1].argmax()) == 1


# ----------------------------------------------------------------------------- compute dtypes

def test_bf16_autocast_on_cpu_stores_float32_gradients_and_fp16_needs_a_gpu(base_run, tmp_path, monkeypatch, capsys):
    from llm_influence.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = _copy(base_run, tmp_path / "run")
    f32 = extract.extract_features(run, "last", "train", need={"grads", "reps"})
    ref = {b: g.clone() for b, g in f32.grads.items()}
    bf16 = extract.extract_features(run, "last", "train", need={"grads", "reps"}, dtype=torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in bf16.grads.values()) and bf16.reps.dtype == torch.float32
    flat = torch.cat([bf16.grads[b].flatten() for b in ref])
    flat_ref = torch.cat([ref[b].flatten() for b in ref])
    rel = float((flat - flat_ref).norm() / flat_ref.norm())
    assert 0 < rel < 0.1, rel  # bfloat16 rounding (8 bits of mantissa), but the same gradients
    capsys.readouterr()
    assert main(["attribute", "--run", str(run), "--methods", "gradsim", "--extract-dtype", "fp16", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--extract-dtype fp16 needs a CUDA GPU" in err
