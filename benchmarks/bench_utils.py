"""Helpers shared by the benchmark scripts: machine facts, load averages, repeated timing,
peak memory of a fresh subprocess, and the JSON result file.

Not part of the package: the scripts in ``benchmarks/`` import it as a sibling module
(``python benchmarks/NAME.py`` puts this folder first on ``sys.path``).

Units: seconds (wall clock, ``time.perf_counter``), bytes for memory (``*_bytes``), and the
1/5/15-minute load averages of ``/proc/loadavg`` (runnable processes; on this 2-core
machine a load above ~2 means the benchmark shared its cores).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def loadavg() -> list[float]:
    """``[1 min, 5 min, 15 min]`` load averages (empty where /proc is missing)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def meminfo() -> dict[str, int]:
    """``MemTotal`` / ``MemAvailable`` in bytes (from /proc/meminfo; empty where missing)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict[str, Any]:
    """What the timings depend on: CPU, cores, memory, versions, thread settings."""
    import torch

    flags = _cpu_flags()
    mem = meminfo()
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("transformers", "peft"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512f": "avx512f" in flags,
        "mem_total_bytes": mem.get("MemTotal"),
        "mem_available_bytes_at_start": mem.get("MemAvailable"),
        "gpu": bool(torch.cuda.is_available()),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "nice": os.nice(0),
        "platform": platform.platform(),
        "versions": versions,
    }


def timed_repeats(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Returns ``{"seconds": [...], "median_seconds", "min_seconds", "loadavg": [[before,
    after] per repeat], "last": fn's last return value}`` (``last`` is for the caller and
    should be popped before writing JSON).
    """
    out: Any = None
    for _ in range(warmup):
        out = fn()
    seconds, loads = [], []
    for _ in range(repeats):
        before = loadavg()
        t = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t)
        loads.append([before, loadavg()])
    return {"seconds": seconds, "median_seconds": statistics.median(seconds), "min_seconds": min(seconds),
            "loadavg": loads, "last": out}


def current_rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``), in bytes."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(argv: Sequence[str], timeout: Optional[float] = None) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh interpreter; it must print one JSON object as the
    last line of its stdout. Returns that object plus ``wall_seconds`` and ``returncode``;
    on failure ``{"error": ...}`` with the tail of stderr."""
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                              cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "wall_seconds": time.perf_counter() - t}
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}", "wall_seconds": wall,
                "returncode": proc.returncode}
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"no JSON on the last stdout line: {lines[-1][:200]}", "wall_seconds": wall}
    result.update(wall_seconds=wall, returncode=proc.returncode)
    return result


def write_results(path: str | Path, name: str, command: str, data: dict[str, Any]) -> Path:
    """Write ``{"benchmark", "command", "machine", "loadavg_end", "finished", **data}``
    atomically to ``path`` and return it."""
    from llm_influence.io_utils import write_json

    path = Path(path)
    write_json(path, {"benchmark": name, "command": command, "machine": machine(),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg_end": loadavg(), **data})
    return path


def command_line() -> str:
    """The command that ran this script, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + shlex.join(["python", script_text, *sys.argv[1:]])


def gib(n_bytes: Optional[float]) -> Optional[float]:
    return None if n_bytes is None else n_bytes / 2**30
