"""Throughput of counterfactual retrains on this machine: one process with T threads against
P processes with T/P threads each (what ``torchrun --nproc_per_node=P`` gives the
counterfactual study, whose masks :func:`~llm_influence.training.retrain.retrain_masks`
splits over the ranks).

    python benchmarks/retrain_ranks.py runs/cpu/runs/mixed-small --masks 4 \\
        --out benchmarks/results/retrain_ranks.json

The same ``--masks`` half-subset masks (the study's own ``random_masks``, alpha 0.5, seed 0)
are retrained (1) in one process with ``--threads`` torch threads, one after the other, and
(2) split over ``--procs`` processes started together, each with ``threads // procs``
threads. Reported: the wall seconds of each configuration (model load excluded: each
worker times its retrains only, and (2) takes the slowest worker), retrains per minute,
the speed-up (1)/(2), and the largest difference between the two configurations' test
losses (float32 training; a different thread count changes the summation order, so equal
up to rounding, not bitwise). Workers are this script run with ``--worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_utils import loadavg, write_results


def worker(run: str, masks: list[int], n_masks: int, threads: int) -> None:
    import numpy as np
    import torch

    from llm_influence.evaluation.counterfactual import random_masks
    from llm_influence.training.retrain import LoraRetrainer

    torch.set_num_threads(threads)
    retrainer = LoraRetrainer(run)
    all_masks = random_masks(retrainer.n_train, n_masks, 0.5, 0)
    t0 = time.perf_counter()
    losses = {m: retrainer.retrain(all_masks[m]).tolist() for m in masks}
    print(json.dumps({"seconds": time.perf_counter() - t0, "losses": losses, "threads": threads,
                      "n_train": retrainer.n_train, "epochs": retrainer.epochs,
                      "subset": int(np.asarray(all_masks[0]).sum())}))


def _start(run: str, masks: list[int], n_masks: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, run, "--worker", ",".join(map(str, masks)), "--masks", str(n_masks),
           "--threads", str(threads)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def _finish(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed with exit status {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a fine-tuned run directory (e.g. runs/cpu/runs/mixed-small)")
    ap.add_argument("--masks", type=int, default=4, help="half-subset masks to retrain (a multiple of --procs)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the one-process configuration")
    ap.add_argument("--procs", type=int, default=2, help="processes of the split configuration")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="JSON result file")
    ns = ap.parse_args()
    if ns.worker is not None:
        worker(ns.run, [int(x) for x in ns.worker.split(",")], ns.masks, ns.threads)
        return
    if ns.masks % ns.procs or ns.threads % ns.procs:
        raise SystemExit("--masks and --threads must be multiples of --procs")
    ids = list(range(ns.masks))
    load_before = loadavg()
    one = _finish([_start(ns.run, ids, ns.masks, ns.threads)])[0]
    share = ns.masks // ns.procs
    split = _finish([_start(ns.run, ids[i * share:(i + 1) * share], ns.masks, ns.threads // ns.procs)
                     for i in range(ns.procs)])
    split_s = max(w["seconds"] for w in split)
    split_losses = {m: v for w in split for m, v in w["losses"].items()}
    diff = max(abs(a - b) for m in one["losses"] for a, b in zip(one["losses"][m], split_losses[m]))
    result = {
        "run": ns.run, "masks": ns.masks, "n_train": one["n_train"], "subset": one["subset"],
        "epochs": one["epochs"],
        "one_process": {"threads": ns.threads, "seconds": one["seconds"],
                        "seconds_per_retrain": one["seconds"] / ns.masks},
        "split": {"procs": ns.procs, "threads_each": ns.threads // ns.procs, "seconds": split_s,
                  "worker_seconds": [w["seconds"] for w in split], "seconds_per_retrain": split_s / ns.masks},
        "speedup": one["seconds"] / split_s,
        "max_abs_loss_difference": diff,
        "loadavg_before": load_before, "loadavg_after": loadavg(),
    }
    print(json.dumps(result, indent=2))
    if ns.out:
        write_results(Path(ns.out), "retrain_ranks", "python " + " ".join(sys.argv), result)


if __name__ == "__main__":
    main()
