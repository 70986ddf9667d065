"""The ``counterfactual`` study under the smoke profile (tiny-llama, a handful of masks):
its files, and every stored number recomputed from what it stored — the LDS by the lines of
numpy of the module docstring, the noise ceiling, leave-top-k-out from the stored retrained
losses, scores files by their SHA-256 — and the scores it computed outside the run equal to
the attribute stage's, its Acc/Cover to the evaluate stage's.

Needs ``$LLM_INFLUENCE_DATA`` (skipped otherwise).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from llm_influence.attribute import AttributeArgs, attribute, read_scores
from llm_influence.evaluation import counterfactual as cf
from llm_influence.evaluation.run_metrics import evaluate_run
from llm_influence.io_utils import sha256_file
from llm_influence.studies import available_studies, run_study
from llm_influence.studies.counterfactual import _label as cf_label

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("counterfactual")
    run_study("counterfactual", "smoke", out, data_dir=data_dir)
    return out, json.loads((out / "counterfactual.json").read_text())


def test_files_and_registration(smoke):
    out, record = smoke
    assert "counterfactual" in available_studies()
    assert record["figures"] == ["counterfactual.png"] and (out / "counterfactual.png").read_bytes()[:8] == PNG_MAGIC
    md = (out / "counterfactual.md").read_text()
    assert "](counterfactual.png)" in md and "noise ceiling" in md
    data = record["data"]
    assert [t["task"] for t in data["tasks"]] == ["mixed-small", "backdoor-1"]
    for t in data["tasks"]:
        assert set(data["options"]["methods"]) <= set(t["methods"])
        assert t["full_mask_check"] == {"adapter_bitwise_equal": True, "test_losses_equal": True}
        masks = np.array(t["lds"]["masks"])
        assert masks.shape == (4, t["n_train"]) and (masks.sum(axis=1) == t["subset_size"]).all()
        assert np.array(t["lds"]["losses"]).shape == (4, t["n_test"])
        assert np.array(t["lds"]["noise_losses"]).shape == (2, t["n_test"]) and t["noise_seed"] == t["train_seed"] + 1
        for m, e in t["methods"].items():
            # relative to the study folder, so the JSON survives copying runs/cpu to results/cpu
            assert not Path(e["scores"]["path"]).is_absolute()
            assert sha256_file(out / e["scores"]["path"]) == e["scores"]["sha256"]
            assert e["lds"]["lds"] is None or -1.0 <= e["lds"]["lds"] <= 1.0
            assert f"| {cf_label(m)} |" in md
    assert data["tasks"][0]["leave_top_k_out"] is not None and data["tasks"][1]["leave_top_k_out"] is None


def _docstring_code() -> str:
    block = cf.__doc__.split("these lines of numpy (what :func:`lds` computes)::", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


def test_docstring_lines_recompute_the_stored_lds(smoke, monkeypatch):
    out, record = smoke
    monkeypatch.chdir(out)
    code = _docstring_code()
    assert "np.nanmean(rho)" in code
    for t_index, t in enumerate(record["data"]["tasks"]):
        for method, e in t["methods"].items():
            namespace: dict = {}
            exec(code.replace('["tasks"][0]', f'["tasks"][{t_index}]').replace('["datainf"]', f'[{method!r}]')
                 .replace('Path("results/cpu/counterfactual.json")', 'Path("counterfactual.json")'),
                 namespace)
            stored = e["lds"]["lds"]
            assert (np.isnan(namespace["lds"]) if stored is None else namespace["lds"] == pytest.approx(stored,
                                                                                                      abs=1e-12))
            per_test = [np.nan if v is None else v for v in e["lds"]["per_test"]]
            np.testing.assert_allclose(namespace["rho"], per_test, atol=1e-12)
        # the noise ceiling as the docstring describes it
        losses = np.array(t["lds"]["losses"])
        rho = cf.spearman_columns(losses[t["lds"]["noise_masks"]], np.array(t["lds"]["noise_losses"]))
        nc = t["lds"]["noise_ceiling"]
        assert (nc["lds"] is None and np.isnan(rho).all()) or np.nanmean(rho) == pytest.approx(nc["lds"], abs=1e-12)


def test_leave_out_and_tail_patch_recomputed(smoke):
    out, record = smoke
    t = record["data"]["tasks"][0]
    base = np.array(t["base_losses"])
    lo = t["leave_top_k_out"]
    retrained = {tuple(r["removed"]): np.array(r["losses"]) for r in lo["retrains"]}
    for k, e in lo["k"].items():
        rand = np.mean([[retrained[tuple(rows)][j] - base[j] for j in lo["tests"]] for rows in e["random"]["removed"]],
                       axis=0)
        np.testing.assert_allclose(e["random"]["delta"], rand, rtol=0, atol=0)
        for m, me in e["methods"].items():
            assert len(me["removed"]) == len(lo["tests"]) and all(len(rows) == int(k) for rows in me["removed"])
            delta = [retrained[tuple(rows)][j] - base[j] for rows, j in zip(me["removed"], lo["tests"])]
            assert me["delta"] == delta
            assert me["vs_random_mean"] == pytest.approx(np.mean(np.array(delta) - rand), abs=1e-15)
            # the removed rows are the method's top-k for that test example
            scores = load_file(out / t["methods"][m]["scores"]["path"])["scores"]
            assert me["removed"] == [sorted(cf.top_k(scores[j], int(k))) for j in lo["tests"]]
    tp = t["tail_patch"]
    assert tp["lr"] > 0 and len(tp["before"]) == len(tp["tests"])



def test_missing_scores_equal_the_attribute_stage_and_acc_cover_its_evaluation(smoke):
    """The smoke runs have no scores of their own: the study scored every method outside the
    run. The attribute stage run afterwards gives the same matrices, and evaluate the same
    Acc/Cover."""
    out, record = smoke
    t = record["data"]["tasks"][0]
    methods = tuple(record["data"]["options"]["methods"])
    for m in methods:
        assert (out / t["methods"][m]["scores"]["path"]).parent == out / "counterfactual-scores" / t["task"]
    assert not (Path(t["run_dir"]) / "scores").exists()
    attribute(t["run_dir"], AttributeArgs(methods=methods, checkpoint=t["checkpoint"]))
    metrics = evaluate_run(t["run_dir"])["checkpoints"][t["checkpoint"]]
    for m in methods:
        ours, _ = read_scores(out / t["methods"][m]["scores"]["path"])
        theirs, _ = read_scores(Path(t["run_dir"]) / "scores" / t["checkpoint"] / f"{m}.safetensors")
        assert torch.equal(ours, theirs), m
        e = t["methods"][m]
        assert (e["acc"], e["cover"]) == (metrics[m]["acc"], metrics[m]["cover"])


def test_a_rerun_reads_every_subset_retrain_from_the_cache(smoke, tmp_path, data_dir):
    """Run again on a copy of the study's folder (runs, scores, retrain cache): every LDS,
    noise and leave-out retrain is a cache hit, the losses and LDS are bitwise the first
    run's, and the recorded retrain seconds are the first run's measured ones."""
    import shutil

    out, record = smoke
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    run_study("counterfactual", "smoke", copy, data_dir=data_dir, tasks="mixed-small", n_tail_tests=0,
              check_full_mask=False)
    t_new = json.loads((copy / "counterfactual.json").read_text())["data"]["tasks"][0]
    t_old = record["data"]["tasks"][0]
    assert t_new["cost"]["retrains_from_cache"] == t_new["cost"]["retrains"] == t_old["cost"]["retrains"] > 0
    assert t_new["cost"]["retrain_seconds"] == t_old["cost"]["retrain_seconds"]
    assert t_new["lds"]["losses"] == t_old["lds"]["losses"] and t_new["lds"]["noise_losses"] == t_old["lds"]["noise_losses"]
    assert t_new["leave_top_k_out"]["retrains"] == t_old["leave_top_k_out"]["retrains"]
    for m, e in t_old["methods"].items():
        assert t_new["methods"][m]["lds"] == e["lds"]
