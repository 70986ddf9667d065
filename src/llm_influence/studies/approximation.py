"""Study ``approximation``: how far are the influence approximations from exact influence?
(The paper's Table 5 and Fig. 3.)

Model. A linear softmax classifier (10 classes, :class:`~llm_influence.linear.SoftmaxRegression`,
float64) on a handful of MNIST images (the MNIST test split, :func:`~llm_influence.data.mnist.
load_mnist`), trained to convergence on the mean cross-entropy plus an L2 term,

    L(W) = (1/n) sum_i l_i(W) + (mu/2) ||W||^2,       mu = ``l2`` (default 0.01),

by Newton-CG to a gradient max-abs entry <= 1e-10, so ``H + mu I`` (``H`` the Hessian of the
data term) is positive definite. Settings of the ``cpu`` and ``paper`` profiles, matching the
paper's three:

1. 10 training points, 784 pixels + bias -> ``10 x 785 = 7,850`` parameters (~1e4);
2. 10 training points, 10,000 random ReLU features + bias -> ``10 x 10,001 = 100,010``
   parameters (~1e5);
3. 20 training points, the same 100,010-parameter model.

The random features are ``phi(x) = sqrt(2/k) max(0, R x)`` with a seeded ``R`` ``[k, 784]``
of i.i.d. N(0, 1) entries (:func:`._linear.random_relu_features`): norm-preserving in
expectation, so the inputs keep the pixels' scale. (Up-sampling the images 2x would give
only 3,136 inputs, about 3e4 parameters.) The ``smoke`` profile uses 14x14 pooled pixels
(196 + bias -> 1,970 parameters) and 300 random features (3,010 parameters), with the same
10 / 10 / 20 training points.

Data: one seeded permutation of the 10,000 MNIST test images (``mnist_split`` with sizes
``[n_test, n_train]``); the first ``n_test`` rows are the test points of every setting and
the next rows the training points, so the 10-point training set is contained in the
20-point one.

Influence vector. For test point ``t`` with gradient ``v_t`` and training gradients ``g_i``
(``[C, F]`` each, per-example losses in nats), the influence vector is
``s_t = (s_t1, ..., s_tn)`` with ``s_ti = v_t^T P g_i`` (higher = training point ``i`` helped
``t`` more; the package's score convention), ``P`` each method's (approximate) inverse.

Damping. The approximate methods (DataInf, LiSSA, EK-FAC, and "Exact (Gauss-Newton)") use
the paper's rule, one block (the weight matrix): ``lambda = damping_ratio * mean_i mean_k
g_ik^2`` with ``damping_ratio = 0.1`` (:func:`~llm_influence.methods.block_damping`), and the
empirical Gauss-Newton matrix ``G = (1/n) sum_j g_j g_j^T`` of the data term; they do not see
``mu``. GradSim uses the identity.

References ("exact"), all solved in float64:

* ``exact`` (the table's reference): ``P = (H + mu I + lambda I)^{-1}``, the true Hessian of the
  regularised objective plus the *same* damping ``lambda`` the approximations use, so the
  error measures how well each method approximates the same damped quantity. It is computed
  with the explicit Hessian and Cholesky where ``C F <= explicit_max_params`` and by conjugate
  gradient with Hessian-vector products (relative residual <= ``cg_tol`` = 1e-10) always; where
  both run, their relative difference is recorded (``explicit_vs_cg``) and the explicit one
  is the reference.
* ``exact-undamped``: ``P = (H + mu I)^{-1}``, the classical influence function of the trained
  model (CG); it is checked against leave-one-out retraining (``loo_pearson``). Because the
  paper's ``lambda`` is tiny next to ``mu`` here, it is almost equal to ``exact``
  (``undamped_vs_damped`` records the distance).
* ``exact-gauss-newton``: ``P = (G + lambda I)^{-1}`` (the registered ``exact`` method), the
  quantity DataInf, LiSSA and EK-FAC literally approximate; errors against it isolate the
  algorithms' own approximation from the Hessian-vs-Gauss-Newton gap.

Error. For each test point, the L2 distance between the method's influence vector and the
reference's, both normalised to unit length (so in ``[0, 2]``; 0 = same ranking and
proportions, ``sqrt(2)`` = orthogonal), averaged over the ``n_test`` test points (default 20 in
``cpu``, 10 in ``smoke``, 100 in ``paper``).

EK-FAC runs on the gradients expressed in an orthonormal basis of the training inputs' span
(:func:`._linear.input_span_features`) with the damping ``lambda`` of the full gradients: its
scores are exactly those of EK-FAC on the full ``[F, F]`` input covariance (whose
eigendecomposition would take hours at ``F = 10,001``), and its time includes the basis.

Time. Seconds of ``fit`` + ``score`` for all test points on this machine (per-example gradients
excluded: every method shares them); the exact solves are timed the same way (Hessian build
+ Cholesky + solves, or all CG solves).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..data.mnist import N_CLASSES, load_mnist
from ..linear import BLOCK, SoftmaxRegression, with_bias
from ..methods import block_damping, make_method
from ..progress import log
from ._linear import (cg_solve, explicit_solve, fit_newton_cg, input_span_features, normalised_distance,
                      random_relu_features, timed)
from .base import (StudyResult, markdown_table, new_figure, register_study, resolve_options, save_figure,
                   torch_threads)

NAME = "approximation"


@dataclass(frozen=True)
class Setting:
    """One model size. ``inputs``: ``"pixels"`` (``28/pool`` squared, average-pooled) or
    ``"relu"`` (``n_features`` random ReLU features of the 784 pixels); a bias is appended."""

    key: str
    n_train: int
    inputs: str
    pool: int = 1
    n_features: int = 0
    paper: str = ""

    @property
    def n_inputs(self) -> int:
        return (28 // self.pool) ** 2 if self.inputs == "pixels" else self.n_features

    @property
    def n_params(self) -> int:
        return N_CLASSES * (self.n_inputs + 1)

    def describe(self) -> str:
        what = (f"{self.n_inputs} pixels" if self.inputs == "pixels"
                else f"{self.n_features:,} random ReLU features")
        return f"{self.n_train} points, {what} + bias, {self.n_params:,} params"

    def short(self) -> str:
        """A two-line label for figures."""
        what = f"{self.n_inputs} pixels" if self.inputs == "pixels" else f"{self.n_features:,} ReLU features"
        return f"{self.n_train} points, {self.n_params:,} params\n({what} + bias)"


PAPER_SETTINGS = ("10 points, ~1e4 params", "10 points, ~1e5 params", "20 points, ~1e5 params")

_FULL = (Setting("n10-p1e4", 10, "pixels", pool=1, paper=PAPER_SETTINGS[0]),
         Setting("n10-p1e5", 10, "relu", n_features=10_000, paper=PAPER_SETTINGS[1]),
         Setting("n20-p1e5", 20, "relu", n_features=10_000, paper=PAPER_SETTINGS[2]))
_SMOKE = (Setting("n10-p2e3", 10, "pixels", pool=2, paper=PAPER_SETTINGS[0]),
          Setting("n10-p3e3", 10, "relu", n_features=300, paper=PAPER_SETTINGS[1]),
          Setting("n20-p3e3", 20, "relu", n_features=300, paper=PAPER_SETTINGS[2]))
SETTINGS = {"smoke": _SMOKE, "cpu": _FULL, "paper": _FULL}

# The paper's Table 5 (seconds on its GPU machine; errors are normalised L2 distances).
PAPER_TIME = {"exact": (46.28, 232.79, 879.61), "datainf": (0.06, 0.30, 2.34)}
PAPER_ERROR = {
    "datainf": (0.199, 0.277, 0.519),
    "lissa-1": (0.209, 0.292, 0.521),
    "lissa-5": (0.168, 0.232, 0.478),
    "lissa-10": (0.124, 0.171, 0.431),
    "gradsim": (0.221, 0.308, 0.533),
}

REFERENCES = ("exact", "exact-undamped", "exact-gauss-newton")


def _defaults(profile: str) -> dict[str, Any]:
    return {
        "n_test": {"smoke": 10, "cpu": 20, "paper": 100}[profile],
        "l2": 0.01,
        "damping_ratio": 0.1,
        "lissa_iterations": (1, 5, 10),
        "explicit_max_params": {"smoke": 2_000, "cpu": 8_000, "paper": 8_000}[profile],
        "cg_tol": 1e-10,
        "loo": True,
        "seed": 0,
        "threads": 1,
    }


def method_specs(lissa_iterations: tuple[int, ...], damping_ratio: float) -> list[tuple[str, str, str, dict]]:
    """``[(key, label, registered name, kwargs)]`` of the compared methods, in table order."""
    specs = [("datainf", "DataInf", "datainf", {"damping_ratio": damping_ratio})]
    for it in lissa_iterations:
        specs.append((f"lissa-{it}", f"LiSSA ({it} iter)", "lissa",
                      {"iterations": int(it), "damping_ratio": damping_ratio}))
    specs += [("gradsim", "GradSim", "gradsim", {}),
              ("ekfac", "EK-FAC (extra)", "ekfac", {"damping_ratio": damping_ratio}),
              ("exact-gauss-newton", "Exact Gauss-Newton (extra)", "exact", {"damping_ratio": damping_ratio})]
    return specs


def _inputs(setting: Setting, images: dict[int, torch.Tensor], idx: torch.Tensor, seed: int) -> torch.Tensor:
    if setting.inputs == "pixels":
        X = images[setting.pool][idx].to(torch.float64)
    else:
        X = random_relu_features(images[1][idx], setting.n_features, seed=1_000 + seed)
    return with_bias(X)


def run_setting(setting: Setting, images: dict[int, torch.Tensor], labels: torch.Tensor,
                opts: dict[str, Any]) -> dict[str, Any]:
    """All numbers of one setting (see the module docstring); JSON-serialisable."""
    n_test, mu, seed = int(opts["n_test"]), float(opts["l2"]), int(opts["seed"])
    perm = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    # the same cut as mnist_split(images, labels, [n_test, n_train], seed)
    test_idx, train_idx = perm[:n_test], perm[n_test:n_test + setting.n_train]
    Xtr, ytr = _inputs(setting, images, train_idx, seed), labels[train_idx]
    Xte, yte = _inputs(setting, images, test_idx, seed), labels[test_idx]
    C, F = N_CLASSES, Xtr.shape[1]

    model = SoftmaxRegression(F, C, l2=mu)
    _, train_seconds = timed(lambda: fit_newton_cg(model, Xtr, ytr))
    fit_info = dict(model.fit_info)
    train_f = model.features(Xtr, ytr, kfac=True, hvp=True)
    test_f = model.features(Xte, yte, kfac=False)
    lam = block_damping(train_f, None, float(opts["damping_ratio"]))[BLOCK]
    G = train_f.flat(BLOCK)  # [n, C F]

    # ---- exact references
    (x_cg, cg_diag), cg_seconds = timed(lambda: cg_solve(train_f, test_f, mu, lam, tol=float(opts["cg_tol"])))
    refs: dict[str, torch.Tensor] = {}
    exact_info: dict[str, Any] = {
        "cg_seconds": cg_seconds, "cg_residual_max": cg_diag.get("residual_max"),
        "cg_iterations_max": cg_diag.get("iterations_max"), "cg_converged": cg_diag.get("converged"),
        "explicit_seconds": None, "explicit_vs_cg": None, "explicit_vs_cg_scores": None,
        "solver": "cg",
    }
    scores_cg = x_cg @ G.T
    refs["exact"] = scores_cg
    if setting.n_params <= int(opts["explicit_max_params"]):
        x_exp, exp_seconds = timed(lambda: explicit_solve(model, Xtr, ytr, test_f.flat(BLOCK), lam))
        scores_exp = x_exp @ G.T
        rel = torch.linalg.vector_norm(x_cg - x_exp, dim=1) / torch.linalg.vector_norm(x_exp, dim=1)
        rel_s = torch.linalg.vector_norm(scores_cg - scores_exp, dim=1) / torch.linalg.vector_norm(scores_exp, dim=1)
        exact_info.update(explicit_seconds=exp_seconds, explicit_vs_cg=float(rel.max()),
                          explicit_vs_cg_scores=float(rel_s.max()), solver="explicit")
        refs["exact"] = scores_exp
    (x_und, und_diag), _ = timed(lambda: cg_solve(train_f, test_f, mu, 0.0, tol=float(opts["cg_tol"])))
    refs["exact-undamped"] = x_und @ G.T
    exact_info["undamped_cg_residual_max"] = und_diag.get("residual_max")
    exact_info["undamped_vs_damped"] = float(normalised_distance(refs["exact-undamped"], refs["exact"]).mean())

    # ---- the approximations
    methods: dict[str, Any] = {}
    scores: dict[str, torch.Tensor] = {}
    for key, label, name, kwargs in method_specs(tuple(opts["lissa_iterations"]), float(opts["damping_ratio"])):
        if name == "ekfac":  # exactly equal scores in the span of the training inputs (see _linear)
            method = make_method(name, damping=lam)

            def run_ekfac() -> torch.Tensor:
                tr, te = input_span_features(model, Xtr, ytr, Xte, yte, BLOCK)
                return method.fit(tr).score(te)

            s, seconds = timed(run_ekfac)
        else:
            method = make_method(name, **kwargs)
            s, seconds = timed(lambda: method.fit(train_f).score(test_f))
        scores[key] = s
        methods[key] = {"label": label, "method": name, "arguments": method.arguments(), "seconds": seconds,
                        "residual_vs_gauss_newton": method.diagnostics.get("residual_mean")}
    refs["exact-gauss-newton"] = scores["exact-gauss-newton"]
    for key, entry in methods.items():
        entry["errors"] = {}
        for ref in REFERENCES:
            d = normalised_distance(scores[key], refs[ref])
            entry["errors"][ref] = {"mean": float(d.mean()), "std": float(d.std()) if d.numel() > 1 else 0.0,
                                    "per_test": d.tolist()}
        entry["error"] = entry["errors"]["exact"]["mean"]

    # ---- leave-one-out check of the undamped influence function
    loo: Optional[dict[str, Any]] = None
    if opts["loo"]:
        base = model.per_example_losses(Xte, yte)
        actual = torch.zeros(n_test, setting.n_train, dtype=torch.float64)
        for i in range(setting.n_train):
            w = torch.ones(setting.n_train, dtype=torch.float64)
            w[i] = 0.0
            loo_model = fit_newton_cg(model.copy(), Xtr, ytr, weights=w)
            actual[:, i] = loo_model.per_example_losses(Xte, yte) - base
        predicted = refs["exact-undamped"] / setting.n_train
        loo = {"pearson": float(np.corrcoef(predicted.flatten().numpy(), actual.flatten().numpy())[0, 1]),
               "pairs": int(actual.numel()),
               "convention": "actual = l_test(W without i) - l_test(W) (nats, weight 0, 1/n kept); "
                             "predicted = s_undamped / n"}

    accuracy = float((model.probs(Xte).argmax(dim=1) == yte).double().mean())
    return {
        "setting": {**asdict(setting), "n_inputs": setting.n_inputs, "n_params": setting.n_params,
                    "description": setting.describe(), "short": setting.short()},
        "n_test": n_test,
        "train_labels": ytr.tolist(),
        "l2": mu,
        "damping": lam,
        "train": {**fit_info, "seconds": train_seconds, "test_accuracy": accuracy},
        "exact": exact_info,
        "loo": loo,
        "methods": methods,
    }


def _paper_error(key: str, index: int) -> Optional[float]:
    return PAPER_ERROR[key][index] if key in PAPER_ERROR and index < 3 else None


def _figure(results: list[dict], specs: list[tuple], path: Path, profile: str) -> Path:
    fig, ax = new_figure(figsize=(9.5, 4.2))
    keys = [s[0] for s in specs]
    width = 0.8 / len(keys)
    colors = ["#1f77b4", "#ff7f0e", "#f5a55c", "#d62728", "#2ca02c", "#9467bd", "#7f7f7f"]
    for j, (key, label, _, _) in enumerate(specs):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(results))]
        ax.bar(xs, [r["methods"][key]["error"] for r in results], width, label=label,
               color=colors[j % len(colors)])
        paper = [_paper_error(key, i) for i in range(len(results))]
        px = [x for x, p in zip(xs, paper) if p is not None]
        if px:
            ax.scatter(px, [p for p in paper if p is not None], marker="_", s=180, color="black", zorder=3,
                       label="paper" if j == 0 else None)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([r["setting"]["short"] for r in results], fontsize=8)
    ax.set_ylabel("normalised L2 distance to exact influence")
    ax.set_title(f"Approximation error (profile {profile}; black bars: the paper's Table 5)")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def _markdown(results: list[dict], specs: list[tuple], opts: dict, fig_name: str, profile: str) -> str:
    lines = [
        "## Approximation error of influence methods (paper: Table 5, Fig. 3)",
        "",
        "A linear softmax classifier (10 classes) on MNIST, trained to convergence on the mean "
        f"cross-entropy + (mu/2)||W||^2 with mu = {opts['l2']} (Newton-CG, gradient max-abs <= 1e-10). "
        "Error = L2 distance between a method's influence vector (scores of all training points "
        "for one test point) and the exact one, **both normalised to unit length** (range [0, 2]), "
        f"averaged over **{opts['n_test']} test points**. "
        "Exact = the true Hessian of the regularised objective plus the same damping lambda as the "
        "approximations, (H + mu I + lambda I)^-1, solved with the explicit Hessian (Cholesky) where "
        f"it has <= {opts['explicit_max_params']:,} parameters and otherwise by conjugate gradient "
        f"with Hessian-vector products (relative residual <= {opts['cg_tol']:g}). "
        f"Approximate methods use the paper's damping lambda = {opts['damping_ratio']} x mean squared "
        "gradient entry (one block: the weight matrix) and the empirical Gauss-Newton matrix of the "
        "data loss. The larger models use k seeded random ReLU features sqrt(2/k) max(0, R x) of the "
        "784 pixels (R_jk ~ N(0, 1), norm-preserving) + bias; in the `cpu` and `paper` profiles "
        "k = 10,000 gives 10 x 10,001 = 100,010 parameters (~1e5; 2x up-sampled images would give "
        "only ~3e4). "
        "Times: seconds for fit + scoring all test points on this machine (gradients excluded); "
        "the paper's are on its machine.",
        "",
    ]
    if profile == "smoke":
        lines += ["*Profile `smoke`: tiny settings; the paper's numbers are shown next to the setting "
                  "in the same position, not the same size.*", ""]
    rows = [[r["setting"]["description"], r["damping"], r["train"]["test_accuracy"], r["train"]["grad_max_abs"],
             r["exact"]["solver"], r["exact"]["explicit_seconds"], r["exact"]["cg_seconds"],
             r["exact"]["explicit_vs_cg"], r["exact"]["undamped_vs_damped"],
             None if r["loo"] is None else r["loo"]["pearson"]] for r in results]
    lines += [markdown_table(["setting", "lambda", "test acc", "train grad max", "exact via",
                              "explicit s", "CG s", "explicit vs CG (rel)", "undamped vs damped",
                              "LOO Pearson"], rows), ""]
    rows = []
    for i, r in enumerate(results):
        exact_seconds = r["exact"]["explicit_seconds"] or r["exact"]["cg_seconds"]
        rows.append([f"{r['setting']['description']} (paper: {r['setting']['paper']})",
                     f"Exact (reference, {r['exact']['solver']})", 0.0, None, exact_seconds, PAPER_TIME["exact"][i]])
        for key, label, _, _ in specs:
            m = r["methods"][key]
            rows.append(["", label, m["error"], _paper_error(key, i), m["seconds"],
                         PAPER_TIME.get(key, (None,) * 3)[i]])
    lines += ["### Error against exact influence, ours vs the paper", "",
              markdown_table(["setting", "method", "error (ours)", "error (paper)", "time s (ours)",
                              "time s (paper)"], rows), ""]
    head = ["method"] + [r["setting"]["key"] for r in results]
    rows = [[label] + [r["methods"][key]["errors"]["exact-gauss-newton"]["mean"] for r in results]
            for key, label, _, _ in specs if key != "exact-gauss-newton"]
    lines += ["### Error against the damped Gauss-Newton inverse (G + lambda I)^-1", "",
              "What DataInf, LiSSA and EK-FAC approximate directly: the algorithms' own error, "
              "without the Hessian-vs-Gauss-Newton gap.", "", markdown_table(head, rows), "",
              f"![Approximation error per method and setting]({fig_name})", ""]
    return "\n".join(lines)


@register_study(NAME, "Table 5 / Fig. 3: error of DataInf, LiSSA, GradSim, EK-FAC vs exact influence "
                      "on linear MNIST models")
def approximation_study(profile: str, out_dir: Path, data_dir: Optional[Path], options: dict) -> StudyResult:
    """Run the approximation study (module docstring) and write ``approximation.png``.

    Options (defaults depend on the profile): ``n_test``, ``l2``, ``damping_ratio``,
    ``lissa_iterations``, ``explicit_max_params``, ``cg_tol``, ``loo``, ``seed``, ``threads``
    (torch intra-op threads, default 1: the tensors are small, see :func:`.base.torch_threads`).
    """
    opts = resolve_options(NAME, options, _defaults(profile))
    with torch_threads(opts["threads"]) as threads:
        return _run(profile, out_dir, data_dir, opts, threads)


def _run(profile: str, out_dir: Path, data_dir: Optional[Path], opts: dict, threads: int) -> StudyResult:
    settings = SETTINGS[profile]
    pixels, labels = load_mnist(data_dir, pool=1)
    images = {1: pixels}
    for s in settings:
        if s.inputs == "pixels" and s.pool not in images:
            images[s.pool] = load_mnist(data_dir, pool=s.pool)[0]
    results = []
    for s in settings:
        log(f"approximation: {s.describe()}")
        results.append(run_setting(s, images, labels, opts))
    specs = method_specs(tuple(opts["lissa_iterations"]), float(opts["damping_ratio"]))
    fig = _figure(results, specs, out_dir / f"{NAME}.png", profile)
    data = {
        "options": opts,
        "torch_threads": threads,
        "conventions": {
            "error": "mean over test points of || s/||s|| - r/||r|| || (L2, unit-normalised influence "
                     "vectors over the training points), in [0, 2]",
            "references": {
                "exact": "(H + mu I + lambda I)^-1: true Hessian of the regularised mean loss + the "
                         "approximations' damping (explicit Cholesky where it fits, else CG)",
                "exact-undamped": "(H + mu I)^-1: the classical influence function (CG)",
                "exact-gauss-newton": "(G + lambda I)^-1 with G the empirical Gauss-Newton of the data loss",
            },
            "damping": "lambda = damping_ratio * mean squared per-example gradient entry (one block)",
            "score": "s_ti = v_t^T P g_i, higher = training point i helped test point t more",
            "seconds": "fit + score of all test points on this machine; gradients excluded",
        },
        "methods": [{"key": k, "label": lab, "method": name, "arguments": kw} for k, lab, name, kw in specs],
        "paper": {"settings": list(PAPER_SETTINGS), "error": {k: list(v) for k, v in PAPER_ERROR.items()},
                  "seconds": {k: list(v) for k, v in PAPER_TIME.items()}},
        "settings": results,
    }
    markdown = _markdown(results, specs, opts, fig.name, profile)
    return StudyResult(NAME, data, [fig], markdown)
