"""Artifacts are written atomically, carry the hash of what produced them, and a truncated,
corrupted or stale one is detected and recomputed or refused, never used (issue 8, item 2).
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_influence.cli import main
from llm_influence.config import TrainArgs
from llm_influence.data import Example, TaskData
from llm_influence.errors import UserError
from llm_influence.io_utils import atomic_path, write_json
from llm_influence.models import LoraSpec
from llm_influence.training import finetune
from llm_influence.training.state import inputs_digest

SRC = Path(__file__).resolve().parents[1] / "src" / "llm_influence"
ARGS = TrainArgs(epochs=3, batch_size=4, lr=3e-3, max_length=64, seed=7, eval_batch_size=8)
LORA = LoraSpec(r=4, alpha=32, dropout=0.1)


def _task(response_suffix: str = "") -> TaskData:
    colours = ["red", "green", "blue"]
    train = [Example(f"t{i}", f"Say the colour number {i % 3}.", colours[i % 3] + " it is." + response_suffix,
                     colours[i % 3]) for i in range(12)]
    test = [Example(f"v{i}", f"Say the colour number {i}.", colours[i] + " it is.", colours[i]) for i in range(3)]
    return TaskData("colours", train, test)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ckpt(run: Path, epoch: int) -> Path:
    return run / "checkpoints" / f"epoch-{epoch}"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    # copies: load_file memory-maps the file, which these tests then truncate
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def _assert_equal_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    finetune(run, _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    return run


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """Epochs 0 and 1 complete, stopped in the middle of epoch 2 (3 steps per epoch)."""
    run = tmp_path_factory.mktemp("cut") / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(run, _task(), model_name="tiny-llama", lora=LORA, args=ARGS, stop_after_steps=4)
    assert (_ckpt(run, 1) / "trainer_state.json").is_file() and not _ckpt(run, 2).exists()
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# --------------------------------------------------------------------------- atomic writes


WRITE_ATTRS = {"write_text", "write_bytes", "save_pretrained", "savefig", "to_csv", "save_model"}
WRITE_NAMES = {"save_file", "save_model", "copyfile"}  # as imported from safetensors / shutil
WRITE_MODULE_FUNCS = {("torch", "save"), ("json", "dump"), ("shutil", "copyfile"), ("shutil", "copy"),
                      ("shutil", "copy2"), ("shutil", "move"), ("np", "save"), ("np", "savez"), ("np", "savetxt"),
                      ("numpy", "save"), ("safetensors", "save_file")}
# (file, function): why it may write in place.
ALLOWED = {
    ("io_utils.py", "atomic_path"): "the temp+rename primitive itself",
    ("io_utils.py", "write_json"): "through atomic_path",
    ("io_utils.py", "write_text"): "through atomic_path",
    ("io_utils.py", "append_jsonl"): "the append-only training log (fsync per line; cut back on resume)",
    ("io_utils.py", "publish_dir"): "the temp-folder+rename primitive itself",
    ("training/state.py", "save_trainer_state"): "writes into the temporary folder of publish_dir",
    ("training/finetune.py", "_run_lock"): "an empty advisory lock file",
    ("explain.py", "_locked"): "an empty advisory lock file",
    ("data/fetch.py", "arrow_to_jsonl"): "writes into the temporary path of atomic_path (its only caller)",
}


def _write_calls(tree: ast.AST):
    """Yield ``(call, stack of enclosing nodes)`` for every call that writes a file."""
    def visit(node, stack):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            writes = (name in WRITE_ATTRS and isinstance(f, ast.Attribute)) or (
                name in WRITE_NAMES and isinstance(f, ast.Name)) or (
                isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                and (f.value.id, name) in WRITE_MODULE_FUNCS)
            if name == "open" and isinstance(f, ast.Name):
                mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                     None)
                writes = isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
            if writes:
                yield node, stack
        for child in ast.iter_child_nodes(node):
            yield from visit(child, stack + [node])
    yield from visit(tree, [])


def _is_atomic(stack, publish_writers: set[str]) -> bool:
    for node in stack:
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", None) == "atomic_path"
                for item in node.items):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in publish_writers:
            return True
    return False


def test_every_artifact_write_in_src_goes_through_a_temporary_and_a_rename():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # functions handed to publish_dir fill its temporary folder
        writers = {arg.id for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and getattr(node.func, "id", getattr(node.func, "attr", None)) == "publish_dir"
                   for arg in node.args if isinstance(arg, ast.Name)}
        for call, stack in _write_calls(tree):
            functions = [n.name for n in stack if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            if any((rel, fn) in ALLOWED for fn in functions) or _is_atomic(stack, writers):
                continue
            offenders.append(f"{rel}:{call.lineno} {ast.unparse(call.func)} in {'.'.join(functions) or '<module>'}")
    assert not offenders, "writes that bypass atomic_path/publish_dir:\n" + "\n".join(offenders)


def test_atomic_path_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed while writing")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# --------------------------------------------------------------------------- hashes

def test_checkpoints_and_metrics_carry_the_hash_of_what_produced_them(reference, tmp_path, capsys):
    cfg = json.loads((reference / "config.json").read_text())
    task = _task()
    expected_inputs = inputs_digest({"task": cfg["task"], "finetune": cfg["finetune"]}, task.train, task.test)
    umask = os.umask(0)
    os.umask(umask)
    for epoch in range(ARGS.epochs + 1):
        folder = _ckpt(reference, epoch)
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["inputs_sha256"] == expected_inputs
        assert state["sha256"] == {name: _sha(folder / name) for name in
                                   ("adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors")}
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
        assert stat.S_IMODE((folder / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask
    # the hash follows the data: another response text under the same ids is other inputs
    assert inputs_digest({"task": cfg["task"], "finetune": cfg["finetune"]}, _task("!").train, task.test) \
        != expected_inputs

    run = _copy(reference, tmp_path / "run")
    assert main(["attribute", "--run", str(run), "--methods", "gradsim,exact", "--quiet"]) == 0
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    scores = {m: run / "scores" / "epoch-3" / f"{m}.safetensors" for m in ("gradsim", "exact")}
    for method, path in scores.items():
        assert metrics["checkpoints"]["epoch-3"][method]["scores_sha256"] == _sha(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    groups = [[e.id, e.group] for e in task.train + task.test]
    producing = {"rank_by": "score", "ground_truth": groups,
                 "scores": sorted([str(p.relative_to(run)), _sha(p)] for p in scores.values())}
    assert metrics["inputs_sha256"] == hashlib.sha256(json.dumps(producing, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- corrupted checkpoints

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _legacy_truncated(folder: Path) -> None:
    """A checkpoint written before hashes were recorded, then truncated."""
    state = json.loads((folder / "trainer_state.json").read_text())
    del state["sha256"], state["inputs_sha256"]
    (folder / "trainer_state.json").write_text(json.dumps(state))
    _truncate(folder / "adapter_model.safetensors")


CORRUPTIONS = {
    "adapter truncated": (lambda f: _truncate(f / "adapter_model.safetensors"),
                          "adapter_model.safetensors does not match its recorded SHA-256 (truncated or modified)"),
    "optimizer byte flipped": (lambda f: _flip_byte(f / "optimizer.safetensors"),
                               "optimizer.safetensors does not match its recorded SHA-256 (truncated or modified)"),
    "trainer state garbage": (lambda f: (f / "trainer_state.json").write_text('{"step": 3, "epo'),
                              "trainer_state.json is not valid JSON"),
    "trainer state missing": (lambda f: (f / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "legacy checkpoint truncated": (_legacy_truncated, "adapter_model.safetensors is unreadable (SafetensorError)"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupted_checkpoint_is_retrained_never_used(kind, reference, interrupted, tmp_path, capsys):
    run = _copy(interrupted, tmp_path / "run")
    corrupt, reason = CORRUPTIONS[kind]
    corrupt(_ckpt(run, 1))
    capsys.readouterr()
    result = finetune(run, _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    err = capsys.readouterr().err
    assert f"llm-influence: warning: {_ckpt(run, 1)}: {reason}; discarding it and retraining from epoch 0\n" in err
    assert result.epochs_done == ARGS.epochs
    for epoch in (1, ARGS.epochs):
        for name in ("adapter_model.safetensors", "optimizer.safetensors"):
            _assert_equal_tensors(_tensors(_ckpt(run, epoch) / name), _tensors(_ckpt(reference, epoch) / name))
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in ref_rows]


def test_truncated_final_adapter_is_refused_by_attribute_and_recomputed_by_finetune(reference, tmp_path, capsys):
    run = _copy(reference, tmp_path / "run")
    last = _ckpt(run, ARGS.epochs)
    original = _tensors(last / "adapter_model.safetensors")
    _truncate(last / "adapter_model.safetensors")
    capsys.readouterr()
    assert main(["attribute", "--run", str(run), "--methods", "gradsim", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"llm-influence: error: {last}: adapter_model.safetensors does not match its recorded SHA-256 "
                   "(truncated or modified); re-run `llm-influence finetune` with the same arguments to recompute it\n")
    assert not (run / "scores").exists()
    assert main(["generate", "--run", str(run), "--prompt", "hi", "--quiet"]) == 2
    assert "does not match its recorded SHA-256" in capsys.readouterr().err
    finetune(run, _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    assert f"{last}: adapter_model.safetensors does not match" in capsys.readouterr().err
    _assert_equal_tensors(_tensors(last / "adapter_model.safetensors"), original)
    assert main(["attribute", "--run", str(run), "--methods", "gradsim", "--quiet"]) == 0


def test_leftover_temporary_checkpoint_of_a_killed_write_is_removed_not_used(reference, interrupted, tmp_path):
    run = _copy(interrupted, tmp_path / "run")
    junk = run / "checkpoints" / ".epoch-2.k1ll3d"
    shutil.copytree(_ckpt(run, 1), junk)
    _truncate(junk / "adapter_model.safetensors")
    finetune(run, _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    assert not junk.exists()
    _assert_equal_tensors(_tensors(_ckpt(run, 3) / "adapter_model.safetensors"),
                          _tensors(_ckpt(reference, 3) / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- stale checkpoints

def test_checkpoint_of_other_data_under_the_same_ids_is_refused(reference, tmp_path):
    run = _copy(reference, tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as info:
        finetune(run, _task(" Indeed."), model_name="tiny-llama", lora=LORA, args=ARGS)
    message = str(info.value)
    assert message.startswith(f"{_ckpt(run, 0)}: it was made by other inputs (inputs_sha256 ")
    assert message.endswith("): other data, model or arguments; use a new --out directory or delete the run")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched


def test_checkpoint_copied_from_a_run_with_other_arguments_is_refused(interrupted, tmp_path):
    a, b = _copy(interrupted, tmp_path / "a"), tmp_path / "b"
    finetune(b, _task(), model_name="tiny-llama", lora=LORA, args=replace(ARGS, lr=1e-3, epochs=1))
    shutil.rmtree(_ckpt(a, 1))
    shutil.copytree(_ckpt(b, 1), _ckpt(a, 1))
    with pytest.raises(UserError, match=rf"^{_ckpt(a, 1)}: it was made by other inputs"):
        finetune(a, _task(), model_name="tiny-llama", lora=LORA, args=ARGS)


def test_second_process_on_the_same_run_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".finetune.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another llm-influence process is fine-tuning this run"):
            finetune(run, _task(), model_name="tiny-llama", lora=LORA, args=ARGS)
    assert not (run / "checkpoints").exists()


# --------------------------------------------------------------------------- scores

def test_truncated_scores_file_is_rejected_by_evaluate_and_recomputed_by_attribute(reference, tmp_path, capsys):
    run = _copy(reference, tmp_path / "run")
    folder = run / "scores" / "epoch-3"
    assert main(["attribute", "--run", str(run), "--methods", "gradsim,exact", "--quiet"]) == 0
    exact = _tensors(folder / "exact.safetensors")["scores"]
    gradsim_stat = (folder / "gradsim.safetensors").stat().st_mtime_ns
    _truncate(folder / "exact.safetensors")
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"llm-influence: error: {folder / 'exact.safetensors'}: unreadable scores "
                                       "file (SafetensorError)\n")
    assert not (run / "metrics.json").exists()
    assert main(["attribute", "--run", str(run), "--methods", "gradsim,exact"]) == 0
    out = capsys.readouterr().out
    assert "(cached)" in out.splitlines()[0] and "(cached)" not in out.splitlines()[1]
    assert torch.equal(_tensors(folder / "exact.safetensors")["scores"], exact)
    assert (folder / "gradsim.safetensors").stat().st_mtime_ns == gradsim_stat
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0


def test_train_log_reader_skips_a_cut_line_and_superseded_rows(tmp_path):
    from llm_influence.training import read_train_log

    rows = [{"kind": "epoch", "epoch": 0, "step": 0}, {"kind": "step", "epoch": 1, "step": 1, "loss": 1.0},
            {"kind": "step", "epoch": 1, "step": 2, "loss": 0.9}, {"kind": "epoch", "epoch": 1, "step": 2},
            {"kind": "step", "epoch": 2, "step": 3, "loss": 0.8},
            # an older version resumed after epoch 1 and logged step 3 again
            {"kind": "step", "epoch": 2, "step": 3, "loss": 0.7}, {"kind": "step", "epoch": 2, "step": 4, "loss": 0.6},
            {"kind": "epoch", "epoch": 2, "step": 4}]
    path = tmp_path / "train_log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "step", "epoch": 3, "st')
    assert read_train_log(path) == rows[:4] + rows[5:]
    assert read_train_log(tmp_path / "missing.jsonl") == []
