"""Scoring time and peak memory of each attribution method on gradients of the embedded
model's LoRA shapes, for 100 / 1,000 / 10,000 training examples x 100 test examples.

    OMP_NUM_THREADS=2 python benchmarks/scoring.py --out benchmarks/results/scoring.json
    python benchmarks/scoring.py --quick --out /tmp/scoring.json      # 100 x 10, about a minute

The block shapes are read from the model: the ``cpu`` profile's LoRA (r=4, alpha=32, q_proj
and v_proj of all 30 layers) on SmolLM2-135M gives 120 blocks, ``lora_A`` ``[4, 576]`` and
``lora_B`` ``[576, 4]`` (q_proj) / ``[192, 4]`` (v_proj), D = 230,400 parameters per example.
Gradients are synthetic (seeded N(0, 1e-6) float32 entries: the methods' cost does not
depend on the values), as are the other inputs where a method needs them: K-FAC factors
(random symmetric positive definite ``[cols, cols]`` / ``[rows, rows]``) for ``ekfac`` and
``[n, 576]`` representations for ``repsim``.

Each (method, n_train) runs in a fresh Python process, so its peak resident memory
(``getrusage`` ``ru_maxrss``) is its own. The process builds the features (``n_train`` +
``n_test`` examples, float32 in memory, ``(n_train + n_test) x D x 4`` bytes: 0.09 / 0.92 /
9.2 GB), records its resident memory, then times ``method.fit(train)`` and
``method.score(test)`` (wall clock, after a warm-up on 4 examples that initialises the
thread pool), ``--repeats`` times for n_train <= 1,000 (median) and once at 10,000. Reported:
seconds of fit and score, the peak resident memory of the process, and the memory the
method added on top of the stored features (peak minus resident memory after building
them). Before a run, the available memory is checked against an estimate of what it needs
plus a margin (``--margin-gib``); a run that does not fit is skipped and the reason
recorded, never attempted.

Methods: ``gradsim``, ``gradsim-cos``, ``datainf``, ``lissa`` (10 iterations, automatic
scale), ``exact`` (block-wise), ``ekfac``, ``repsim``, ``exact-full`` (joint Gauss-Newton;
not at 10,000: its ``n x n`` Gram matrix over all D parameters costs ``n^2 D`` = 2.3e13
multiply-adds). ``tracin`` is ``gradsim`` summed over checkpoints (one ``gradsim`` per
checkpoint), so it is not run separately.

The target of issue 7 (DataInf, GradSim and LiSSA(10) for 1,000 x 100 in <= 5 % of the
time to extract 1,000 examples' gradients) uses the extraction throughput of
``benchmarks/results/extraction.json`` (``--extraction``) when it exists.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

METHODS = {
    "gradsim": {},
    "gradsim-cos": {},
    "datainf": {},
    "lissa": {"iterations": 10},
    "exact": {},
    "ekfac": {},
    "repsim": {},
    "exact-full": {},
}
TARGET_METHODS = ("datainf", "gradsim", "lissa")
SIZES = (100, 1_000, 10_000)
N_TEST = 100
HIDDEN = 576
GRAD_SCALE = 1e-3


def lora_shapes() -> dict[str, list[int]]:
    """``{block: [rows, cols]}`` of the cpu profile's LoRA on the embedded model."""
    from llm_influence.config import get_profile
    from llm_influence.models import load_model
    from llm_influence.models.lora import attach_lora, lora_parameters

    profile = get_profile("cpu")
    model, _, _ = load_model(profile.model)
    model = attach_lora(model, profile.lora, seed=0)
    return {b: list(p.shape) for b, p in lora_parameters(model).items()}


# ---------------------------------------------------------------------------------------
# the child: one (method, n_train) measurement in its own process


def _features(shapes: dict[str, list[int]], n: int, seed: int, kfac: bool, reps: bool, prefix: str):
    import torch

    from llm_influence.features.types import Features, KFACFactors

    gen = torch.Generator().manual_seed(seed)
    grads = {b: torch.randn((n, r, c), generator=gen, dtype=torch.float32).mul_(GRAD_SCALE)
             for b, (r, c) in shapes.items()}
    factors = None
    if kfac:
        factors = {}
        for b, (r, c) in shapes.items():
            a = torch.randn((c, c), generator=gen, dtype=torch.float64)
            s = torch.randn((r, r), generator=gen, dtype=torch.float64)
            factors[b] = KFACFactors(input_cov=(a @ a.T / c).float(), grad_cov=(s @ s.T / r).float() * GRAD_SCALE**2,
                                     n_tokens=n * 50)
    rep = torch.randn((n, HIDDEN), generator=gen, dtype=torch.float32) if reps else None
    return Features(ids=[f"{prefix}{i}" for i in range(n)], grads=grads, reps=rep, kfac=factors)


def child(spec: dict) -> dict:
    import torch

    from llm_influence.methods import make_method

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    name, kwargs, n, m = spec["method"], spec["kwargs"], int(spec["n_train"]), int(spec["n_test"])
    shapes = spec["shapes"]
    needs_kfac, needs_reps = name == "ekfac", name == "repsim"
    rss_start = bu.current_rss_bytes()
    # warm-up on 4 examples (thread pool, first-call allocations), not timed
    small_tr = _features(shapes, 4, 1, needs_kfac, needs_reps, "w")
    make_method(name, **kwargs).fit(small_tr).score(_features(shapes, 2, 2, False, needs_reps, "v"))
    del small_tr
    t = time.perf_counter()
    train = _features(shapes, n, spec["seed"], needs_kfac, needs_reps, "train-")
    test = _features(shapes, m, spec["seed"] + 1, False, needs_reps, "test-")
    build_seconds = time.perf_counter() - t
    rss_features = bu.current_rss_bytes()
    peak_before = bu.peak_rss_bytes()
    fits, scores_s, loads = [], [], []
    diagnostics = {}
    for _ in range(int(spec["repeats"])):
        before = bu.loadavg()
        method = make_method(name, **kwargs)
        t = time.perf_counter()
        method.fit(train)
        t_fit = time.perf_counter() - t
        t = time.perf_counter()
        s = method.score(test)
        t_score = time.perf_counter() - t
        loads.append([before, bu.loadavg()])
        fits.append(t_fit)
        scores_s.append(t_score)
        if tuple(s.shape) != (m, n) or not bool(torch.isfinite(s).all()):
            raise RuntimeError(f"{name}: scores shaped {tuple(s.shape)} or not finite")
        diagnostics = {k: v for k, v in method.diagnostics.items()
                       if k in ("residual_max", "residual_mean", "iterations", "converged")}
        del method, s
    total = [a + b for a, b in zip(fits, scores_s)]
    peak = bu.peak_rss_bytes()
    return {
        "method": name, "kwargs": kwargs, "n_train": n, "n_test": m,
        "params_per_example": sum(r * c for r, c in shapes.values()),
        "fit_seconds": statistics.median(fits), "score_seconds": statistics.median(scores_s),
        "seconds": statistics.median(total), "seconds_all": total, "repeats": len(total),
        "build_features_seconds": build_seconds,
        "rss_start_bytes": rss_start, "rss_after_features_bytes": rss_features,
        "peak_rss_before_method_bytes": peak_before, "peak_rss_bytes": peak,
        "method_extra_bytes": max(0, peak - rss_features),
        "threads": torch.get_num_threads(), "loadavg": loads, "diagnostics": diagnostics,
    }


# ---------------------------------------------------------------------------------------
# the parent


def estimate_bytes(method: str, n: int, m: int, shapes: dict[str, list[int]]) -> int:
    """What one child needs at most (bytes): the features plus the method's own arrays,
    plus ~1 GiB for the interpreter, torch and temporaries."""
    D = sum(r * c for r, c in shapes.values())
    dmax = max(r * c for r, c in shapes.values())
    features = (n + m) * D * 4
    block64 = 3 * n * dmax * 8  # float64 copies of one block (and a product of its size)
    extra = {
        "exact": sum(min(n, r * c) ** 2 * 8 for r, c in shapes.values()),
        "exact-full": 3 * n * n * 8,
        "ekfac": 2 * n * dmax * 8,
        "repsim": 0,
    }.get(method, 0)
    return features + block64 + extra + 2**30


def parent(args, shapes: dict[str, list[int]]) -> dict:
    results, skipped = [], []
    for n in args.sizes:
        for name in args.methods:
            if name == "exact-full" and n > 1_000:
                skipped.append({"method": name, "n_train": n, "reason":
                                f"time, not memory: the Gram matrix over all D parameters costs n^2 D = "
                                f"{n * n * sum(r * c for r, c in shapes.values()):.1e} multiply-adds"})
                continue
            need = estimate_bytes(name, n, args.n_test, shapes)
            avail = bu.meminfo().get("MemAvailable", 0)
            if avail and need + args.margin_gib * 2**30 > avail:
                reason = (f"needs ~{bu.gib(need):.1f} GiB, {bu.gib(avail):.1f} GiB available "
                          f"(margin {args.margin_gib} GiB for the other processes on this machine)")
                skipped.append({"method": name, "n_train": n, "reason": reason,
                                "estimated_bytes": need, "available_bytes": avail})
                print(f"[scoring] skip {name} n={n}: {reason}", file=sys.stderr, flush=True)
                continue
            spec = {"method": name, "kwargs": METHODS[name], "n_train": n, "n_test": args.n_test,
                    "shapes": shapes, "seed": args.seed, "threads": args.threads,
                    "repeats": args.repeats if n <= 1_000 else 1}
            print(f"[scoring] {name} n={n} (est. {bu.gib(need):.1f} GiB) ...", file=sys.stderr, flush=True)
            r = bu.run_child([str(Path(__file__).resolve()), "--child", json.dumps(spec)], timeout=args.timeout)
            r.setdefault("method", name)
            r.setdefault("n_train", n)
            r["estimated_bytes"] = need
            r["mem_available_before_bytes"] = avail
            results.append(r)
            if "error" in r:
                print(f"[scoring] {name} n={n}: ERROR {r['error'][-300:]}", file=sys.stderr, flush=True)
            else:
                print(f"[scoring] {name} n={n}: fit {r['fit_seconds']:.2f} s, score {r['score_seconds']:.2f} s, "
                      f"peak {bu.gib(r['peak_rss_bytes']):.2f} GiB", file=sys.stderr, flush=True)
    return {"results": results, "skipped": skipped}


def targets(results: list[dict], extraction: Path) -> dict:
    out: dict = {"extraction_json": str(extraction), "budget_fraction": 0.05}
    if not extraction.is_file():
        out["note"] = "no extraction results; run benchmarks/extraction.py first"
        return out
    ex = json.loads(extraction.read_text())
    rate = ex.get("variants", {}).get("extract", {}).get("examples_per_s")
    if not rate:
        out["note"] = "extraction results have no 'extract' throughput"
        return out
    extract_1000 = 1000 / rate
    out.update(extraction_examples_per_s=rate, extraction_seconds_1000=extract_1000,
               budget_seconds=0.05 * extract_1000, methods={})
    for r in results:
        if r.get("n_train") == 1_000 and r.get("method") in TARGET_METHODS and "seconds" in r:
            out["methods"][r["method"]] = {"seconds": r["seconds"], "fraction_of_extraction": r["seconds"] / extract_1000,
                                           "met": r["seconds"] <= 0.05 * extract_1000}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(bu.RESULTS / "scoring.json"))
    ap.add_argument("--quick", action="store_true", help="100 train x 10 test, 1 repeat")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="training-set sizes")
    ap.add_argument("--n-test", type=int, default=N_TEST)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=3, help="for n_train <= 1,000 (10,000 runs once)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--margin-gib", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extraction", default=str(bu.RESULTS / "extraction.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return
    args.sizes = [100] if args.quick else [int(s) for s in args.sizes.split(",")]
    args.methods = [s for s in args.methods.split(",") if s]
    unknown = [s for s in args.methods if s not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if args.quick:
        args.n_test, args.repeats = 10, 1
    load_start = bu.loadavg()
    shapes = lora_shapes()
    data = parent(args, shapes)
    bu.write_results(args.out, "scoring", bu.command_line(), {
        "settings": {"sizes": args.sizes, "n_test": args.n_test, "methods": {k: METHODS[k] for k in args.methods},
                     "blocks": len(shapes), "params_per_example": sum(r * c for r, c in shapes.values()),
                     "shapes": shapes, "gradient_entries": f"N(0, {GRAD_SCALE}^2) float32, seed {args.seed}",
                     "repeats_up_to_1000": args.repeats, "quick": args.quick, "margin_gib": args.margin_gib},
        "loadavg_start": load_start,
        **data,
        "target": targets(data["results"], Path(args.extraction)),
    })
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
