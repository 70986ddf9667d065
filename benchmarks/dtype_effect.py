"""Effect of the model compute dtype (``attribute --extract-dtype``) on the scores.

Copies a fine-tuned run (config, data, checkpoints; no features or scores) once per dtype,
runs ``attribute`` with each dtype, and compares every method's scores with the float32
reference: Spearman rank correlation per test row (mean and min), overlap of the top-10
lists, the largest relative difference, and Acc/Cover. Also times feature extraction.

    python benchmarks/dtype_effect.py --run RUN --out benchmarks/results/dtype_effect.json \
        [--dtypes float32,bf16,fp16] [--methods datainf,gradsim,lissa,exact,repsim]

fp16 needs a CUDA GPU; bf16 runs on CPUs too (autocast). The results in
benchmarks/README.md were measured on an H100 with the cpu-profile mixed-small run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch


def _copy_run(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for name in ("config.json", "train_log.jsonl"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    shutil.copytree(src / "data", dst / "data")
    shutil.copytree(src / "checkpoints", dst / "checkpoints")


def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra = a.double().argsort(1).argsort(1).double()
    rb = b.double().argsort(1).argsort(1).double()
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def _top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    k = min(k, a.shape[1])
    ta = a.topk(k, dim=1).indices.tolist()
    tb = b.topk(k, dim=1).indices.tolist()
    return sum(len(set(x) & set(y)) for x, y in zip(ta, tb)) / (k * len(ta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtypes", default="float32,bf16,fp16")
    parser.add_argument("--methods", default="datainf,gradsim,lissa,exact,repsim")
    parser.add_argument("--batch-size", type=int, default=8)
    ns = parser.parse_args()

    from llm_influence.attribute import AttributeArgs, attribute, read_scores
    from llm_influence.evaluation.run_metrics import evaluate_run
    from llm_influence.progress import set_quiet

    set_quiet(True)
    methods = tuple(m for m in ns.methods.split(",") if m)
    dtypes = [d for d in ns.dtypes.split(",") if d]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results: dict = {"run": ns.run, "device": device, "torch": torch.__version__, "dtypes": {}}
    scores: dict[str, dict[str, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            run = Path(tmp) / dtype
            _copy_run(Path(ns.run), run)
            t0 = time.perf_counter()
            out = attribute(run, AttributeArgs(methods=methods, dtype=dtype, extract_batch_size=ns.batch_size))
            wall = time.perf_counter() - t0
            metrics = evaluate_run(run)
            (checkpoint,) = metrics["checkpoints"]
            scores[dtype] = {r.method: read_scores(r.path)[0] for r in out}
            results["dtypes"][dtype] = {
                "attribute_seconds": wall,
                "methods": {m: {"acc": v["acc"], "cover": v["cover"]} for m, v in metrics["checkpoints"][checkpoint].items()},
            }
            print(f"{dtype}: attribute {wall:.1f} s", flush=True)
    reference = dtypes[0]
    for dtype in dtypes[1:]:
        for method, s in scores[dtype].items():
            ref = scores[reference][method]
            rho = _spearman_rows(ref, s)
            entry = results["dtypes"][dtype]["methods"][method]
            entry.update({
                "spearman_mean": float(rho.mean()), "spearman_min": float(rho.min()),
                "top10_overlap": _top_overlap(ref, s),
                "max_rel_diff": float(((s.double() - ref.double()).abs().max() / ref.double().abs().max())),
            })
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
