"""Peak memory (maximum resident set size) and wall time of ``llm-influence reproduce``.

    # the whole cpu profile, as in the README's Results (~40 min on 2 cores):
    OMP_NUM_THREADS=2 python benchmarks/cpu_profile_memory.py --out benchmarks/results/cpu_profile_memory.json
    # checks that the script works (smoke profile, tiny-llama; ~3 minutes on the shared 2 cores):
    python benchmarks/cpu_profile_memory.py --quick --out /tmp/cpu_profile_memory.json
    # one task of the cpu profile, no studies (a lower bound of the whole profile's peak):
    python benchmarks/cpu_profile_memory.py --tasks mixed-small --studies '' --out /tmp/mixed_small_memory.json

Runs ``/usr/bin/time -v llm-influence reproduce --profile cpu --methods
datainf,lissa,gradsim,repsim,exact --out RUN`` (``RUN``: a temporary folder, deleted
afterwards unless ``--run-dir`` is given) and parses GNU time's "Maximum resident set size"
(kilobytes; the peak of the process, which does all the work in one process) and "Elapsed
(wall clock) time". The load average before and after is recorded. The issue's target is
a peak of at most 6 GB (10^9 bytes) for the whole ``cpu`` profile.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

METHODS = "datainf,lissa,gradsim,repsim,exact"
TARGET_BYTES = 6e9


def parse_time_v(text: str) -> dict:
    """``{"max_rss_bytes", "wall_seconds", "user_seconds", "system_seconds", "exit_status"}``
    from GNU ``time -v`` output."""
    out: dict = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["max_rss_bytes"] = int(m.group(1)) * 1024
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        seconds = 0.0
        for part in m.group(1).split(":"):
            seconds = seconds * 60 + float(part)
        out["wall_seconds"] = seconds
    for key, label in (("user_seconds", "User time (seconds)"), ("system_seconds", "System time (seconds)")):
        m = re.search(re.escape(label) + r": ([\d.]+)", text)
        if m:
            out[key] = float(m.group(1))
    m = re.search(r"Exit status: (\d+)", text)
    if m:
        out["exit_status"] = int(m.group(1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(bu.RESULTS / "cpu_profile_memory.json"))
    ap.add_argument("--quick", action="store_true", help="the smoke profile (tiny-llama) instead of cpu")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--tasks", default=None, help="comma-separated (default: all of the profile's)")
    ap.add_argument("--studies", default=None, help="passed to reproduce (default: all; '' for none)")
    ap.add_argument("--run-dir", default=None, help="keep the reproduce output here (default: a temporary folder)")
    args = ap.parse_args()
    profile = "smoke" if args.quick else args.profile
    time_bin = shutil.which("time", path="/usr/bin:/bin")
    if time_bin is None:
        sys.exit("GNU time (/usr/bin/time) is needed: apt-get install time")
    cli = Path(sys.executable).with_name("llm-influence")
    tmp = None if args.run_dir else tempfile.mkdtemp(prefix="cpu-profile-memory-")
    run_dir = Path(args.run_dir or tmp)
    cmd = [str(cli) if cli.exists() else "llm-influence", "reproduce", "--profile", profile, "--methods",
           args.methods, "--out", str(run_dir / "out"), "--quiet"]
    if args.tasks is not None:
        cmd += ["--tasks", args.tasks]
    if args.studies is not None:
        cmd += ["--studies", args.studies]
    load_before = bu.loadavg()
    try:
        proc = subprocess.run([time_bin, "-v", *cmd], capture_output=True, text=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    load_after = bu.loadavg()
    measured = parse_time_v(proc.stderr)
    if proc.returncode != 0 or "max_rss_bytes" not in measured:
        sys.exit(f"reproduce failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = measured["max_rss_bytes"]
    bu.write_results(args.out, "cpu_profile_memory", bu.command_line(), {
        "reproduce_command": " ".join(cmd),
        "profile": profile, "tasks": args.tasks, "studies": args.studies,
        "loadavg_before": load_before, "loadavg_after": load_after,
        **measured,
        "target": {"limit_bytes": TARGET_BYTES, "met": peak <= TARGET_BYTES,
                   "applies": profile == "cpu" and args.tasks is None and args.studies is None},
    })
    print(f"peak RSS {peak / 1e9:.2f} GB, wall {measured.get('wall_seconds', float('nan')):.0f} s; wrote {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
