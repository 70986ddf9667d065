"""What the processor runs natively, and the autocast a training run actually uses.

bfloat16 autocast is only a speed-up where the hardware has bfloat16 instructions. A CPU
without them (for example AVX2-only, or AVX-512 without AVX512-BF16) emulates every
bfloat16 matrix product: one SmolLM2-135M training step of 8 x 96 tokens took 263 s under
bf16 autocast against 9.0 s in float32 on a 2-core AVX2 EPYC (``benchmarks/README.md``,
"CPU classes"). So bf16 is used only where it is native, and float32 is the default
everywhere: the numbers of a run do not depend on the CPU class beyond float32 rounding.

The rules (exactly what the functions do):

* :func:`cpu_has_native_bf16` is True only when all of these hold:

  - on Linux, the ``flags`` of ``/proc/cpuinfo`` include ``avx512_bf16`` or ``amx_bf16``
    (elsewhere no flags are read: the two torch conditions below decide);
  - ``torch.backends.cpu.get_cpu_capability()`` is not below AVX512 (not ``DEFAULT``,
    ``NO AVX``, ``AVX`` or ``AVX2``; e.g. ``ATEN_CPU_CAPABILITY=avx2`` makes torch use
    its AVX2 kernels, which emulate bfloat16);
  - torch's oneDNN reports bfloat16 support (``torch.ops.mkldnn._is_mkldnn_bf16_supported``;
    ``DNNL_MAX_CPU_ISA=AVX2`` turns it off). Where torch has no oneDNN, or the check is
    missing, this condition is skipped on Linux and fails elsewhere.

* :func:`resolve_autocast` returns ``"bf16"`` only when ``"bf16"`` is requested and the
  device is a CUDA GPU with bfloat16 support (``torch.cuda.is_bf16_supported()``) or the
  CPU with :func:`cpu_has_native_bf16`; otherwise ``"none"`` (float32). When a requested
  bf16 is turned into ``"none"`` it prints one warning per process (not per call) saying
  why. ``"none"`` requested is ``"none"``, with no warning.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import UserError, warn

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# x86 capabilities of torch.backends.cpu.get_cpu_capability() below AVX512
BELOW_AVX512 = ("DEFAULT", "NO AVX", "AVX", "AVX2")
CPUINFO = Path("/proc/cpuinfo")

_warned: set[str] = set()


def cpuinfo_flags() -> set[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo`` (empty where it is
    missing or unreadable)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and key.strip() == "flags":
            return set(rest.split())
    return set()


def cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()`` (``""`` where torch cannot say)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an older or unusual torch build
        return ""


def onednn_bf16() -> Optional[bool]:
    """torch's oneDNN answer to "can this CPU run bfloat16" (None where torch has no
    oneDNN or no such check)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return None


def _is_linux() -> bool:
    return sys.platform.startswith("linux")


def _why_not_native_bf16() -> Optional[str]:
    """None when the CPU runs bfloat16 natively, else the reason it does not."""
    if _is_linux():
        flags = cpuinfo_flags()
        if not flags.intersection(NATIVE_BF16_FLAGS):
            return f"the CPU has no native bfloat16 instructions (no {' or '.join(NATIVE_BF16_FLAGS)} in /proc/cpuinfo)"
    cap = cpu_capability()
    if cap.upper() in BELOW_AVX512:
        return f"torch runs its {cap} kernels on this CPU, which emulate bfloat16"
    onednn = onednn_bf16()
    if onednn is False or (onednn is None and not _is_linux()):
        return "torch's oneDNN reports no bfloat16 support on this CPU"
    return None


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bfloat16 matrix products natively (the rule is in the
    module docstring: cpuinfo flags on Linux, torch's CPU capability, torch's oneDNN)."""
    return _why_not_native_bf16() is None


def warn_once(key: str, message: str) -> None:
    """:func:`llm_influence.errors.warn` ``message`` the first time ``key`` is seen in this
    process; later calls with the same key print nothing."""
    if key in _warned:
        return
    _warned.add(key)
    warn(message)


def resolve_autocast(requested: str, device: Union[str, torch.device, None] = None) -> str:
    """The autocast a training step on ``device`` (default: the CPU) really uses:
    ``"bf16"`` only when ``requested == "bf16"`` and the device is a CUDA GPU with
    bfloat16 support or the CPU with :func:`cpu_has_native_bf16`; ``"none"`` (float32)
    otherwise. Turning a requested ``"bf16"`` into ``"none"`` warns once per process,
    naming why. Any other ``requested`` than ``"none"``/``"bf16"`` is a :class:`UserError`."""
    if requested not in ("none", "bf16"):
        raise UserError(f"autocast must be 'none' or 'bf16', got {requested!r}")
    if requested == "none":
        return "none"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA GPU is available"
        elif torch.cuda.is_bf16_supported():
            return "bf16"
        else:
            why = "this GPU has no bfloat16 support"
    elif dev.type == "cpu":
        why = _why_not_native_bf16()
        if why is None:
            return "bf16"
        why += " (emulated bfloat16 is many times slower than float32)"
    else:
        why = f"bfloat16 autocast is only used on CUDA GPUs and CPUs, not on {dev.type!r}"
    warn_once("autocast", f"--train-dtype bf16: {why}; training in float32 instead")
    return "none"


def warn_if_emulated_bf16(device: Union[str, torch.device, None], what: str) -> None:
    """Warn once per process that ``what`` (e.g. ``"--extract-dtype bf16"``) runs bfloat16 emulated,
    and so slowly, when ``device`` is the CPU without :func:`cpu_has_native_bf16`. It still
    runs in bfloat16: the user asked for it."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu":
        return
    why = _why_not_native_bf16()
    if why is not None:
        warn_once(f"emulated-bf16:{what}", f"{what}: {why}; it runs emulated and is many times slower "
                                          "than float32 here (kept because it was asked for)")
