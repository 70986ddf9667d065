"""Study ``model-size``: does parameter change track behaviour change, and how does that
depend on model size? (The paper's Fig. 7.)

Influence functions assume that a training point's effect on the model shows up as a
(small) change of the parameters, and that parameter change maps to behaviour change. This
study checks the second half on two-layer **linear** MNIST classifiers of growing width:

    logits = W2 (W1 x) + b2,     W1 [h, F], W2 [10, h], b2 [10],     F input pixels,

with hidden widths ``h`` (``cpu``/``paper``: 16, 64, 256, 1024; ``smoke``: 4, 8, 16, 32), no
nonlinearity (the paper's "two-layer linear" model).

Initialisation ("zero-initialised"). If both ``W1`` and ``W2`` start at zero, both gradients
are zero forever (``dL/dW2 = e (W1 x)^T = 0`` and ``dL/dW1 = W2^T e x^T = 0``): nothing but the
bias would learn. So, as LoRA does with its ``B`` matrix, the output side is zero: ``W2 = 0``
and ``b2 = 0`` (the initial model predicts the uniform distribution, the same function for
every width), and ``W1`` is small seeded Gaussian, entries N(0, 1/F). The first step moves
``W2``; ``W1`` follows once ``W2`` is non-zero.

Training: SGD with momentum 0.9, learning rate ``lr`` (default 0.01), batch size 64, mean
cross-entropy, float32, for ``epochs`` epochs (``cpu``: 10) over a seeded split of the MNIST
test set into training and test parts (``mnist_split``: ``cpu`` 8,000 / 2,000; ``smoke`` 1,000
/ 500 images pooled to 14x14). Every width uses the same data order (a seeded shuffle per
epoch) and its own seeded initialisation.

Recorded after every epoch ``t`` (and at ``t = 0``): the parameter change
``||theta_t - theta_0||`` (L2 over all of ``W1, W2, b2``), its normalised version
``||theta_t - theta_0|| / max_s ||theta_s - theta_0||`` (in [0, 1]; the max is usually the last
epoch), the test accuracy and test loss (nats), and the training loss (mean over the epoch's
batches). Per width: the Pearson correlation between the normalised parameter change and
the test accuracy over epochs ``1..E`` (``pearson``; epoch 0 is left out because every
model starts at zero change and chance accuracy, which would inflate every correlation),
the same including epoch 0 (``pearson_with_init``), and the correlation with the test loss
(``pearson_loss``). Pearson is invariant to the normalisation, which only puts widths on one
axis in the figure.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..data.mnist import N_CLASSES, load_mnist, mnist_split
from ..progress import log
from ._linear import timed
from .base import StudyResult, markdown_table, new_figure, register_study, resolve_options, save_figure, torch_threads

NAME = "model-size"


def _defaults(profile: str) -> dict[str, Any]:
    smoke = profile == "smoke"
    return {
        "widths": (4, 8, 16, 32) if smoke else (16, 64, 256, 1024),
        "epochs": {"smoke": 4, "cpu": 10, "paper": 20}[profile],
        "n_train": 1_000 if smoke else 8_000,
        "n_test": 500 if smoke else 2_000,
        "pool": 2 if smoke else 1,
        "lr": 0.01,
        "momentum": 0.9,
        "train_batch_size": 64,
        "seed": 0,
        "threads": 1,
    }


class TwoLayerLinear(torch.nn.Module):
    """``logits = W2 (W1 x) + b2`` (float32); ``W2``, ``b2`` zero and ``W1`` ~ N(0, 1/F) seeded."""

    def __init__(self, n_inputs: int, width: int, n_classes: int = N_CLASSES, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        self.W1 = torch.nn.Parameter(torch.randn(width, n_inputs, generator=gen) / math.sqrt(n_inputs))
        self.W2 = torch.nn.Parameter(torch.zeros(n_classes, width))
        self.b2 = torch.nn.Parameter(torch.zeros(n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.W1.T) @ self.W2.T + self.b2

    def flat(self) -> torch.Tensor:
        """``[P]`` float64 copy of all parameters (``W1, W2, b2`` flattened, in that order)."""
        return torch.cat([p.detach().reshape(-1).double() for p in (self.W1, self.W2, self.b2)])


def _evaluate(model: TwoLayerLinear, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(X)
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        acc = float((logits.argmax(dim=1) == y).float().mean())
    return acc, loss


def _pearson(a: list[float], b: list[float]) -> Optional[float]:
    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a_) < 2 or a_.std() == 0 or b_.std() == 0:
        return None  # undefined for a constant series
    return float(np.corrcoef(a_, b_)[0, 1])


def train_width(width: int, Xtr: torch.Tensor, ytr: torch.Tensor, Xte: torch.Tensor, yte: torch.Tensor,
                opts: dict[str, Any]) -> dict[str, Any]:
    """Train one width and return its per-epoch series (module docstring); JSON-serialisable."""
    seed = int(opts["seed"])
    model = TwoLayerLinear(Xtr.shape[1], width, seed=seed + width)
    theta0 = model.flat()
    opt = torch.optim.SGD(model.parameters(), lr=float(opts["lr"]), momentum=float(opts["momentum"]))
    order_gen = torch.Generator().manual_seed(seed)
    bs = int(opts["train_batch_size"])
    acc, loss = _evaluate(model, Xte, yte)
    change, accs, losses, train_losses = [0.0], [acc], [loss], [None]
    for _ in range(int(opts["epochs"])):
        perm = torch.randperm(Xtr.shape[0], generator=order_gen)
        total, batches = 0.0, 0
        for start in range(0, Xtr.shape[0], bs):
            idx = perm[start:start + bs]
            opt.zero_grad(set_to_none=True)
            batch_loss = torch.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            batch_loss.backward()
            opt.step()
            total += float(batch_loss.detach())
            batches += 1
        acc, loss = _evaluate(model, Xte, yte)
        change.append(float(torch.linalg.vector_norm(model.flat() - theta0)))
        accs.append(acc)
        losses.append(loss)
        train_losses.append(total / batches)
    top = max(change)
    normalised = [c / top if top > 0 else 0.0 for c in change]
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "width": width,
        "n_params": n_params,
        "epochs": list(range(len(change))),
        "param_change": change,
        "param_change_normalised": normalised,
        "theta0_norm": float(torch.linalg.vector_norm(theta0)),
        "test_accuracy": accs,
        "test_loss": losses,
        "train_loss": train_losses,
        "pearson": _pearson(normalised[1:], accs[1:]),
        "pearson_with_init": _pearson(normalised, accs),
        "pearson_loss": _pearson(normalised[1:], losses[1:]),
    }


def _figure(results: list[dict], path: Path, profile: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    k = len(results)
    fig, axes = new_figure(1, k, figsize=(3.2 * k, 3.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        ax.plot(r["epochs"], r["param_change_normalised"], "o-", color="#1f77b4", label="param change (norm.)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        twin = ax.twinx()
        twin.plot(r["epochs"], r["test_accuracy"], "s--", color="#d62728", label="test accuracy")
        twin.set_ylim(0, 1)
        pearson = "—" if r["pearson"] is None else f"{r['pearson']:.3f}"
        ax.set_title(f"width {r['width']} ({r['n_params']:,} params)\nPearson = {pearson}", fontsize=9)
        if ax is axes[0][0]:
            ax.set_ylabel("||θ_t − θ_0|| / max", color="#1f77b4")
        if ax is axes[0][-1]:
            twin.set_ylabel("test accuracy", color="#d62728")
    fig.suptitle(f"Parameter change vs behaviour change by model size (profile {profile})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _markdown(results: list[dict], opts: dict, fig_name: str, n_inputs: int) -> str:
    rows = [[r["width"], r["n_params"], r["test_accuracy"][-1], r["param_change"][-1], r["pearson"],
             r["pearson_with_init"], r["pearson_loss"]] for r in results]
    return "\n".join([
        "## Parameter change vs behaviour change by model size (paper: Fig. 7)",
        "",
        f"Two-layer linear MNIST classifiers, logits = W2 (W1 x) + b2 with {n_inputs} inputs, "
        f"trained with SGD (lr {opts['lr']}, momentum {opts['momentum']}, batch {opts['train_batch_size']}) for "
        f"{opts['epochs']} epochs on {opts['n_train']:,} images of the MNIST test split, tested on "
        f"{opts['n_test']:,} others. W2 and b2 start at zero (the initial model is uniform for every "
        "width; both matrices at zero would never learn) and W1 ~ N(0, 1/F). "
        "Parameter change = ||theta_t - theta_0|| over all parameters, normalised by its maximum over "
        "epochs. Pearson = correlation between that and test accuracy over epochs 1..E "
        "(epoch 0 left out; 'with init' includes it); 'Pearson (loss)' uses the test loss.",
        "",
        markdown_table(["hidden width", "params", "final test acc", "final ‖Δθ‖", "Pearson",
                        "Pearson (with init)", "Pearson (loss)"], rows),
        "",
        f"![Normalised parameter change and test accuracy per epoch, one panel per width]({fig_name})",
        "",
    ])


@register_study(NAME, "Fig. 7: parameter change vs test accuracy over training for two-layer linear MNIST "
                      "models of four widths")
def model_size_study(profile: str, out_dir: Path, data_dir: Optional[Path], options: dict) -> StudyResult:
    """Run the model-size study (module docstring) and write ``model-size.png``.

    Options (defaults depend on the profile): ``widths``, ``epochs``, ``n_train``, ``n_test``,
    ``pool`` (MNIST average pooling), ``lr``, ``momentum``, ``train_batch_size``, ``seed``,
    ``threads`` (torch intra-op threads, default 1: robust to a shared machine and as fast here;
    0 = leave torch's setting).
    """
    opts = resolve_options(NAME, options, _defaults(profile))
    with torch_threads(int(opts["threads"]) or None) as threads:
        images, labels = load_mnist(data_dir, pool=int(opts["pool"]))
        (Xtr, ytr), (Xte, yte) = mnist_split(images, labels, [int(opts["n_train"]), int(opts["n_test"])],
                                             seed=int(opts["seed"]))
        results = []
        for width in opts["widths"]:
            log(f"model-size: width {width}")
            r, seconds = timed(lambda: train_width(int(width), Xtr, ytr, Xte, yte, opts))
            r["seconds"] = seconds
            results.append(r)
    fig = _figure(results, out_dir / f"{NAME}.png", profile)
    data = {
        "options": opts,
        "torch_threads": threads,
        "n_inputs": int(Xtr.shape[1]),
        "conventions": {
            "param_change": "||theta_t - theta_0||_2 over W1, W2, b2 after epoch t (t = 0: before training)",
            "param_change_normalised": "param_change / max over epochs",
            "pearson": "Pearson(param_change_normalised, test_accuracy) over epochs 1..E",
            "pearson_with_init": "the same over epochs 0..E",
            "pearson_loss": "Pearson(param_change_normalised, test_loss) over epochs 1..E",
            "init": "W2 = 0, b2 = 0, W1 ~ N(0, 1/F) seeded with seed + width",
        },
        "widths": results,
    }
    return StudyResult(NAME, data, [fig], _markdown(results, opts, fig.name, int(Xtr.shape[1])))
