"""Where the time of gradient extraction and of the training step goes, by torch operator.

    OMP_NUM_THREADS=2 python benchmarks/profile_extraction.py --out benchmarks/results/profile_extraction.json
    python benchmarks/profile_extraction.py --quick --out /tmp/profile_extraction.json

Same model, adapter and data as ``benchmarks/extraction.py`` (cpu profile, 96-token
examples, batch size 8). For ``extract`` (float32, the package's setting), ``train_fp32``,
``train_bf16`` (the cpu profile's training) and ``extract_bf16_what_if``, one warm-up pass
then one pass under ``torch.profiler`` (CPU activity); reported per variant: wall seconds
and the operators with the largest self CPU time (milliseconds, share of the total, calls).
The model's matrix products are also counted analytically (``flops``): per token, the 30
decoder layers' projections (106.2 M multiply-adds) and the tied LM head (576 x 49,152 =
28.3 M multiply-adds, ~21 % of the forward pass), which runs on every position although
only the positions followed by a supervised token feed the loss.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402
from extraction import _setup, extract_pass, train_pass  # noqa: E402


def op_table(prof, limit: int) -> list[dict]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:limit]]


def model_flops(model, tokens: int, supervised_positions: int) -> dict:
    cfg = model.config
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_token_layers = layers * (h * h * 2 + h * kv * 2 + 3 * h * inter)
    head = h * cfg.vocab_size
    return {"per_token_decoder_macs": per_token_layers, "per_token_lm_head_macs": head,
            "lm_head_share_of_forward": head / (head + per_token_layers),
            "tokens": tokens, "positions_feeding_the_loss": supervised_positions,
            "lm_head_share_saved_if_only_loss_positions":
                head * (tokens - supervised_positions) / ((head + per_token_layers) * tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(bu.RESULTS / "profile_extraction.json"))
    ap.add_argument("--quick", action="store_true", help="one batch of 8 examples (the default: 16)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    from llm_influence.progress import set_quiet

    set_quiet(True)
    n = 8 if args.quick else args.n
    profile, targs, model, pad_id, encoded = _setup("mixed-small", n, 0)
    bs = targs.batch_size
    model.eval()
    fns = {
        "extract": lambda: extract_pass(model, encoded, pad_id, bs),
        "train_fp32": lambda: train_pass(model, encoded, pad_id, bs, False, targs.lr, targs.max_grad_norm, 0, 1),
        "train_bf16": lambda: train_pass(model, encoded, pad_id, bs, True, targs.lr, targs.max_grad_norm, 0, 1),
        "extract_bf16_what_if": lambda: extract_pass(model, encoded, pad_id, bs, autocast=True),
    }
    out = {}
    for name, fn in fns.items():
        fn()
        before = bu.loadavg()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t
        out[name] = {"seconds": seconds, "examples": n, "loadavg": [before, bu.loadavg()],
                     "top_ops": op_table(prof, args.top)}
        top = out[name]["top_ops"][0]
        print(f"[profile] {name}: {seconds:.1f} s for {n} examples; top op {top['op']} "
              f"{top['share']:.0%}", file=sys.stderr, flush=True)
    supervised_positions = sum(e.n_supervised for e in encoded)
    bu.write_results(args.out, "profile_extraction", bu.command_line(), {
        "settings": {"examples": n, "batch_size": bs, "max_length": targs.max_length,
                     "threads": torch.get_num_threads()},
        "flops": model_flops(model.base_model.model, sum(len(e.input_ids) for e in encoded), supervised_positions),
        "variants": out,
    })
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
