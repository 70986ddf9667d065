"""Per-example LoRA gradient extraction throughput against the training step.

    OMP_NUM_THREADS=2 python benchmarks/extraction.py --out benchmarks/results/extraction.json
    python benchmarks/extraction.py --quick --out /tmp/extraction.json     # 8 examples, ~3 minutes

Model and data are the ``cpu`` profile's: the embedded SmolLM2-135M with LoRA r=4, alpha=32
on q_proj/v_proj of all 30 layers, sequences cut to 96 tokens, batch size 8, the
``mixed-small`` task's 40 training examples (``$LLM_INFLUENCE_DATA``). The adapter's B
matrices get small seeded random values (as after training) so that no gradient is
trivially zero.

One *pass* = all ``n`` examples once. Every variant is run once untimed (warm-up), then the
variants are timed round-robin, ``--repeats`` rounds of one pass each (so that a change of
load on the shared machine hits all of them alike); the median pass time gives the
throughput (examples per second):

* ``extract``: :func:`llm_influence.features.gradients.compute_features` with ``grads=True``
  (the batched hooks: one forward + one backward per batch, float32, eval mode), exactly
  what ``llm-influence attribute`` runs per split;
* ``train_fp32`` / ``train_bf16``: the fine-tuning step of
  :func:`llm_influence.training.finetune.finetune` (forward, per-example loss, mean,
  backward, gradient clipping, AdamW step; train mode, so LoRA dropout is on) on batches of
  the same size, in float32 and under bfloat16 autocast (the ``cpu`` profile trains under
  bf16 autocast);
* ``loop_bs1``: plain autograd per-example gradients, one example at a time
  (``torch.autograd.grad`` of its loss w.r.t. the LoRA matrices, eval mode, float32);
* ``extract_bf16_what_if`` (not what the package does): ``compute_features`` run inside
  ``torch.autocast("cpu", bfloat16)`` with the hooks' per-example products up-cast to
  float32 (a subclass of the package's hook swapped in for this process only), with the
  relative error of its gradients against the float32 ones, to size a possible speed-up.

The load average before and after every timed pass is recorded: other processes on a
shared machine make passes slower, never faster, so the minimum is listed as well.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402


def _setup(task_name: str, n: int, seed: int):
    from llm_influence.config import get_profile
    from llm_influence.data.tasks import load_task
    from llm_influence.models import load_model
    from llm_influence.models.formatting import ChatFormatter
    from llm_influence.models.lora import attach_lora, lora_parameters

    profile = get_profile("cpu")
    targs = profile.train_args(task_name)
    tp = profile.task(task_name)
    task = load_task(task_name, train_per_group=tp.train_per_group, test_per_group=tp.test_per_group, seed=0)
    examples = task.train[:n] if n <= len(task.train) else (task.train + task.test)[:n]
    model, tokenizer, _ = load_model(profile.model)
    model = attach_lora(model, profile.lora, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    formatter = ChatFormatter(tokenizer, max_length=targs.max_length, loss_on=targs.loss_on)
    encoded = [formatter.encode(e) for e in examples]
    return profile, targs, model, tokenizer.pad_token_id, encoded


def extract_pass(model, encoded, pad_id, batch_size: int, autocast: bool = False):
    from llm_influence.features import gradients

    if not autocast:
        return gradients.compute_features(model, encoded, pad_id, grads=True, batch_size=batch_size,
                                          description=None).grads
    # what-if: forward/backward under bf16 autocast, per-example outer products in float32
    original = gradients.LoraGradientCapture
    gradients.LoraGradientCapture = _Float32Capture
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return gradients.compute_features(model, encoded, pad_id, grads=True, batch_size=batch_size,
                                              description=None).grads
    finally:
        gradients.LoraGradientCapture = original


def _capture_class():
    from llm_influence.features.gradients import LoraGradientCapture

    class Float32Capture(LoraGradientCapture):
        """The package's hooks, with ``x`` and ``delta`` up-cast to float32 before the
        per-example product (autocast would run it in bf16) and float32 results."""

        def _backward(self, block, delta):
            x = self._x.pop(block).float()
            mask = self._mask.to(x.device)[..., None]
            zero = torch.zeros((), dtype=torch.float32)
            with torch.autocast("cpu", enabled=False):
                d = torch.where(mask, delta.detach().float(), zero)
                xm = torch.where(mask, x, zero)
                self._grads[block] = torch.bmm(d.transpose(1, 2), xm)

    return Float32Capture


_Float32Capture = _capture_class()


def train_pass(model, encoded, pad_id, batch_size: int, autocast: bool, lr: float, max_grad_norm: float,
               seed: int, epoch: int) -> float:
    """One epoch of the fine-tuning step (finetune's inner loop without logging/checkpoints);
    returns the mean loss. The optimizer is created once per pass (its state is tiny)."""
    from llm_influence.models.formatting import collate, model_inputs
    from llm_influence.models.loss import per_example_loss
    from llm_influence.training.finetune import epoch_order

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    order = epoch_order(len(encoded), seed, epoch)
    model.train()
    losses = []
    for start in range(0, len(encoded), batch_size):
        batch = collate([encoded[i] for i in order[start:start + batch_size]], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(**model_inputs(batch)).logits
        loss = per_example_loss(logits, batch["labels"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return sum(losses) / len(losses)


def loop_bs1_pass(model, encoded, pad_id):
    """``{block: [n, rows, cols]}`` by one forward + backward per example."""
    from llm_influence.features.gradients import lora_grad_mode, sequence_losses
    from llm_influence.models.formatting import collate, model_inputs

    out: dict[str, torch.Tensor] = {}
    with lora_grad_mode(model) as modules:
        names = list(modules)
        params = [modules[b].weight for b in names]
        for b in names:
            out[b] = torch.zeros((len(encoded), *modules[b].weight.shape))
        for i, enc in enumerate(encoded):
            batch = collate([enc], pad_id)
            logits = model(**model_inputs(batch), use_cache=False).logits
            loss = sequence_losses(logits, batch["labels"])[0]
            for b, g in zip(names, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    out[b][i] = g
    return out


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-example relative L2 error ``||a_i - b_i|| / ||b_i||`` over the concatenated
    gradient: max and median over examples."""
    num = sum((a[k].double() - b[k].double()).flatten(1).square().sum(1) for k in b)
    den = sum(b[k].double().flatten(1).square().sum(1) for k in b)
    rel = (num / den).sqrt()
    return {"max": float(rel.max()), "median": float(rel.median())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(bu.RESULTS / "extraction.json"))
    ap.add_argument("--quick", action="store_true", help="8 examples, 1 repeat (checks that it runs)")
    ap.add_argument("--task", default="mixed-small")
    ap.add_argument("--n", type=int, default=40, help="examples per pass (default 40)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the cpu profile's (8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--skip", default="", help="comma-separated variants to skip")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from llm_influence.progress import set_quiet

    set_quiet(True)
    skip = {s for s in args.skip.split(",") if s}
    load_start = bu.loadavg()
    profile, targs, model, pad_id, encoded = _setup(args.task, args.n, args.seed)
    bs = args.batch_size or targs.batch_size
    n = len(encoded)
    tokens = sum(len(e.input_ids) for e in encoded)
    supervised = sum(e.n_supervised for e in encoded)
    model.eval()

    epoch = [0]

    def train(autocast: bool):
        epoch[0] += 1
        return train_pass(model, encoded, pad_id, bs, autocast, targs.lr, targs.max_grad_norm, args.seed, epoch[0])

    n_loop = n if not args.quick else min(n, 4)
    plan = {  # name: (function, examples per pass, facts)
        "extract": (lambda: extract_pass(model, encoded, pad_id, bs), n,
                    {"batch_size": bs, "dtype": "float32", "mode": "eval"}),
        "train_fp32": (lambda: train(False), n, {"batch_size": bs, "dtype": "float32", "mode": "train (dropout on)"}),
        "train_bf16": (lambda: train(True), n,
                       {"batch_size": bs, "dtype": "bf16 autocast", "mode": "train (dropout on)"}),
        "loop_bs1": (lambda: loop_bs1_pass(model, encoded[:n_loop], pad_id), n_loop,
                     {"batch_size": 1, "dtype": "float32", "mode": "eval"}),
        "extract_bf16_what_if": (lambda: extract_pass(model, encoded, pad_id, bs, autocast=True), n,
                                 {"batch_size": bs, "mode": "eval",
                                  "dtype": "bf16 autocast, float32 outer products (not the package's setting)"}),
    }
    plan = {k: v for k, v in plan.items() if k not in skip}
    # Warm up every variant once, then time them round-robin (one pass of each per round), so
    # that a change of load on the shared machine affects all variants alike.
    for name, (fn, _, _) in plan.items():
        print(f"[extraction] warm-up {name} ...", file=sys.stderr, flush=True)
        fn()
    times: dict[str, list[float]] = {k: [] for k in plan}
    loads: dict[str, list] = {k: [] for k in plan}
    for rnd in range(args.repeats):
        for name, (fn, count, _) in plan.items():
            before = bu.loadavg()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            loads[name].append([before, bu.loadavg()])
            print(f"[extraction] round {rnd + 1} {name}: {count / times[name][-1]:.3f} ex/s "
                  f"(load {before[0]:.2f})", file=sys.stderr, flush=True)
    variants: dict[str, dict] = {}
    for name, (_, count, facts) in plan.items():
        med = statistics.median(times[name])
        variants[name] = {"examples": count, "seconds": times[name], "median_seconds": med,
                          "min_seconds": min(times[name]), "examples_per_s": count / med,
                          "examples_per_s_best": count / min(times[name]), "loadavg": loads[name], **facts}

    checks: dict[str, dict] = {}
    # sanity checks of what was timed on the real model (the package's tests prove the method)
    ref = extract_pass(model, encoded[:n_loop], pad_id, bs)
    checks["extract_vs_loop_bs1"] = relative_error(ref, loop_bs1_pass(model, encoded[:n_loop], pad_id))
    norms = sum(g.double().flatten(1).square().sum(1) for g in ref.values()).sqrt()
    checks["gradient_norm"] = {"min": float(norms.min()), "median": float(norms.median())}  # nonzero: a real check
    if "extract_bf16_what_if" in plan:
        checks["extract_bf16_what_if_vs_fp32"] = relative_error(
            extract_pass(model, encoded[:n_loop], pad_id, bs, autocast=True), ref)

    ex = variants.get("extract", {}).get("examples_per_s")
    summary = {}
    for name in ("train_fp32", "train_bf16", "loop_bs1", "extract_bf16_what_if"):
        rate = variants.get(name, {}).get("examples_per_s")
        if ex and rate:
            summary[f"extract_over_{name}"] = ex / rate
    if ex:
        summary["extract_seconds_per_1000_examples"] = 1000 / ex
    target = 0.8
    for key in ("extract_over_train_fp32", "extract_over_train_bf16"):
        if key in summary:
            summary[key.replace("extract_over", "target_0.8x")] = summary[key] >= target
    bu.write_results(args.out, "extraction", bu.command_line(), {
        "settings": {"task": args.task, "examples": n, "batch_size": bs, "max_length": targs.max_length,
                     "tokens": tokens, "supervised_tokens": supervised, "lora": profile.lora.to_dict(),
                     "model": profile.model, "repeats": args.repeats, "warmup": 1, "quick": args.quick,
                     "threads": torch.get_num_threads()},
        "loadavg_start": load_start,
        "variants": variants,
        "checks": checks,
        "summary": summary,
    })
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
