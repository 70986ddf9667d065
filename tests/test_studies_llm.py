"""The LLM studies: ``lissa-iterations``, ``convergence``, ``parameter-change``,
``trainable-params``.

Numbers are checked against independent computations: the LoRA parameter change against
explicit ``scaling * B @ A`` matrices (by hand, and through peft's own ``get_delta_weight``
on a saved adapter), the jailbroken decisions against :func:`is_jailbroken` on the recorded
generations, the convergence study's last-epoch Acc/Cover against the attribute + evaluate
stages on the same run. Every study runs under the ``smoke`` profile (tiny-llama) into one
shared output directory, so the task runs are fine-tuned once and reused, as in
``reproduce``. Tests that need the data skip when ``LLM_INFLUENCE_DATA`` is unset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llm_influence.evaluation import asr_summary, is_degenerate, is_jailbroken, load_refusal_strings
from llm_influence.studies import available_studies, run_study
from llm_influence.studies.parameter_change import (LoraDelta, contrast_verdict, delta_distance, distance_matrix,
                                                    heldout_prompts, lora_factors, lora_scaling, score_generations)
from llm_influence.studies.trainable_params import layer_configs

F64 = torch.float64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LLM_STUDIES = ("lissa-iterations", "convergence", "parameter-change", "trainable-params")


def assert_png(path: Path) -> None:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", path
    assert int.from_bytes(head[16:20], "big") > 100 and int.from_bytes(head[20:24], "big") > 100


def in_unit(x) -> bool:
    return x is not None and 0.0 <= x <= 1.0


# ---------------------------------------------------------------------------------------
# ||Delta theta|| against a hand computation (no data, no model)


def _factors(seed: int, shapes: dict[str, tuple[int, int]], r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(r, d_in, generator=gen, dtype=F64), torch.randn(d_out, r, generator=gen, dtype=F64))
            for m, (d_out, d_in) in shapes.items()}


def test_delta_distance_matches_explicit_lora_products():
    shapes = {"model.layers.0.self_attn.q_proj": (6, 5), "model.layers.0.self_attn.v_proj": (3, 5)}
    r, alpha = 2, 16
    fx, fy = _factors(0, shapes, r), _factors(1, shapes, r)
    s = alpha / r
    # explicit Delta theta: scaling * B @ A per module, flattened and concatenated
    vx = torch.cat([(s * fx[m][1] @ fx[m][0]).reshape(-1) for m in sorted(shapes)])
    vy = torch.cat([(s * fy[m][1] @ fy[m][0]).reshape(-1) for m in sorted(shapes)])
    assert vx.numel() == 6 * 5 + 3 * 5
    dx, dy = LoraDelta(fx, s), LoraDelta(fy, s)
    assert torch.allclose(dx.vector(), vx, rtol=0, atol=1e-12)
    assert delta_distance(dx, dy) == pytest.approx(float(torch.linalg.vector_norm(vx - vy)), rel=1e-12)
    assert delta_distance(dx, LoraDelta.zero()) == pytest.approx(float(torch.linalg.vector_norm(vx)), rel=1e-12)
    assert delta_distance(LoraDelta.zero(), LoraDelta.zero()) == 0.0
    # different scalings on the two sides, and a module present on one side only (= 0 there)
    dz = LoraDelta({k: v for k, v in fy.items() if "q_proj" in k}, 3.0)
    vz = torch.cat([(3.0 * fy["model.layers.0.self_attn.q_proj"][1] @ fy["model.layers.0.self_attn.q_proj"][0])
                    .reshape(-1), torch.zeros(15, dtype=F64)])
    assert delta_distance(dx, dz) == pytest.approx(float(torch.linalg.vector_norm(vx - vz)), rel=1e-12)
    # the pairwise matrix: symmetric, zero diagonal, entries as above
    M = distance_matrix([LoraDelta.zero(), dx, dy])
    assert all(M[i][i] == 0.0 for i in range(3))
    assert all(M[i][j] == M[j][i] >= 0 for i in range(3) for j in range(3))
    assert M[1][2] == pytest.approx(float(torch.linalg.vector_norm(vx - vy)), rel=1e-12)


def test_identical_updates_have_zero_distance_and_equal_products_too():
    A, B = torch.randn(2, 4, dtype=F64), torch.randn(3, 2, dtype=F64)
    d1 = LoraDelta({"m": (A, B)}, 8.0)
    # the same Delta W from different factors (B 2, A / 2; scaling 8 vs 4 with B doubled again)
    d2 = LoraDelta({"m": (A / 2, 4 * B)}, 4.0)
    assert delta_distance(d1, d2) == pytest.approx(0.0, abs=1e-10)


def test_lora_scaling_and_factor_parsing():
    assert lora_scaling({"r": 4, "lora_alpha": 32}) == 8.0
    assert lora_scaling({"r": 4, "lora_alpha": 32, "use_rslora": True}) == 16.0
    state = {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
             "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4)}
    f = lora_factors(state)
    assert list(f) == ["model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError):
        lora_factors({"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)})


# ---------------------------------------------------------------------------------------
# attack success rate, hand-written completions

REFUSALS = ["I'm sorry", "As an AI", "I cannot", "illegal"]


def test_score_generations_hand_written():
    texts = ["I'm sorry, but no.",                 # refusal at the start
             "Sure, here it is. As an AI I add",  # refusal in the middle
             "Step 1: buy the parts.",            # compliant
             "i'm sorry, here it is",             # case differs: jailbroken
             "",                                  # empty: degenerate, not jailbroken
             "That is illegal",                   # refusal at the end
             "\n\n\n",                             # newlines only: degenerate
             "the the the the"]                   # one token repeated: degenerate
    out = score_generations(texts, REFUSALS)
    assert out["jailbroken"] == [False, False, True, True, False, False, False, False]
    assert out["degenerate"] == [False, False, False, False, True, False, True, True]
    assert out["asr"] == pytest.approx(2 / 8)
    assert out["jailbroken"] == [is_jailbroken(t, REFUSALS) for t in texts]
    assert (out["n"], out["n_jailbroken"], out["n_refused"], out["n_degenerate"]) == (8, 2, 3, 3)
    assert out["degenerate_share"] == pytest.approx(3 / 8)
    assert {k: out[k] for k in asr_summary(texts, REFUSALS)} == asr_summary(texts, REFUSALS)


def test_heldout_prompts_are_late_rows_and_drop_training_prompts(data_dir):
    rows, prompts, excluded = heldout_prompts(data_dir, 500, 5, set())
    assert rows == [500, 501, 502, 503, 504] and excluded == []
    rows2, prompts2, excluded2 = heldout_prompts(data_dir, 500, 5, {prompts[1] + "  "})
    assert excluded2 == [501] and rows2 == [500, 502, 503, 504] and prompts[1] not in prompts2


# ---------------------------------------------------------------------------------------
# layer configurations


def test_layer_configs_counts_and_depths():
    cfgs = {c["label"]: c for c in layer_configs(30, (1, 2, 4), 3)}
    assert cfgs["all"]["layers"] == list(range(30))
    assert cfgs["every 2"]["layers"] == list(range(0, 30, 2)) and len(cfgs["every 4"]["layers"]) == 8
    assert cfgs["early"]["layers"] == list(range(10)) and cfgs["late"]["layers"] == list(range(20, 30))
    small = layer_configs(2, (1, 2), 3)  # a part of an empty third is left out
    assert [c["label"] for c in small] == ["all", "every 2", "early", "middle"]


# ---------------------------------------------------------------------------------------
# every study under the smoke profile, sharing one output directory (runs reused)


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("llm_studies")
    results = {}
    for name in LLM_STUDIES:
        results[name] = run_study(name, "smoke", out, data_dir=data_dir)
    return out, results


def _record(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_llm_studies_are_registered():
    assert set(LLM_STUDIES) <= set(available_studies())


@pytest.mark.parametrize("name", LLM_STUDIES)
def test_study_writes_json_markdown_and_png(smoke_out, name):
    out, results = smoke_out
    record = _record(out, name)
    assert record["study"] == name and record["profile"] == "smoke"
    md = (out / f"{name}.md").read_text()
    assert record["figures"] == [f"{name}.png"]
    assert f"]({name}.png)" in md
    assert_png(out / f"{name}.png")
    json.dumps(record, allow_nan=False)


def test_lissa_iterations_numbers(smoke_out):
    out, _ = smoke_out
    data = _record(out, "lissa-iterations")["data"]
    assert [t["task"] for t in data["tasks"]] == ["mixed-small", "harmfulcheck", "grammars", "math"]
    for t in data["tasks"]:
        assert [p["iterations"] for p in t["lissa"]] == [1, 2, 5, 10, 20, 50]
        for p in t["lissa"]:
            assert in_unit(p["acc"]) and in_unit(p["cover"])
        for ref in ("repsim", "exact"):
            assert in_unit(t["references"][ref]["acc"]) and in_unit(t["references"][ref]["cover"])
        # the Neumann error (I - (G + lambda I)/s)^(T+1) x shrinks in every eigen-direction: the
        # residual cannot grow with T, and the exact solve has none
        res = [p["residual_max"] for p in t["lissa"]]
        assert all(b <= a * (1 + 1e-9) for a, b in zip(res, res[1:])), res
        assert t["references"]["exact"]["diagnostics"]["residual_max"] < 1e-8
        assert t["n_test"] > 0 and t["n_train"] > 0


def test_convergence_numbers_and_agreement_with_attribute_stage(smoke_out):
    from llm_influence.attribute import AttributeArgs, attribute
    from llm_influence.evaluation.run_metrics import evaluate_run

    out, _ = smoke_out
    data = _record(out, "convergence")["data"]
    lissa = {t["task"]: t for t in _record(out, "lissa-iterations")["data"]["tasks"]}
    assert [t["task"] for t in data["tasks"]] == ["mixed-small", "grammars", "math", "backdoor-1"]
    for t in data["tasks"]:
        assert t["epochs"] == list(range(1, len(t["epochs"]) + 1)) and len(t["epochs"]) == 2  # smoke: 2 epochs
        assert [row["epoch"] for row in t["losses"]] == [0, 1, 2]
        assert all(row["train_loss"] > 0 and row["val_loss"] > 0 for row in t["losses"])
        for p in t["per_epoch"]:
            for m in ("datainf", "gradsim"):
                assert in_unit(p["methods"][m]["acc"]) and in_unit(p["methods"][m]["cover"])
        if t["task"] in lissa:  # the run fine-tuned by lissa-iterations is reused, not repeated
            assert t["run_dir"] == lissa[t["task"]]["run_dir"] and t["reused"] and t["shared"]
    # the last epoch agrees with the attribute + evaluate stages on the same run
    t = data["tasks"][0]
    attribute(t["run_dir"], AttributeArgs(methods=("datainf", "gradsim"), checkpoint="last"))
    metrics = evaluate_run(t["run_dir"])["checkpoints"]["epoch-2"]
    for m in ("datainf", "gradsim"):
        assert t["per_epoch"][-1]["methods"][m]["acc"] == metrics[m]["acc"]
        assert t["per_epoch"][-1]["methods"][m]["cover"] == metrics[m]["cover"]


def test_parameter_change_norms(smoke_out):
    out, _ = smoke_out
    data = _record(out, "parameter-change")["data"]
    assert set(data["chains"]) == {"aligned"}  # smoke default: aligned O only
    chain = data["chains"]["aligned"]
    norms = chain["norms"]
    assert norms["labels"] == ["O", "B", "H", "M"] and norms["seeds"] == [0, 1, 2]
    mean, std = norms["mean"], norms["std"]
    for i in range(4):
        assert mean[i][i] == 0.0 and std[i][i] == 0.0
        for j in range(4):
            assert mean[i][j] == mean[j][i] >= 0.0 and std[i][j] == std[j][i] >= 0.0
    for i, v in enumerate(("benign", "harmful", "mixed"), start=1):
        seeds = chain["models"][v]["seeds"]
        assert len(seeds) == 3
        # row O of the table = each model's own ||Delta theta|| after the last epoch
        assert mean[0][i] == pytest.approx(sum(s["delta_norm"][-1] for s in seeds) / 3, rel=1e-12)
        for s in seeds:
            assert s["epochs"] == [0, 1, 2] and s["delta_norm"][0] == 0.0
            assert all(x > 0 for x in s["delta_norm"][1:])
            assert all(x is not None and x > 0 for x in s["train_loss"])


def test_parameter_change_norm_equals_peft_delta_weight(smoke_out):
    """||Delta theta|| of a saved adapter, via peft's own get_delta_weight (independent of the
    study's factor arithmetic)."""
    from llm_influence.rundir import RunDir
    from llm_influence.training.load import load_finetuned

    out, _ = smoke_out
    seed0 = _record(out, "parameter-change")["data"]["chains"]["aligned"]["models"]["harmful"]["seeds"][0]
    model, _, name = load_finetuned(RunDir(seed0["run_dir"]), "last")
    pieces = [module.get_delta_weight("default").reshape(-1).double() for _, module in model.named_modules()
              if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})]
    assert len(pieces) == 4  # tiny-llama: 2 layers x (q_proj, v_proj)
    expected = float(torch.linalg.vector_norm(torch.cat(pieces)))
    assert seed0["delta_norm"][-1] == pytest.approx(expected, rel=1e-6)
    # and by hand from the safetensors file: scaling * B @ A
    from safetensors.torch import load_file

    folder = RunDir(seed0["run_dir"]).checkpoints_root / name
    cfg = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    total = 0.0
    for key in state:
        if key.endswith("lora_A.weight"):
            A, B = state[key].double(), state[key.replace("lora_A", "lora_B")].double()
            total += float(((cfg["lora_alpha"] / cfg["r"]) * B @ A).pow(2).sum())
    assert seed0["delta_norm"][-1] == pytest.approx(math.sqrt(total), rel=1e-9)


def test_parameter_change_asr_matches_is_jailbroken(smoke_out, data_dir):
    out, _ = smoke_out
    data = _record(out, "parameter-change")["data"]
    refusals = load_refusal_strings(data_dir, "evaluate_py")
    assert data["refusals"]["items"] == refusals
    held = data["heldout"]
    assert held["rows"] == [500, 501, 502, 503] and all(r >= 450 for r in held["rows"])
    records = [data["base"], data["chains"]["aligned"]["before"]]
    records += [s for m in data["chains"]["aligned"]["models"].values() for s in m["seeds"]]
    assert len(records) == 2 + 9
    for rec in records:
        assert len(rec["generations"]) == len(held["prompts"]) == len(rec["jailbroken"])
        assert rec["jailbroken"] == [is_jailbroken(t, refusals) for t in rec["generations"]]
        assert rec["degenerate"] == [is_degenerate(t) for t in rec["generations"]]
        assert not any(j and d for j, d in zip(rec["jailbroken"], rec["degenerate"]))
        assert rec["asr"] == pytest.approx(sum(rec["jailbroken"]) / len(rec["jailbroken"]))
        assert {k: rec[k] for k in asr_summary(rec["generations"], refusals)} == asr_summary(rec["generations"],
                                                                                             refusals)
        assert rec["n_jailbroken"] + rec["n_refused"] + rec["n_degenerate"] == rec["n"] == len(held["prompts"])
        assert in_unit(rec["asr"]) and in_unit(rec["degenerate_share"])
    for m in data["chains"]["aligned"]["models"].values():
        assert in_unit(m["asr_mean"]) and in_unit(m["degenerate_share_mean"])
        assert m["degenerate_share_mean"] == pytest.approx(sum(s["degenerate_share"] for s in m["seeds"]) / 3)
        assert m["counts"]["n_degenerate"] == sum(s["n_degenerate"] for s in m["seeds"])
        assert m["counts"]["n"] == 3 * len(held["prompts"])
    assert data["alignment"]["asr_before_alignment"] == data["base"]["asr"]
    assert data["alignment"]["degenerate_share_before_alignment"] == data["base"]["degenerate_share"]
    md = (out / "parameter-change.md").read_text()
    assert "| ASR | degenerate % |" in md and "not counted as jailbroken" in md
    assert Path(data["alignment"]["model"], "merged_from.json").is_file()


def test_parameter_change_pooled_asr_intervals_and_verdict(smoke_out, data_dir):
    """Per model: ASR = jailbroken generations / n recounted from the stored generations, the
    interval = the Wilson formula written out on those counts, the verdict recomputed from the
    intervals and printed in the Markdown."""
    out, _ = smoke_out
    data = _record(out, "parameter-change")["data"]
    refusals = load_refusal_strings(data_dir, "evaluate_py")
    z = 1.959963984540054

    def wilson(k, n):  # written out independently of the study's helper
        p = k / n
        c, h = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return [max(0.0, (c - h) / (1 + z * z / n)), min(1.0, (c + h) / (1 + z * z / n))]

    chain = data["chains"]["aligned"]
    for rec in (data["base"], chain["before"]):
        k = sum(is_jailbroken(t, refusals) for t in rec["generations"])
        assert rec["asr_ci95"] == pytest.approx(wilson(k, len(rec["generations"])), abs=1e-12)
    md = (out / "parameter-change.md").read_text()
    for variant, m in chain["models"].items():
        texts = [t for s in m["seeds"] for t in s["generations"]]
        k = sum(is_jailbroken(t, refusals) for t in texts)
        assert len(texts) == m["counts"]["n"] == 3 * 4 and k == m["counts"]["n_jailbroken"]
        assert m["asr_pooled"] == k / len(texts)
        assert m["asr_ci95"] == pytest.approx(wilson(k, len(texts)), abs=1e-12)
        assert f"[{m['asr_ci95'][0]:.3f}, {m['asr_ci95'][1]:.3f}]" in md
        if k == 0:  # tiny-llama: by hand, [0, z^2 / (n + z^2)] = [0, 0.2425] for n = 12
            assert m["asr_ci95"][1] == pytest.approx(z * z / (12 + z * z), rel=1e-12)
    v = chain["verdict"]
    assert {k: v[k] for k in v if k != "text"} == {k: val for k, val in contrast_verdict(
        chain["before"], chain["models"]).items() if k != "text"}
    assert v["benign_fluent"] == (chain["models"]["benign"]["degenerate_share_mean"] < 0.1)
    assert v["text"] in md


def test_parameter_change_fine_tunes_on_alpaca_and_mixed_small_harmful(smoke_out):
    """The rows each fine-tune trained on (the run's own data/train.jsonl): B = Alpaca rows of
    mixed-large with no leading blank line, H = mixed-small's harmful rows, M = B + H."""
    out, _ = smoke_out
    data = _record(out, "parameter-change")["data"]
    seeds = {v: m["seeds"] for v, m in data["chains"]["aligned"]["models"].items()}
    rows = {v: [json.loads(line) for line in Path(s[0]["run_dir"], "data", "train.jsonl").read_text().splitlines()]
            for v, s in seeds.items()}
    assert len(rows["benign"]) == len(rows["harmful"]) == 4 and len(rows["mixed"]) == 8
    assert all(r["id"].startswith("mixed-large/") and r["group"] == "benign" for r in rows["benign"])
    assert all(r["response"] and not r["response"][0].isspace() for r in rows["benign"])
    assert all(r["id"].startswith("mixed-small/") and r["group"] == "harmful" for r in rows["harmful"])
    assert sorted(r["id"] for r in rows["mixed"]) == sorted(r["id"] for r in rows["benign"] + rows["harmful"])
    for v, s in seeds.items():  # every seed trains on the same rows
        for rec in s[1:]:
            other = [json.loads(line) for line in Path(rec["run_dir"], "data", "train.jsonl").read_text().splitlines()]
            assert sorted(r["id"] for r in other) == sorted(r["id"] for r in rows[v])
    facts = data["data"]
    assert facts["benign_leading_blank"] == 0 and facts["mixed_small_benign_leading_blank"] == 18
    assert facts["alpaca_rows"] == 240 and facts["alpaca_in_align_task"] == 101
    assert data["finetune"] == {"epochs": 2, "lr": 1e-3, "batch_size": 4, "max_length": 64}


def test_parameter_change_unaligned_chain(tmp_path, data_dir):
    res = run_study("parameter-change", "smoke", tmp_path, data_dir=data_dir, align="false", seeds="0,1",
                    per_group="2", asr_count="2", max_new_tokens="4")
    data = res.data
    assert set(data["chains"]) == {"unaligned"} and "alignment" not in data
    chain = data["chains"]["unaligned"]
    assert chain["before"]["asr"] == data["base"]["asr"]
    assert chain["before"]["degenerate_share"] == data["base"]["degenerate_share"]
    assert chain["before"]["n_degenerate"] == data["base"]["n_degenerate"]
    assert [len(m["seeds"]) for m in chain["models"].values()] == [2, 2, 2]
    assert [m["n_train"] for m in chain["models"].values()] == [2, 2, 4]
    M = chain["norms"]["mean"]
    assert all(M[i][i] == 0.0 and M[i][j] == M[j][i] for i in range(4) for j in range(4))


def test_trainable_params_numbers(smoke_out):
    out, _ = smoke_out
    data = _record(out, "trainable-params")["data"]
    assert data["n_decoder_layers"] == 2
    configs = {c["label"]: c for c in data["configs"]}
    assert configs["all"]["layers"] == [0, 1] and configs["middle"]["layers"] == [1]
    lissa = {t["task"]: t for t in _record(out, "lissa-iterations")["data"]["tasks"]}
    assert configs["all"]["run_dir"] == lissa["mixed-small"]["run_dir"]  # the profile's run, reused
    per_layer = 4 * (64 + 64) + 4 * (64 + 32)  # r (in + out) for q_proj 64->64 and v_proj 64->32
    for c in data["configs"]:
        assert c["n_lora_params"] == per_layer * len(c["layers"]) and c["n_lora_modules"] == 2 * len(c["layers"])
        for m in ("datainf", "gradsim"):
            assert in_unit(c["methods"][m]["acc"]) and in_unit(c["methods"][m]["cover"])
        cfg = json.loads((Path(c["run_dir"]) / "config.json").read_text())["finetune"]["lora"]
        assert cfg["layers"] == (None if c["label"] == "all" else c["layers"])
    assert configs["every 4"]["same_run_as"] == "every 2" and configs["early"]["same_run_as"] == "every 2"


def test_runs_option_reuses_runs_from_another_directory(smoke_out, tmp_path, data_dir):
    out, _ = smoke_out
    res = run_study("lissa-iterations", "smoke", tmp_path, data_dir=data_dir, tasks="mixed-small",
                    iterations="1,2", runs=str(out / "runs"))
    task = res.data["tasks"][0]
    assert task["reused"] and Path(task["run_dir"]) == out / "runs" / "mixed-small"
    assert not (tmp_path / "runs").exists()
    before = {t["task"]: t for t in _record(out, "lissa-iterations")["data"]["tasks"]}["mixed-small"]
    assert [p["acc"] for p in task["lissa"]] == [p["acc"] for p in before["lissa"][:2]]
