"""Compare the scores and metrics of two reproduce outputs run on different machines (or
CPU classes): how far float32 rounding moved the numbers.

For every run directory present in both ``A/runs`` and ``B/runs`` and every scores file of
its last checkpoint: the largest absolute score difference relative to the largest
absolute score, the smallest per-test-example Spearman correlation of the two rankings,
the share of test examples whose top-5 training examples are the same in the same order,
and whether Acc and Cover (from each run's ``metrics.json``) are equal.

    python benchmarks/compare_runs.py results/cpu-demo /path/to/avx2/runs/demo \
        --out benchmarks/results/cpu_classes_scores.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llm_influence.attribute import read_scores


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=1).argsort(dim=1).double()


def row_spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[n_test]`` Spearman correlation of each row's ranking (ties broken by index)."""
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(dim=1, keepdim=True)
    rb -= rb.mean(dim=1, keepdim=True)
    return (ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1))


def compare(a_dir: Path, b_dir: Path) -> list[dict]:
    rows = []
    for run_a in sorted((a_dir / "runs").iterdir()):
        run_b = b_dir / "runs" / run_a.name
        if not (run_b / "metrics.json").is_file() or not (run_a / "metrics.json").is_file():
            continue
        ma, mb = (json.loads((r / "metrics.json").read_text())["checkpoints"] for r in (run_a, run_b))
        checkpoint = sorted(ma, key=lambda c: int(c.split("-")[1]))[-1]
        for path in sorted((run_a / "scores" / checkpoint).glob("*.safetensors")):
            other = run_b / "scores" / checkpoint / path.name
            if not other.is_file():
                continue
            a, _ = read_scores(path)
            b, _ = read_scores(other)
            method = path.stem
            top_a = a.argsort(dim=1, descending=True)[:, :5]
            top_b = b.argsort(dim=1, descending=True)[:, :5]
            rows.append({
                "run": run_a.name, "method": method, "checkpoint": checkpoint,
                "max_abs_diff_over_max_abs": float((a - b).abs().max() / a.abs().max()),
                "min_row_spearman": float(row_spearman(a, b).min()),
                "top5_identical_share": float((top_a == top_b).all(dim=1).double().mean()),
                "acc": [ma[checkpoint][method]["acc"], mb[checkpoint][method]["acc"]],
                "cover": [ma[checkpoint][method]["cover"], mb[checkpoint][method]["cover"]],
                "metrics_equal": ma[checkpoint][method]["acc"] == mb[checkpoint][method]["acc"]
                and ma[checkpoint][method]["cover"] == mb[checkpoint][method]["cover"],
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="first reproduce output directory (with runs/)")
    ap.add_argument("b", type=Path, help="second reproduce output directory (with runs/)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ns = ap.parse_args()
    rows = compare(ns.a, ns.b)
    for r in rows:
        print(f"{r['run']:<20} {r['method']:<8} rel. diff {r['max_abs_diff_over_max_abs']:.2e}  "
              f"min Spearman {r['min_row_spearman']:.6f}  top-5 same {r['top5_identical_share']:.3f}  "
              f"Acc/Cover equal {r['metrics_equal']}")
    if ns.out:
        ns.out.write_text(json.dumps({"a": str(ns.a), "b": str(ns.b), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
