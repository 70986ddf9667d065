"""One training step in float32 and under bf16 autocast, per CPU class.

    OMP_NUM_THREADS=2 python benchmarks/cpu_classes.py --out benchmarks/results/cpu_classes_native.json
    ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=2 python benchmarks/cpu_classes.py \\
        --out benchmarks/results/cpu_classes_avx2.json --reference benchmarks/results/cpu_classes_native.json
    python benchmarks/cpu_classes.py --quick --out /tmp/cpu_classes.json       # 1 step each, ~1 minute natively

Why: bfloat16 autocast is fast only where the CPU has bfloat16 instructions (AVX512-BF16,
AMX-BF16); elsewhere every bf16 matrix product is emulated. The second command makes torch
behave like an AVX2-only CPU on this machine: ``ATEN_CPU_CAPABILITY=avx2`` selects ATen's
AVX2 kernels and ``DNNL_MAX_CPU_ISA=AVX2`` caps oneDNN (both are read when the process
starts, so the emulation is a separate process).

What is timed: the ``cpu`` profile's fine-tuning step of
:func:`llm_influence.training.finetune.finetune` (forward, per-example loss, mean, backward,
gradient clipping at the profile's ``max_grad_norm``, AdamW step; train mode, so LoRA
dropout is on) on one batch of 8 examples x 96 tokens: the first 8 training examples of
``mixed-small`` (``$LLM_INFLUENCE_DATA``), SmolLM2-135M from
``llm_influence.models.registry.load_model("smollm2-135m")`` with the profile's LoRA
(r=4, alpha=32, q_proj/v_proj of all 30 layers) attached by
:func:`llm_influence.models.lora.attach_lora`, B matrices given small seeded values (as
``benchmarks/extraction.py`` does, so that no gradient is trivially zero). Per variant
(``float32``, ``bf16`` autocast): 1 untimed warm-up step, then the median of ``--steps``
(3) timed steps, on ``--threads`` (2) threads. If the warm-up step of a variant takes more
than ``--single-step-over`` (120 s), that step alone is reported (``single_step: true``)
and no more are run.

Numbers across CPU classes (``float32_check``): before any timing, from the initial LoRA
weights and ``torch.manual_seed(seed)``, one float32 step is run and its loss (also as
``float.hex``), per-example losses, gradient norm and the loss after the update are
recorded. With ``--reference`` (another run's JSON), the maximum absolute differences
against that run are written under ``comparison``.

The JSON also records ``torch.backends.cpu.get_cpu_capability()``, the cpuinfo flags
(avx2/avx512f/avx512_bf16/amx), :func:`llm_influence.hardware.cpu_has_native_bf16`, what
:func:`llm_influence.hardware.resolve_autocast` makes of a bf16 request, and the two
environment variables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
ENV = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS")


def _setup(task_name: str, n: int, seed: int):
    """The extraction benchmark's model and first ``n`` training examples, as one batch."""
    from extraction import _setup as extraction_setup

    from llm_influence.models.formatting import collate

    profile, targs, model, pad_id, encoded = extraction_setup(task_name, n, seed)
    return profile, targs, model, collate(encoded, pad_id)


def make_step(model, batch, lr: float, max_grad_norm: float):
    """``step(bf16: bool) -> (loss, per-example losses, gradient norm)``: finetune's inner loop
    on one batch, with one AdamW optimizer kept across calls (as in training)."""
    from llm_influence.models.formatting import model_inputs
    from llm_influence.models.loss import per_example_loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step(bf16: bool):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(**model_inputs(batch)).logits
        losses = per_example_loss(logits, batch["labels"])
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else torch.zeros(())
        optimizer.step()
        return float(loss.detach()), losses.detach().tolist(), float(norm)

    return step


@torch.no_grad()
def eval_loss(model, batch) -> float:
    from llm_influence.models.formatting import model_inputs
    from llm_influence.models.loss import per_example_loss

    model.eval()
    return float(per_example_loss(model(**model_inputs(batch)).logits, batch["labels"]).mean())


def float32_check(model, batch, targs, seed: int) -> dict:
    """One float32 step from the current (initial) LoRA weights, seeded; the weights are
    restored afterwards."""
    from llm_influence.models.lora import lora_parameters

    saved = {k: p.detach().clone() for k, p in lora_parameters(model).items()}
    torch.manual_seed(seed)
    loss, per_example, norm = make_step(model, batch, targs.lr, targs.max_grad_norm)(False)
    after = eval_loss(model, batch)
    with torch.no_grad():
        for k, p in lora_parameters(model).items():
            p.copy_(saved[k])
    return {"loss": loss, "loss_hex": float.hex(loss), "per_example_loss": per_example, "grad_norm": norm,
            "loss_after_step": after, "loss_after_step_hex": float.hex(after)}


def compare(mine: dict, ref: dict) -> dict:
    """Max absolute differences of the float32 check against a reference run's."""
    per = max(abs(a - b) for a, b in zip(mine["per_example_loss"], ref["per_example_loss"]))
    return {"loss_abs_diff": abs(mine["loss"] - ref["loss"]), "loss_bitwise_equal": mine["loss_hex"] == ref["loss_hex"],
            "per_example_loss_max_abs_diff": per, "grad_norm_abs_diff": abs(mine["grad_norm"] - ref["grad_norm"]),
            "loss_after_step_abs_diff": abs(mine["loss_after_step"] - ref["loss_after_step"]),
            "loss_after_step_bitwise_equal": mine["loss_after_step_hex"] == ref["loss_after_step_hex"],
            "float32_eps_times_loss": torch.finfo(torch.float32).eps * abs(ref["loss"])}


def time_variant(step, bf16: bool, steps: int, single_over: float, label: str) -> dict:
    def one() -> float:
        before = bu.loadavg()
        t = time.perf_counter()
        loss = step(bf16)[0]
        seconds = time.perf_counter() - t
        loads.append([before, bu.loadavg()])
        print(f"[cpu_classes] {label}: {seconds:.2f} s (loss {loss:.4f}, load {before[0] if before else 0:.2f})",
              file=sys.stderr, flush=True)
        return seconds

    loads: list = []
    warm = one()
    if warm > single_over:
        return {"seconds": [warm], "median_seconds": warm, "min_seconds": warm, "warmup_seconds": warm,
                "single_step": True, "loadavg": loads,
                "note": f"the warm-up step took {warm:.0f} s > {single_over:.0f} s: that one step is reported, "
                        "no further steps were run"}
    seconds = [one() for _ in range(steps)]
    return {"seconds": seconds, "median_seconds": statistics.median(seconds), "min_seconds": min(seconds),
            "warmup_seconds": warm, "single_step": False, "loadavg": loads[1:]}


def cpu_facts() -> dict:
    from llm_influence import hardware

    flags = hardware.cpuinfo_flags()
    return {"cpu_capability": hardware.cpu_capability(), "cpuinfo_flags": {f: f in flags for f in FLAGS},
            "onednn_bf16": hardware.onednn_bf16(), "cpu_has_native_bf16": hardware.cpu_has_native_bf16(),
            "env": {k: os.environ.get(k) for k in ENV}}


def command() -> str:
    """The command line, with the CPU-class environment variables that were set."""
    prefix = "".join(f"{k}={os.environ[k]} " for k in ENV[:2] if os.environ.get(k))
    return prefix + bu.command_line()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(bu.RESULTS / "cpu_classes_native.json"))
    ap.add_argument("--reference", default=None, help="a cpu_classes JSON to compare the float32 check against")
    ap.add_argument("--task", default="mixed-small")
    ap.add_argument("--batch", type=int, default=8, help="examples in the batch (default 8)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single-step-over", type=float, default=120.0,
                    help="seconds: a warm-up step slower than this is the only step timed (default 120)")
    ap.add_argument("--skip", default="", help="comma-separated variants to skip (float32, bf16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 timed step per variant (checks that it runs)")
    args = ap.parse_args()
    if args.quick:
        args.steps = 1
    torch.set_num_threads(args.threads)
    from llm_influence import hardware
    from llm_influence.progress import set_quiet

    set_quiet(True)
    facts = cpu_facts()
    facts["resolve_autocast_bf16"] = hardware.resolve_autocast("bf16", "cpu")  # warns once where not native
    print(f"[cpu_classes] {json.dumps(facts)}", file=sys.stderr, flush=True)
    load_start = bu.loadavg()
    profile, targs, model, batch = _setup(args.task, args.batch, args.seed)
    check = float32_check(model, batch, targs, args.seed)
    step = make_step(model, batch, targs.lr, targs.max_grad_norm)
    skip = {s for s in args.skip.split(",") if s}
    variants = {}
    for name, bf16 in (("float32", False), ("bf16", True)):
        if name not in skip:
            variants[name] = {"autocast": "bf16" if bf16 else "none",
                              **time_variant(step, bf16, args.steps, args.single_step_over, name)}
    summary = {}
    if "float32" in variants and "bf16" in variants:
        summary["bf16_over_float32"] = variants["bf16"]["median_seconds"] / variants["float32"]["median_seconds"]
    data = {
        "settings": {"task": args.task, "batch_size": int(batch["input_ids"].shape[0]),
                     "tokens_per_example": int(batch["input_ids"].shape[1]),
                     "supervised_tokens": int((batch["labels"] != -100).sum()), "model": profile.model,
                     "lora": profile.lora.to_dict(), "lr": targs.lr, "max_grad_norm": targs.max_grad_norm,
                     "steps": args.steps, "warmup": 1, "threads": torch.get_num_threads(), "seed": args.seed,
                     "single_step_over_seconds": args.single_step_over, "quick": args.quick},
        "cpu_class": facts,
        "loadavg_start": load_start,
        "float32_check": check,
        "variants": variants,
        "summary": summary,
    }
    if args.reference:
        ref = json.loads(Path(args.reference).read_text())
        data["comparison"] = {"reference": args.reference, "reference_cpu_class": ref.get("cpu_class"),
                              **compare(check, ref["float32_check"])}
        print(f"[cpu_classes] comparison: {json.dumps(data['comparison'])}", file=sys.stderr, flush=True)
    bu.write_results(args.out, "cpu_classes", command(), data)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
