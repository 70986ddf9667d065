"""Print the Markdown tables of ``benchmarks/README.md`` from the JSON files in
``benchmarks/results/`` (so that every number in the README comes from a result file).

    python benchmarks/make_tables.py            # all tables
    python benchmarks/make_tables.py scoring    # one of: extraction, scoring, exact_linear, memory, reproduce_costs
    python benchmarks/make_tables.py extraction:extraction_threads1   # KIND:FILE-STEM
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _table(head: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            if 0 < abs(v) < 0.01:
                return "<0.01"
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    numeric = [all(v is None or isinstance(v, (int, float)) or str(v).replace(",", "").replace(".", "").isdigit()
                   for v in col) for col in zip(*rows)] if rows else [False] * len(head)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if num else ":---" for num in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _load_range(loads: list) -> str:
    values = [x[0] for pair in loads for x in pair if x]
    return f"{min(values):.1f}–{max(values):.1f}" if values else "–"


def extraction(stem: str = "extraction") -> str:
    d = _load(stem)
    if d is None:
        return f"(no {stem}.json)"
    v = d["variants"]
    ex = v["extract"]["examples_per_s"]
    labels = {
        "extract": "**extraction** (batched hooks, float32, batch 8)",
        "train_fp32": "training step, float32 (batch 8)",
        "train_bf16": "training step, bf16 autocast (batch 8; the cpu profile's)",
        "loop_bs1": "plain autograd, batch-size-1 loop (float32)",
        "extract_bf16_what_if": "what-if: extraction under bf16 autocast, float32 products",
    }
    rows = []
    for key, label in labels.items():
        if key not in v or "examples_per_s" not in v[key]:
            continue
        r = v[key]
        rows.append([label, r["examples_per_s"], r["examples_per_s_best"], r["median_seconds"] / r["examples"],
                     ex / r["examples_per_s"] if key != "extract" else 1.0, _load_range(r["loadavg"])])
    s = d["settings"]
    out = [f"`{d['command']}` — {s['examples']} examples of `{s['task']}` x {s['max_length']} tokens, "
           f"{d['machine']['torch_threads']} thread(s), median of {s['repeats']} passes after a warm-up, "
           f"finished {d['finished']}.", "",
           _table(["variant", "examples/s (median)", "examples/s (best)", "s/example", "extraction ÷ this",
                   "load avg during"], rows)]
    c = d.get("checks", {})
    if c:
        out += ["", f"Checks: extraction vs the batch-size-1 loop, max relative difference "
                    f"{c['extract_vs_loop_bs1']['max']:.1e}; bf16 what-if vs float32 gradients, relative error "
                    f"median {c.get('extract_bf16_what_if_vs_fp32', {}).get('median', float('nan')):.3f}, "
                    f"max {c.get('extract_bf16_what_if_vs_fp32', {}).get('max', float('nan')):.3f}."]
    return "\n".join(out)


def scoring(stem: str = "scoring") -> str:
    d = _load(stem)
    if d is None:
        return f"(no {stem}.json)"
    rows = []
    for r in d["results"]:
        if "error" in r:
            rows.append([r["method"], r["n_train"], None, None, None, None, None, "error: " + r["error"][:60]])
            continue
        rows.append([r["method"], f"{r['n_train']:,}", r["fit_seconds"], r["score_seconds"], r["seconds"],
                     r["peak_rss_bytes"] / GIB, r["method_extra_bytes"] / GIB, _load_range(r["loadavg"])])
    for s in d["skipped"]:
        rows.append([s["method"], f"{s['n_train']:,}", None, None, None, None, None, "not run: " + s["reason"]])
    s = d["settings"]
    out = [f"`{d['command']}` — {s['params_per_example']:,} parameters per example ({s['blocks']} blocks), "
           f"{s['n_test']} test examples, median of {s['repeats_up_to_1000']} runs up to 1,000 training examples "
           f"(one at 10,000), finished {d['finished']}.", "",
           _table(["method", "n_train", "fit s", "score s", "fit + score s", "peak RSS GiB",
                   "added by the method GiB", "load avg / note"], rows)]
    t = d.get("target", {})
    if "methods" in t:
        out += ["", f"Target (1,000 train x 100 test in <= 5 % of extracting 1,000 examples = "
                    f"{t['extraction_seconds_1000']:.0f} s x 0.05 = **{t['budget_seconds']:.1f} s**):", ""]
        out.append(_table(["method", "fit + score s", "share of extraction", "met"],
                          [[k, m["seconds"], f"{100 * m['fraction_of_extraction']:.1f} %",
                            "yes" if m["met"] else "**no**"] for k, m in t["methods"].items()]))
    return "\n".join(out)


def exact_linear(stem: str = "exact_linear") -> str:
    d = _load(stem)
    if d is None:
        return f"(no {stem}.json)"
    labels = {"ours": "ours: CG on Hessian-vector products (exact-full, true Hessian)",
              "ours_explicit": "ours: analytic Hessian + Cholesky",
              "naive": "naive: autograd.functional.hessian + torch.linalg.inv"}
    rows = []
    for r in d["results"]:
        if "error" in r:
            rows.append([r.get("size"), r.get("approach"), None, None, None, "error"])
            continue
        info = r.get("info", {})
        note = ", ".join(f"{k.replace('_seconds', '')} {v:.2f} s" for k, v in info.items() if k.endswith("_seconds"))
        if "cg_iterations_max" in info:
            note = f"CG iterations <= {info['cg_iterations_max']}, residual <= {info['residual_max']:.0e}"
        rows.append([f"{r['params']:,}", labels[r["approach"]], r["seconds"], r["peak_rss_bytes"] / GIB,
                     f"{r['rel_diff_to_ours']:.1e}", note])
    for s in d["skipped"]:
        rows.append([f"{s['params']:,}", labels[s["approach"]], None, None, None, "not run: " + s["reason"]])
    train = {r["params"]: r["train_seconds"] for r in d["results"] if "train_seconds" in r}
    st = d["settings"]
    out = [f"`{d['command']}` — {st['n_train']} training x {st['n_test']} test points, float64, "
           f"median of {st['repeats']} (naive above 10,000 parameters: once), finished {d['finished']}.", "",
           _table(["parameters", "approach", "seconds", "peak RSS GiB", "scores vs ours (rel.)", "notes"], rows),
           "", "Training the model (Newton-CG, not included above): " +
           ", ".join(f"{p:,} params {s:.2f} s" for p, s in sorted(train.items())) + "."]
    return "\n".join(out)


def memory(stem: str = "cpu_profile_memory") -> str:
    rows = []
    for path in sorted(RESULTS.glob(f"{stem}*.json")):
        d = json.loads(path.read_text())
        what = f"profile {d['profile']}" + (f", tasks {d['tasks']}" if d.get("tasks") else ", all tasks") + \
            (", no studies" if d.get("studies") == "" else ", all studies" if d.get("studies") is None else "")
        rows.append([f"`{d['command']}`", what, d["max_rss_bytes"] / 1e9, d.get("wall_seconds"),
                     _load_range([[d["loadavg_before"], d["loadavg_after"]]]), d["finished"]])
    if not rows:
        return f"(no {stem}*.json)"
    return _table(["command", "what ran", "peak RSS GB", "wall s", "load avg", "finished"], rows)


def reproduce_costs(stem: str = "reproduce_costs") -> str:
    d = _load(stem)
    if d is None:
        return f"(no {stem}.json)"
    d = d.get("data", d)
    runs = d["runs"]
    methods = sorted({m for r in runs for m in r["scoring"]})

    def pass_s(r: dict, split: str, name: str):
        hits = [v["s_per_example"] for k, v in r["extraction"].items()
                if k.split("/")[1] == split and k.split("/")[2] == name]
        return hits[-1] if hits else None  # the last checkpoint's (keys are sorted by checkpoint name)

    rows = []
    for r in runs:
        lora, rept = pass_s(r, "train", "grads+reps"), pass_s(r, "train", "repgrads")
        rows.append([r["run"], r["n_train"], r["finetune_s_per_example_epoch"], lora, rept,
                     rept / lora if lora and rept else None])
    out = [_table(["run", "n_train", "fine-tune s / example-epoch", "LoRA grads + reps s / example",
                   "RepT signature s / example", "RepT ÷ LoRA"], rows), ""]
    rows = [[r["run"], *[r["scoring"].get(m, {}).get("seconds") for m in methods]] for r in runs]
    out += ["Scoring (fit + score at the last checkpoint, extraction excluded), seconds per run:", "",
            _table(["run", *methods], rows)]
    cf = d.get("counterfactual")
    if cf:
        rows = [[task, c["n_train"], c["subset_size"], c["epochs"], c["seconds_per_half_retrain"],
                 c["seconds_per_example_epoch"], c.get("seconds_per_leave_out_retrain"), c.get("tail_patch_seconds"),
                 c["retrains"], c.get("retrains_from_cache", 0), c["task_seconds"]] for task, c in cf.items()]
        out += ["", "Counterfactual study (`counterfactual.json` `cost`):", "",
                _table(["task", "n_train", "subset", "epochs", "s / half-subset retrain", "s / example-epoch",
                        "s / leave-out retrain", "tail-patch s (all)", "retrains", "from cache", "task s"], rows)]
    return "\n".join(out)


TABLES = {"extraction": extraction, "scoring": scoring, "exact_linear": exact_linear, "memory": memory,
          "reproduce_costs": reproduce_costs}

if __name__ == "__main__":
    for arg in sys.argv[1:] or list(TABLES):
        kind, _, stem = arg.partition(":")
        print(f"### {stem or kind}\n\n{TABLES[kind](stem) if stem else TABLES[kind]()}\n")
