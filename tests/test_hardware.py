"""Native-bf16 detection and the effective training autocast (``llm_influence.hardware``).

The CPU is faked: the cpuinfo reader, torch's CPU capability and torch's oneDNN answer are
monkeypatched, so these tests mean the same on every machine. Speed lives in
``benchmarks/cpu_classes.py``, never here.
"""

from __future__ import annotations

import json

import pytest

from llm_influence import hardware
from llm_influence.config import TrainArgs, get_profile

NATIVE = {"fpu", "avx2", "avx512f", "avx512_bf16"}
AVX2_ONLY = {"fpu", "avx2", "fma"}


@pytest.fixture
def fake_cpu(monkeypatch):
    """``set(flags, capability="AVX512", onednn=True, linux=True)`` fakes the CPU; the
    once-per-process warning memory starts empty."""
    monkeypatch.setattr(hardware, "_warned", set())

    def set_cpu(flags, capability="AVX512", onednn=True, linux=True):
        monkeypatch.setattr(hardware, "cpuinfo_flags", lambda: set(flags))
        monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
        monkeypatch.setattr(hardware, "onednn_bf16", lambda: onednn)
        monkeypatch.setattr(hardware, "_is_linux", lambda: linux)

    return set_cpu


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("llm-influence: warning:")]


def test_native_flags_keep_bf16_without_a_warning(fake_cpu, capsys):
    fake_cpu(NATIVE)
    assert hardware.cpu_has_native_bf16()
    assert hardware.resolve_autocast("bf16", "cpu") == "bf16"
    fake_cpu({"avx2", "amx_bf16"})  # AMX-BF16 counts as native too
    assert hardware.resolve_autocast("bf16", "cpu") == "bf16"
    assert _warnings(capsys) == []


def test_no_native_flags_train_in_float32_with_exactly_one_warning(fake_cpu, capsys):
    fake_cpu(AVX2_ONLY, capability="AVX2")
    assert not hardware.cpu_has_native_bf16()
    assert hardware.resolve_autocast("bf16", "cpu") == "none"
    assert hardware.resolve_autocast("bf16", "cpu") == "none"
    warnings = _warnings(capsys)
    assert len(warnings) == 1, warnings
    assert "--train-dtype bf16" in warnings[0] and "avx512_bf16" in warnings[0] and "float32" in warnings[0]


def test_requested_none_is_none_without_a_warning(fake_cpu, capsys):
    for flags in (NATIVE, AVX2_ONLY):
        fake_cpu(flags)
        assert hardware.resolve_autocast("none", "cpu") == "none"
    assert _warnings(capsys) == []


def test_capability_below_avx512_means_emulated_even_with_the_flags(fake_cpu, capsys):
    # ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 CPU: torch's AVX2 kernels emulate bf16
    fake_cpu(NATIVE, capability="AVX2")
    assert not hardware.cpu_has_native_bf16()
    assert hardware.resolve_autocast("bf16", "cpu") == "none"
    assert "AVX2 kernels" in _warnings(capsys)[0]
    # DNNL_MAX_CPU_ISA=AVX2: oneDNN says no
    fake_cpu(NATIVE, onednn=False)
    assert not hardware.cpu_has_native_bf16()
    # no oneDNN in this torch: the flags and the capability decide on Linux
    fake_cpu(NATIVE, onednn=None)
    assert hardware.cpu_has_native_bf16()


def test_outside_linux_only_torch_decides(fake_cpu):
    fake_cpu(set(), capability="AVX512", onednn=True, linux=False)
    assert hardware.cpu_has_native_bf16()
    fake_cpu(set(), capability="AVX512", onednn=None, linux=False)
    assert not hardware.cpu_has_native_bf16()
    fake_cpu(set(), capability="DEFAULT", onednn=True, linux=False)
    assert not hardware.cpu_has_native_bf16()


def test_cpuinfo_reader(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(hardware, "CPUINFO", info)
    assert hardware.cpuinfo_flags() == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")
    assert hardware.cpuinfo_flags() == set()


def test_cuda_and_other_devices(fake_cpu, monkeypatch, capsys):
    import torch

    fake_cpu(NATIVE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.resolve_autocast("bf16", "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hardware.resolve_autocast("bf16", torch.device("cuda")) == "none"
    assert "no bfloat16 support" in _warnings(capsys)[0]
    with pytest.raises(Exception, match="autocast"):
        hardware.resolve_autocast("fp16", "cpu")


def test_emulated_bf16_extraction_warns_once_and_native_not_at_all(fake_cpu, capsys):
    fake_cpu(NATIVE)
    hardware.warn_if_emulated_bf16("cpu", "--dtype bf16")
    assert _warnings(capsys) == []
    fake_cpu(AVX2_ONLY, capability="AVX2")
    hardware.warn_if_emulated_bf16("cpu", "--dtype bf16")
    hardware.warn_if_emulated_bf16(None, "--dtype bf16")
    hardware.warn_if_emulated_bf16("cuda", "--dtype bf16")  # a GPU is not the CPU
    warnings = _warnings(capsys)
    assert len(warnings) == 1 and "emulated" in warnings[0] and "--dtype bf16" in warnings[0]


def test_cpu_profile_trains_in_float32():
    profile = get_profile("cpu")
    assert profile.train.autocast == "none"
    for task in profile.tasks:
        assert profile.train_args(task).autocast == "none", task
    assert TrainArgs().autocast == "none"


def test_finetune_records_the_effective_autocast(fake_cpu, tmp_path, capsys):
    """A requested bf16 on a CPU without native bf16 trains in float32 (bitwise the same
    adapter as autocast="none"), warns once, and the log's epoch rows say "none"."""
    from safetensors.torch import load_file

    from llm_influence.data import Example, TaskData
    from llm_influence.models import LoraSpec
    from llm_influence.training import finetune

    fake_cpu(AVX2_ONLY, capability="AVX2")
    train = [Example(f"t{i}", f"Say colour {i % 2}.", ["red", "blue"][i % 2] + " it is.", str(i % 2)) for i in range(4)]
    task = TaskData("colours", train, train[:2])  # no validation: this test is about autocast
    lora = LoraSpec(r=4, alpha=32, dropout=0.0)
    runs = {}
    for autocast in ("bf16", "none"):
        args = TrainArgs(epochs=1, batch_size=2, lr=1e-3, max_length=32, eval_batch_size=4, validation="none",
                         autocast=autocast)
        finetune(tmp_path / autocast, task, model_name="tiny-llama", lora=lora, args=args)
        rows = [json.loads(line) for line in (tmp_path / autocast / "train_log.jsonl").read_text().splitlines()]
        assert [r.get("effective_autocast") for r in rows if r["kind"] == "epoch" and r["epoch"] >= 1] == ["none"]
        runs[autocast] = load_file(str(tmp_path / autocast / "checkpoints" / "epoch-1" / "adapter_model.safetensors"))
    assert all((runs["bf16"][k] == runs["none"][k]).all() for k in runs["none"])
    warnings = _warnings(capsys)
    assert len(warnings) == 1 and "--train-dtype bf16" in warnings[0]
