"""Study ``trainable-params``: does attribution get better when LoRA trains fewer parameters,
and does it matter where they sit? (The paper's Fig. 8.)

The fewer parameters an influence estimate has to invert over, the better its Hessian
approximations should behave; and the paper asks whether the layers closer to the input or
to the output carry the attribution signal. For one task (default ``mixed-small``) the study
fine-tunes the same data with LoRA (the profile's ``r``, ``alpha``, targets ``q_proj``/``v_proj``)
restricted to a subset of the ``L`` decoder layers (:class:`LoraSpec` ``layers=``):

* **count** configurations: every ``s``-th layer ``0, s, 2s, ...`` for ``s`` in ``strides``
  (default 1, 2, 4: all ``L``, half ``ceil(L/2)``, a quarter ``ceil(L/4)`` of the layers, spread
  over the whole depth so that only the number changes);
* **depth** configurations: the layers split into ``depth_parts`` contiguous parts (default 3:
  early, middle, late thirds; ``numpy.array_split``, so the first parts get one extra layer
  when ``L`` is not divisible; empty parts, possible only when ``L < depth_parts``, are left
  out).

Configurations with the same layer set share one run. For each run it scores the last
checkpoint with DataInf and GradSim (attribute-stage defaults, damping ratio 0.1) and
records Acc and Cover (in [0, 1]), the number of LoRA parameters (sum over adapted modules
of ``r (in + out)``), and the final training/validation loss (nats).

Sizes: ``smoke`` and ``paper`` use the profile's ``mixed-small`` settings (so the all-layer run
is the one ``reproduce`` made and is reused, option ``runs``); ``cpu`` uses its own smaller
subset so six SmolLM2 fine-tunes fit a few minutes: 10 harmful + 10 benign training rows,
20 harmful test rows, 4 epochs at batch 4 (20 steps, as many as the profile's 40-row run
takes), the profile's lr and 96-token sequences. Estimated 5-6 minutes on 2 cores (about 80
training example-passes and 40 feature examples per configuration, at the measured ~3 and
~2 examples/s).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import get_profile
from ..errors import UserError
from ..models.registry import load_model
from ..progress import log
from .base import (StudyResult, markdown_table, new_figure, register_study, resolve_options, save_figure,
                   with_interval)
from .llm_runs import epoch_log, method_spec, profile_task_run, score_checkpoint
from .parameter_change import LoraDelta

NAME = "trainable-params"
LABELS = {"datainf": "DataInf", "gradsim": "GradSim"}
DEPTH_NAMES = {3: ("early", "middle", "late")}


def _defaults(profile: str) -> dict[str, Any]:
    cpu = profile == "cpu"
    return {
        "task": "mixed-small",
        "methods": ("datainf", "gradsim"),
        "strides": (1, 2, 4),
        "depth_parts": 3,
        "train_per_group": 10 if cpu else 0,  # 0 = the profile's setting for the task
        "test_per_group": 20 if cpu else 0,
        "epochs": 4 if cpu else 0,
        "train_batch_size": 4 if cpu else 0,
        "damping_ratio": 0.1,
        "rank_by": "score",
        "runs": "",
    }


def n_decoder_layers(model_name: str) -> int:
    """``num_hidden_layers`` of the model's config (loads the model once; seconds)."""
    model, _, _ = load_model(model_name)
    n = int(model.config.num_hidden_layers)
    del model
    return n


def layer_configs(n_layers: int, strides: tuple[int, ...], depth_parts: int) -> list[dict[str, Any]]:
    """``[{"label", "kind", "layers"}]``: every ``s``-th layer for each stride (kind ``count``),
    then the contiguous parts of the depth (kind ``depth``; empty parts skipped)."""
    if n_layers < 1:
        raise UserError(f"study {NAME!r}: the model has no decoder layers")
    if not strides or any(int(s) < 1 for s in strides) or depth_parts < 1:
        raise UserError(f"study {NAME!r}: strides and depth_parts must be positive integers")
    out = []
    for s in strides:
        s = int(s)
        label = "all" if s == 1 else f"every {s}"
        out.append({"label": label, "kind": "count", "layers": list(range(0, n_layers, s))})
    names = DEPTH_NAMES.get(depth_parts)
    for i, part in enumerate(np.array_split(np.arange(n_layers), depth_parts)):
        if len(part):
            label = names[i] if names else f"part {i + 1}/{depth_parts}"
            out.append({"label": label, "kind": "depth", "layers": [int(x) for x in part]})
    return out


def _run_config(cfg: dict, n_layers: int, profile: str, out_dir: Path, data_dir: Optional[Path],
                opts: dict) -> dict[str, Any]:
    prof = get_profile(profile)
    layers = tuple(cfg["layers"])
    lora = None if len(layers) == n_layers else replace(prof.lora, layers=layers)
    train = {field: int(opts[key]) for key, field in (("epochs", "epochs"), ("train_batch_size", "batch_size"))
             if int(opts[key])}
    tr = profile_task_run(NAME, opts["task"], profile, out_dir, data_dir, opts["runs"] or None, lora=lora,
                          train=train or None, train_per_group=int(opts["train_per_group"]) or None,
                          test_per_group=int(opts["test_per_group"]) or None,
                          tag="layers-" + ("all" if lora is None else "-".join(str(x) for x in layers)))
    checkpoint = tr.run.resolve_checkpoints("last")[0]
    specs = [(m, *method_spec(m, float(opts["damping_ratio"]))) for m in opts["methods"]]
    scored = score_checkpoint(tr.run, checkpoint, specs, rank_by=opts["rank_by"])
    delta = LoraDelta.from_adapter(tr.run.checkpoints_root / checkpoint)
    n_params = sum(A.numel() + B.numel() for A, B in delta.factors.values())
    losses = epoch_log(tr.run)
    return {**tr.info(), "checkpoint": checkpoint, "n_lora_params": int(n_params),
            "n_lora_modules": len(delta.factors),
            "final_train_loss": losses[-1]["train_loss"] if losses else None,
            "final_val_loss": losses[-1]["val_loss"] if losses else None,
            "methods": {m: {k: s[k] for k in ("acc", "cover", "acc_ci95", "cover_ci95", "seconds", "diagnostics")}
                        for m, s in scored.items()}}


def _figure(configs: list[dict], methods: list[str], path: Path, profile: str, task: str, n_layers: int) -> Path:
    fig, axes = new_figure(1, 2, figsize=(9.0, 3.4), squeeze=False)
    colors = {"datainf": "#1f77b4", "gradsim": "#d62728"}
    count = sorted((c for c in configs if c["kind"] == "count" and c["same_run_as"] is None),
                   key=lambda c: c["n_layers"])
    depth = [c for c in configs if c["kind"] == "depth"]
    ax = axes[0][0]
    for m in methods:
        ax.plot([c["n_layers"] for c in count], [c["methods"][m]["acc"] for c in count], "o-",
                color=colors.get(m), label=f"{LABELS.get(m, m)} Acc")
        ax.plot([c["n_layers"] for c in count], [c["methods"][m]["cover"] for c in count], "s--",
                color=colors.get(m), alpha=0.6, label=f"{LABELS.get(m, m)} Cover")
    ax.set_xticks(sorted({c["n_layers"] for c in count}))
    ax.set_xlabel(f"decoder layers with LoRA (of {n_layers}, evenly spread)")
    ax.set_ylabel("Acc / Cover")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("number of LoRA layers", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(depth))
    for i, m in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, [c["methods"][m]["acc"] for c in depth], width,
               color=colors.get(m), label=f"{LABELS.get(m, m)} Acc")
    full = next((c for c in configs if c["label"] == "all"), None)
    if full is not None:
        for m in methods:
            ax.axhline(full["methods"][m]["acc"], color=colors.get(m), linestyle=":", alpha=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{c['label']}\n(layers {_layers_text(c['layers'])})" for c in depth], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_title("depth of the LoRA layers (dotted: all layers)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"Fig. 8: attribution vs trainable parameters on {task} (profile {profile})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _layers_text(layers: list[int]) -> str:
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(str(x) for x in layers)


def _markdown(configs: list[dict], methods: list[str], opts: dict, fig_name: str, profile: str,
              n_layers: int) -> str:
    head = ["config", "layers", "#layers", "LoRA params"] + [f"{LABELS.get(m, m)} {x}" for m in methods
                                                             for x in ("Acc", "Cover")] + ["train loss", "val loss"]
    rows = [[c["label"], _layers_text(c["layers"]), c["n_layers"], c["n_lora_params"]]
            + [with_interval(c["methods"][m], x) for m in methods for x in ("acc", "cover")]
            + [c["final_train_loss"], c["final_val_loss"]] for c in configs]
    first = configs[0]
    return "\n".join([
        "## Attribution vs trainable parameters (paper: Fig. 8)",
        "",
        f"{opts['task']} ({first['n_train']} train / {first['n_test']} test, profile {profile}) fine-tuned with "
        f"LoRA on a subset of the model's {n_layers} decoder layers: every s-th layer (s = "
        f"{', '.join(str(s) for s in opts['strides'])}; only the number changes) and contiguous parts of the depth "
        f"({opts['depth_parts']} parts). Acc/Cover of {', '.join(LABELS.get(m, m) for m in methods)} at the last "
        "checkpoint, in [0, 1], with the 95 % bootstrap interval over test examples in brackets; losses are the "
        "final epoch's (nats; validation on the run's validation subset).",
        "",
        markdown_table(head, rows),
        "",
        f"![Acc against the number of LoRA layers (left) and per depth (right)]({fig_name})",
        "",
    ])


@register_study(NAME, "Fig. 8: DataInf/GradSim Acc with LoRA on all/half/quarter of the layers and on "
                      "early/middle/late thirds")
def trainable_params_study(profile: str, out_dir: Path, data_dir: Optional[Path], options: dict) -> StudyResult:
    """Run the trainable-parameters study (module docstring) and write ``trainable-params.png``.

    Options: ``task``, ``methods`` (default ``datainf,gradsim``), ``strides`` (every s-th layer,
    default ``1,2,4``), ``depth_parts`` (3), ``train_per_group``, ``test_per_group``, ``epochs``,
    ``train_batch_size`` (0 = the profile's; ``cpu``: 10, 20, 4, 4), ``damping_ratio``, ``rank_by``,
    ``runs`` (a directory of ``reproduce`` runs to reuse; default ``OUT/runs``).
    """
    opts = resolve_options(NAME, options, _defaults(profile))
    methods = list(opts["methods"])
    n_layers = n_decoder_layers(get_profile(profile).model)
    configs = layer_configs(n_layers, tuple(int(s) for s in opts["strides"]), int(opts["depth_parts"]))
    done: dict[tuple[int, ...], dict[str, Any]] = {}
    results = []
    for cfg in configs:
        key = tuple(cfg["layers"])
        if key not in done:
            log(f"{NAME}: {cfg['label']} (layers {_layers_text(cfg['layers'])})")
            done[key] = _run_config(cfg, n_layers, profile, out_dir, data_dir, opts)
            same = None
        else:
            same = next(r["label"] for r in results if tuple(r["layers"]) == key)
        results.append({**cfg, "n_layers": len(cfg["layers"]), "same_run_as": same, **done[key]})
    fig = _figure(results, methods, out_dir / f"{NAME}.png", profile, opts["task"], n_layers)
    data = {
        "options": opts,
        "n_decoder_layers": n_layers,
        "conventions": {
            "acc": "fraction of test examples whose top-ranked training example is relevant (same group), [0, 1]",
            "cover": "mean over test examples of (#relevant among top k) / k, k = #relevant in train, [0, 1]",
            "n_lora_params": "sum over adapted modules of r * (in + out) (LoRA A and B entries)",
            "count": "every s-th decoder layer 0, s, 2s, ... (s in strides)",
            "depth": "numpy.array_split of 0..L-1 into depth_parts contiguous parts",
        },
        "configs": results,
    }
    return StudyResult(NAME, data, [fig], _markdown(results, methods, opts, fig.name, profile, n_layers))
