"""What each stage of a ``reproduce`` output cost, read from the timings it recorded.

    python benchmarks/reproduce_costs.py --from runs/cpu --out benchmarks/results/reproduce_costs.json

Nothing is re-run: ``reproduce`` already times every stage it does and stores the seconds
beside the data (each run's ``train_log.jsonl`` epoch rows, every feature file's
``components[*].seconds``, every scores file's ``seconds``, the counterfactual study's
``cost``). This script collects them per run into one JSON file, so the per-example costs
of the methods (issue 16: RepT's signature against LoRA gradients; TrackStar, DRA) and the
cost of one counterfactual retrain (issue 15) come from the same runs as the committed
numbers, with the command that made them (``make reproduce``).

Per run (``DIR/runs/*``):

* ``finetune_s_per_example_epoch``: the training epochs' seconds (validation included)
  over ``n_train x epochs``;
* ``extraction``: per checkpoint, split and *pass* (components computed together share one
  pass, e.g. ``grads+reps``; RepT's ``repgrads`` is its own pass), seconds and seconds per
  example;
* ``scoring``: per method, the seconds of fit + score at the last checkpoint (excluding
  extraction) and per test example.

Plus, if ``DIR/counterfactual.json`` exists, per task the study's ``cost`` (seconds per
half-subset retrain and per example-epoch, per leave-out retrain, tail-patch seconds,
retrains read back from the cache). Seconds are wall clock on the machine that ran
``reproduce`` (``results.json``'s ``machine``); a stage that was interrupted and resumed
keeps the seconds of the pass that completed it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench_utils import machine, write_results


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _scores_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items() if k in ("seconds", "method", "shape", "feature_seconds")}


def run_costs(run: Path) -> dict[str, Any]:
    """The recorded costs of one run directory (module docstring)."""
    epochs = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in epochs if r.get("kind") == "epoch" and int(r.get("epoch", 0)) >= 1]
    task = _json(run / "config.json").get("task", {})
    n_train = sum(1 for line in (run / "data" / "train.jsonl").read_text().splitlines() if line.strip())
    n_test = sum(1 for line in (run / "data" / "test.jsonl").read_text().splitlines() if line.strip())
    seconds = sum(float(r.get("seconds") or 0.0) for r in epochs)
    out: dict[str, Any] = {"run": run.name, "task": task.get("name", run.name), "n_train": n_train, "n_test": n_test,
                           "epochs": len(epochs), "finetune_seconds": seconds,
                           "finetune_s_per_example_epoch": seconds / (n_train * len(epochs)) if epochs else None,
                           "extraction": {}, "scoring": {}}
    for meta_path in sorted((run / "features").glob("epoch-*/*.json")):
        record = _json(meta_path)
        if "components" not in record:
            continue
        passes: dict[float, list[str]] = {}
        for name, c in record["components"].items():
            passes.setdefault(round(float(c.get("seconds") or 0.0), 6), []).append(name)
        n = int(record["n"])
        for s, names in passes.items():
            key = f"{meta_path.parent.name}/{record['split']}/{'+'.join(sorted(names))}"
            out["extraction"][key] = {"n": n, "seconds": s, "s_per_example": s / n if n else None}
    scores = sorted((run / "scores").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    if scores:
        for path in sorted(scores[-1].glob("*.safetensors")):
            meta = _scores_meta(path)
            s = float(meta.get("seconds") or 0.0)
            out["scoring"][path.stem] = {"checkpoint": scores[-1].name, "seconds": s,
                                         "s_per_test_example": s / n_test if n_test else None}
    return out


def collect(source: Path) -> dict[str, Any]:
    runs = sorted(p for p in (source / "runs").iterdir() if (p / "config.json").is_file())
    data: dict[str, Any] = {"source": str(source), "runs": [run_costs(r) for r in runs]}
    results = source / "results.json"
    if results.is_file():
        r = _json(results)
        data["reproduce_machine"] = r.get("machine")
        data["reproduce_wall_seconds"] = r.get("wall_seconds")
        data["studies_seconds"] = {k: v.get("seconds") for k, v in (r.get("studies") or {}).items()}
    cf = source / "counterfactual.json"
    if cf.is_file():
        record = _json(cf)
        data["counterfactual"] = {t["task"]: {**t["cost"], "n_train": t["n_train"], "epochs": t["epochs"],
                                              "subset_size": t["subset_size"]}
                                  for t in record["data"]["tasks"]}
        data["counterfactual_wall_seconds"] = record.get("wall_seconds")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, type=Path, help="a reproduce output directory")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    ns = parser.parse_args(argv)
    if not (ns.source / "runs").is_dir():
        print(f"--from {ns.source}: no runs/ folder (not a reproduce output)", file=sys.stderr)
        return 2
    data = collect(ns.source)
    data["reader_machine"] = machine()
    write_results(ns.out, "reproduce_costs", f"python benchmarks/reproduce_costs.py --from {ns.source} --out {ns.out}",
                  data)
    print(f"wrote {ns.out}: {len(data['runs'])} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
