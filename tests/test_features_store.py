"""The feature store: exact round trips, reuse on a matching key, recomputation on a changed
argument, a changed adapter, or a damaged file."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from llm_influence.config import TrainArgs
from llm_influence.data.example import Example, TaskData
from llm_influence.errors import UserError
from llm_influence.features import Features, KFACFactors, extract
from llm_influence.features import store
from llm_influence.features.gradients import compute_features
from llm_influence.models import LoraSpec, lora_parameters
from llm_influence.rundir import RunDir
from llm_influence.training.load import load_finetuned

from test_features_support import lora_model, make_examples

SPEC = LoraSpec(r=2, alpha=8, dropout=0.0, layers=(1,))


def _make_run(path, tiny) -> RunDir:
    """A run directory as fine-tuning leaves it: config, data, one adapter checkpoint."""
    model, _ = lora_model(tiny, SPEC)
    run = RunDir(path)
    test = [Example(f"t{i}", e.prompt, e.response, e.group) for i, e in enumerate(make_examples(3, seed=5))]
    task = TaskData("unit", train=make_examples(4), test=test)
    run.save_task(task)
    run.update_config("task", {"name": "unit"})
    run.update_config("finetune", {"model": "tiny-llama", "lora": SPEC.to_dict(),
                                   "train": asdict(TrainArgs(epochs=1, max_length=48))})
    model.save_pretrained(str(run.checkpoint(1)), safe_serialization=True)
    return run


@pytest.fixture
def run(tmp_path, tiny):
    return _make_run(tmp_path / "run", tiny)


@pytest.fixture
def calls(monkeypatch):
    """Record the keyword arguments of every extraction pass."""
    seen: list[dict] = []
    real = extract.compute_features

    def spy(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("grads", "kfac", "reps")})
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "compute_features", spy)
    return seen


def _assert_same(a: Features, b: Features) -> None:
    assert a.ids == b.ids and a.blocks == b.blocks
    for k in a.grads:
        assert torch.equal(a.grads[k], b.grads[k]), k
    assert (a.reps is None) == (b.reps is None)
    if a.reps is not None:
        assert torch.equal(a.reps, b.reps)
    assert (a.kfac is None) == (b.kfac is None)
    for k in a.kfac or {}:
        assert torch.equal(a.kfac[k].input_cov, b.kfac[k].input_cov)
        assert torch.equal(a.kfac[k].grad_cov, b.kfac[k].grad_cov)
        assert a.kfac[k].n_tokens == b.kfac[k].n_tokens


def test_save_load_roundtrip_is_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    blocks = ["z.lora_A", "a.lora_B", "m.lora_A"]  # order is not alphabetical: it must survive
    feats = Features(
        ids=["b", "a", "ü-3"],
        grads={b: torch.randn(3, 2, 5, generator=gen, dtype=torch.float64) for b in blocks},
        reps=torch.randn(3, 7, generator=gen),
        kfac={b: KFACFactors(torch.randn(5, 5, generator=gen), torch.randn(2, 2, generator=gen), n_tokens=11)
              for b in blocks})
    keys = {"grads": "k1", "reps": "k2", "kfac": "k3"}
    store.save_features(tmp_path, "train", feats, keys=keys, seconds={"grads": 1.5}, arguments={"x": 1})
    loaded, missing = store.load_features(tmp_path, "train", keys)
    assert missing == set()
    _assert_same(feats, loaded)
    assert list(loaded.grads) == blocks
    assert loaded.grads[blocks[0]].dtype == torch.float64
    summary = json.loads(store.summary_path(tmp_path, "train").read_text())
    assert summary["components"]["grads"]["seconds"] == 1.5 and summary["arguments"] == {"x": 1}
    # another key reads as missing; the other split is separate
    _, missing = store.load_features(tmp_path, "train", {"grads": "other", "reps": "k2"})
    assert missing == {"grads"}
    assert store.load_features(tmp_path, "test", keys) == (None, {"grads", "reps", "kfac"})


def test_damaged_files_read_as_missing(tmp_path):
    feats = Features(ids=["a", "b"], grads={"x.lora_A": torch.arange(20.0).reshape(2, 2, 5)})
    store.save_features(tmp_path, "test", feats, keys={"grads": "k"})
    path = store.component_path(tmp_path, "test", "grads")
    good = path.read_bytes()
    assert store.load_component(tmp_path, "test", "grads", key="k") is not None
    damaged = bytearray(good)
    damaged[-3] ^= 0xFF  # a flipped bit in the tensor data: only the checksum can tell
    path.write_bytes(bytes(damaged))
    assert store.load_component(tmp_path, "test", "grads", key="k", quiet=True) is None
    path.write_bytes(good[: len(good) - 16])  # truncated
    assert store.load_component(tmp_path, "test", "grads", key="k", quiet=True) is None
    path.write_bytes(b"\x00" * 5)  # garbage
    assert store.load_component(tmp_path, "test", "grads", key="k", quiet=True) is None
    path.write_bytes(good)
    assert store.load_component(tmp_path, "test", "grads", key="k") is not None


def test_extract_computes_once_then_reuses(run, calls, tiny):
    feats = extract.extract_features(run, "last", "train", need={"grads", "reps", "kfac"}, batch_size=3)
    assert calls == [{"grads": True, "kfac": True, "reps": True}]
    assert feats.ids == [e.id for e in make_examples(4)]
    assert list(feats.grads) == list(lora_parameters(lora_model(tiny, SPEC)[0]))
    assert feats.reps.shape == (4, 64) and set(feats.kfac) == set(feats.grads)

    # the values are those of the fine-tuned model (eval mode, the run's max_length)
    model, fmt, name = load_finetuned(run, "last")
    assert name == "epoch-1"
    direct = compute_features(model, [fmt.encode(e) for e in make_examples(4)], fmt.tokenizer.pad_token_id,
                              grads=True, kfac=True, reps=True, batch_size=4, description=None)
    for b in feats.grads:  # atol 1e-6: extraction runs on CUDA when a GPU is present, `direct` on the CPU
        torch.testing.assert_close(feats.grads[b], direct.grads[b], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(feats.kfac[b].input_cov, direct.kfac[b].input_cov, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats.reps, direct.reps, rtol=1e-5, atol=1e-6)

    again = extract.extract_features(run, "epoch-1", "train", need={"grads", "reps", "kfac"})
    assert len(calls) == 1
    _assert_same(feats, again)
    only_reps = extract.extract_features(run, "last", "train", need={"reps"})
    assert len(calls) == 1 and only_reps.grads == {} and only_reps.kfac is None
    assert torch.equal(only_reps.reps, feats.reps)

    summary = json.loads(store.summary_path(run.features_dir("epoch-1"), "train").read_text())
    assert summary["arguments"]["model"] == "tiny-llama" and summary["arguments"]["max_length"] == 48
    assert summary["components"]["grads"]["seconds"] > 0

    # the test split has its own files and its own pass
    test = extract.extract_features(run, "last", "test", need={"grads"})
    assert calls[-1] == {"grads": True, "kfac": False, "reps": False}
    assert test.ids == ["t0", "t1", "t2"]
    assert store.component_path(run.features_dir("epoch-1"), "test", "grads").is_file()
    assert not store.component_path(run.features_dir("epoch-1"), "test", "reps").exists()


def test_changed_arguments_recompute_only_what_they_affect(run, calls):
    base = extract.extract_features(run, "last", "train", need={"grads", "reps"})
    assert calls == [{"grads": True, "kfac": False, "reps": True}]
    layer0 = extract.extract_features(run, "last", "train", need={"grads", "reps"}, rep_layer=0)
    assert calls[-1] == {"grads": False, "kfac": False, "reps": True}
    assert not torch.equal(layer0.reps, base.reps)
    assert all(torch.equal(layer0.grads[b], base.grads[b]) for b in base.grads)
    extract.extract_features(run, "last", "train", need={"reps"}, rep_pooling="mean")
    assert calls[-1] == {"grads": False, "kfac": False, "reps": True}
    with_kfac = extract.extract_features(run, "last", "train", need={"grads", "kfac"})
    assert calls[-1] == {"grads": False, "kfac": True, "reps": False}
    assert with_kfac.kfac is not None
    f64 = extract.extract_features(run, "last", "train", need={"grads"}, dtype=torch.float64)
    assert calls[-1] == {"grads": True, "kfac": False, "reps": False}
    assert all(g.dtype == torch.float64 for g in f64.grads.values())
    n = len(calls)
    extract.extract_features(run, "last", "train", need={"grads"}, force=True)
    assert len(calls) == n + 1
    # the original arguments are still cached (each component file holds the latest key)
    extract.extract_features(run, "last", "train", need={"grads"})
    assert len(calls) == n + 1


def test_changed_adapter_and_damaged_file_recompute(run, calls):
    first = extract.extract_features(run, "last", "train", need={"grads"})
    assert len(calls) == 1
    folder = run.features_dir("epoch-1")
    path = store.component_path(folder, "train", "grads")

    data = bytearray(path.read_bytes())
    data[-5] ^= 0x55
    path.write_bytes(bytes(data))
    again = extract.extract_features(run, "last", "train", need={"grads"})
    assert len(calls) == 2
    _assert_same(first, again)  # recomputed, the same values, and the file is whole again
    assert store.load_component(folder, "train", "grads") is not None

    path.write_bytes(path.read_bytes()[:100])
    extract.extract_features(run, "last", "train", need={"grads"})
    assert len(calls) == 3

    # a new adapter file (same path, other weights)
    from safetensors.torch import load_file, save_file

    adapter = run.checkpoint(1) / "adapter_model.safetensors"
    weights = load_file(str(adapter))
    save_file({k: v * 1.5 if "lora_B" in k else v for k, v in weights.items()}, str(adapter))
    changed = extract.extract_features(run, "last", "train", need={"grads"})
    assert len(calls) == 4
    assert not torch.equal(changed.grads[first.blocks[0]], first.grads[first.blocks[0]])


def test_hvp_and_bad_arguments(run, calls):
    feats = extract.extract_features(run, "last", "train", need={"grads", "hvp"})
    v = {b: torch.ones_like(g[0]) for b, g in feats.grads.items()}
    hv = feats.hvp(v)
    assert {b: t.shape for b, t in hv.items()} == {b: t.shape for b, t in v.items()}
    hv2 = extract.build_hvp(run, "last", batch_size=3)(v)
    for b in hv:
        torch.testing.assert_close(hv[b], hv2[b], rtol=1e-4, atol=1e-7)
    with pytest.raises(UserError, match="split"):
        extract.extract_features(run, "last", "validation")
    with pytest.raises(UserError, match="unknown feature"):
        extract.extract_features(run, "last", "train", need={"gradz"})
    with pytest.raises(UserError, match="dtype"):
        extract.extract_features(run, "last", "train", need={"grads"}, dtype=torch.int8)
    with pytest.raises(UserError, match="epoch-7"):
        extract.extract_features(run, "epoch-7", "train")
