"""Exact influence for the linear MNIST model at ~1e4 and ~1e5 parameters: the package's
solver against a naive explicit Hessian inverse.

    OMP_NUM_THREADS=2 python benchmarks/exact_linear.py --out benchmarks/results/exact_linear.json
    python benchmarks/exact_linear.py --quick --out /tmp/exact_linear.json    # small sizes, seconds

The model and data are the ``approximation`` study's (:mod:`llm_influence.studies.approximation`,
the paper's Table 5): a 10-class softmax regression, L2 strength ``mu = 0.01``, on 10
training images of the MNIST test split (seed 0 permutation; the first 20 rows are the test
points), inputs = the 784 pixels + bias (``10 x 785 = 7,850`` parameters) or ``k`` seeded
random ReLU features + bias (``k = 10,000``: 100,010 parameters; ``k = 1,500``: 15,010, an
intermediate size where the naive approach still fits). Trained by Newton-CG to a gradient
max-abs entry <= 1e-10 (not timed as part of influence: both approaches need the trained model).

"Exact influence" = the scores ``s_ti = v_t^T (H + mu I + lambda I)^{-1} g_i`` for all 20 test
x 10 training points, ``H`` the Hessian of the mean training loss, ``lambda`` the paper's
damping (0.1 x mean squared gradient entry), float64:

* ``ours``: :func:`llm_influence.studies._linear.cg_solve` (the registered ``exact-full``
  method with ``hessian="true"``: conjugate gradient on Hessian-vector products per test
  point to relative residual <= 1e-10), then the scores; no ``[D, D]`` matrix is formed;
* ``ours_explicit`` (<= 8,000 parameters, as in the study): the analytic Hessian
  (``SoftmaxRegression.hessian``) factored by Cholesky;
* ``naive``: ``torch.autograd.functional.hessian`` of the regularised loss as a function of
  the flattened weights (``D`` backward passes, ``vectorize=True``), ``+ lambda I``, then
  ``torch.linalg.inv`` and ``V H^{-1}``. Not run when the ``[D, D]`` float64 Hessian and its
  inverse would not fit in the available memory with a margin (at 1e5: 80 GB each); the
  arithmetic is recorded instead.

Each (size, approach) runs in a fresh process (peak resident memory = ``ru_maxrss``), timed
``--repeats`` times (median; the naive one once where it takes minutes). The relative
difference of every approach's scores to ``ours`` is recorded (a correctness check).
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

N_TRAIN, N_TEST, L2, DAMPING_RATIO, SEED = 10, 20, 0.01, 0.1, 0
SIZES = {"p7850": ("pixels", 0), "p15010": ("relu", 1_500), "p100010": ("relu", 10_000)}
QUICK_SIZES = {"p1970": ("pool2", 0), "p3010": ("relu", 300)}
EXPLICIT_MAX = 8_000


def _problem(inputs: str, k: int):
    import torch

    from llm_influence.data.mnist import load_mnist
    from llm_influence.linear import SoftmaxRegression, with_bias
    from llm_influence.methods import block_damping
    from llm_influence.studies._linear import fit_newton_cg, random_relu_features

    pixels, labels = load_mnist(None, pool=2 if inputs == "pool2" else 1)
    perm = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(SEED))
    te, tr = perm[:N_TEST], perm[N_TEST:N_TEST + N_TRAIN]
    if inputs == "relu":
        full = load_mnist(None, pool=1)[0]
        Xtr, Xte = (with_bias(random_relu_features(full[i], k, seed=1_000 + SEED)) for i in (tr, te))
    else:
        Xtr, Xte = with_bias(pixels[tr].double()), with_bias(pixels[te].double())
    ytr, yte = labels[tr], labels[te]
    model = SoftmaxRegression(Xtr.shape[1], 10, l2=L2)
    t = time.perf_counter()
    fit_newton_cg(model, Xtr, ytr)
    train_seconds = time.perf_counter() - t
    train_f = model.features(Xtr, ytr, kfac=False, hvp=True)
    test_f = model.features(Xte, yte, kfac=False)
    lam = block_damping(train_f, None, DAMPING_RATIO)["weight"]
    return model, Xtr, ytr, train_f, test_f, lam, train_seconds


def _ours(model, Xtr, ytr, train_f, test_f, lam):
    from llm_influence.studies._linear import cg_solve

    x, diag = cg_solve(train_f, test_f, L2, lam, tol=1e-10)
    return x @ train_f.flat("weight").T, {"cg_iterations_max": diag.get("iterations_max"),
                                          "residual_max": diag.get("residual_max")}


def _ours_explicit(model, Xtr, ytr, train_f, test_f, lam):
    from llm_influence.studies._linear import explicit_solve

    x = explicit_solve(model, Xtr, ytr, test_f.flat("weight"), lam)
    return x @ train_f.flat("weight").T, {}


def _naive(model, Xtr, ytr, train_f, test_f, lam):
    import torch

    C, F = model.n_classes, model.n_features
    phases = {}
    t = time.perf_counter()
    H = torch.autograd.functional.hessian(lambda w: model.loss(Xtr, ytr, weight=w.reshape(C, F)),
                                          model.weight.reshape(-1).clone(), vectorize=True)
    phases["hessian_seconds"] = time.perf_counter() - t
    H.diagonal().add_(lam)
    t = time.perf_counter()
    Hinv = torch.linalg.inv(H)
    phases["inverse_seconds"] = time.perf_counter() - t
    del H
    t = time.perf_counter()
    scores = (test_f.flat("weight") @ Hinv) @ train_f.flat("weight").T
    phases["apply_seconds"] = time.perf_counter() - t
    return scores, phases


APPROACHES = {"ours": _ours, "ours_explicit": _ours_explicit, "naive": _naive}


def child(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model, Xtr, ytr, train_f, test_f, lam, train_seconds = _problem(spec["inputs"], int(spec["k"]))
    D = model.dim
    ref, _ = _ours(model, Xtr, ytr, train_f, test_f, lam)  # also the warm-up
    rss = bu.current_rss_bytes()
    fn = APPROACHES[spec["approach"]]
    seconds, loads, info, scores = [], [], {}, None
    for _ in range(int(spec["repeats"])):
        before = bu.loadavg()
        t = time.perf_counter()
        scores, info = fn(model, Xtr, ytr, train_f, test_f, lam)
        seconds.append(time.perf_counter() - t)
        loads.append([before, bu.loadavg()])
    rel = float(torch.linalg.vector_norm(scores - ref) / torch.linalg.vector_norm(ref))
    peak = bu.peak_rss_bytes()
    return {"approach": spec["approach"], "params": D, "inputs": spec["inputs"], "k": spec["k"],
            "n_train": N_TRAIN, "n_test": N_TEST, "damping": lam, "l2": L2,
            "seconds": statistics.median(seconds), "seconds_all": seconds, "info": info,
            "train_seconds": train_seconds, "train_info": dict(model.fit_info),
            "rel_diff_to_ours": rel, "rss_before_bytes": rss, "peak_rss_bytes": peak,
            "extra_bytes": max(0, peak - rss), "threads": torch.get_num_threads(), "loadavg": loads}


def naive_estimate(D: int) -> dict:
    """The naive approach's memory and arithmetic at ``D`` parameters."""
    return {"params": D, "hessian_bytes": 8 * D * D, "inverse_bytes": 8 * D * D,
            "inverse_flops": 2 * D ** 3, "hessian_backward_passes": D,
            "note": "float64 [D, D] Hessian + its inverse (torch.linalg.inv: LU, ~2 D^3 flops)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(bu.RESULTS / "exact_linear.json"))
    ap.add_argument("--quick", action="store_true", help="1,970 and 3,010 parameters, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--margin-gib", type=float, default=4.0)
    ap.add_argument("--skip-naive-above", type=int, default=20_000,
                    help="parameters above which the naive inverse is not attempted (default 20,000)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return
    sizes = QUICK_SIZES if args.quick else SIZES
    repeats = 1 if args.quick else args.repeats
    load_start = bu.loadavg()
    results, skipped = [], []
    for key, (inputs, k) in sizes.items():
        F = (196 if inputs == "pool2" else 784 if inputs == "pixels" else k) + 1
        D = 10 * F
        for approach in ("ours", "ours_explicit", "naive"):
            if approach == "ours_explicit" and D > EXPLICIT_MAX:
                continue
            if approach == "naive":
                est = naive_estimate(D)
                avail = bu.meminfo().get("MemAvailable", 0)
                need = est["hessian_bytes"] + est["inverse_bytes"] + 2**30
                if D > args.skip_naive_above or (avail and need + args.margin_gib * 2**30 > avail):
                    skipped.append({**est, "approach": approach, "available_bytes": avail,
                                    "reason": f"needs >= {bu.gib(need):.0f} GiB for the float64 Hessian and its "
                                              f"inverse ({bu.gib(avail):.0f} GiB available) and "
                                              f"~{est['inverse_flops']:.1e} flops for the inverse"})
                    continue
            spec = {"approach": approach, "inputs": inputs, "k": k, "threads": args.threads,
                    "repeats": 1 if (approach == "naive" and D > 10_000) else repeats}
            print(f"[exact_linear] {key} {approach} ...", file=sys.stderr, flush=True)
            r = bu.run_child([str(Path(__file__).resolve()), "--child", json.dumps(spec)], timeout=3600)
            r.update(size=key)
            results.append(r)
            msg = r.get("error") or f"{r['seconds']:.3f} s, peak {bu.gib(r['peak_rss_bytes']):.2f} GiB, " \
                                     f"rel diff {r['rel_diff_to_ours']:.1e}"
            print(f"[exact_linear] {key} {approach}: {msg}", file=sys.stderr, flush=True)
    target = {}
    for r in results:
        if r.get("approach") == "ours" and r.get("params", 0) >= 100_000 and "seconds" in r:
            target = {"params": r["params"], "seconds": r["seconds"], "limit_seconds": 10.0,
                      "met": r["seconds"] <= 10.0}
    bu.write_results(args.out, "exact_linear", bu.command_line(), {
        "settings": {"n_train": N_TRAIN, "n_test": N_TEST, "l2": L2, "damping_ratio": DAMPING_RATIO,
                     "seed": SEED, "sizes": {k: list(v) for k, v in sizes.items()}, "repeats": repeats,
                     "quick": args.quick},
        "loadavg_start": load_start, "results": results, "skipped": skipped,
        "naive_at_1e5": naive_estimate(100_010), "target": target,
    })
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
