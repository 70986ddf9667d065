"""Nothing is unpickled, evaluated or executed from files, and a model's own code runs only
with an explicit --trust-remote-code (issue 8, item 5). (The HTML report's escaping is
tested with the report.)"""

from __future__ import annotations

import ast
import inspect
import json
import pickle
from pathlib import Path

import pytest

from llm_influence.cli import build_parser, main
from llm_influence.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src" / "llm_influence"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "yaml"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            # `from torch import load` would hide torch.load from the check below
            assert "load" not in [a.name for a in node.names], "import torch.load by its module name"


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_source_has_no_pickle_eval_exec_or_unsafe_loads():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            problems += [f"{rel}:{node.lineno}: imports {n}" for n in names if n in UNSAFE_MODULES]
        for call, name in _calls(tree):
            where = f"{rel}:{call.lineno}: {name}"
            if name in {"eval", "exec", "compile", "__import__"}:
                problems.append(f"{where}: dynamic code")
            if name.endswith("torch.load") and not _is_true(_kw(call, "weights_only")):
                problems.append(f"{where}: torch.load without weights_only=True")
            if name.split(".")[-1] == "load" and name.split(".")[0] in {"np", "numpy"} and \
                    _is_true(_kw(call, "allow_pickle")):
                problems.append(f"{where}: numpy load with allow_pickle=True")
            if _is_true(_kw(call, "trust_remote_code")):
                problems.append(f"{where}: trust_remote_code=True hard-coded")
            if name.endswith("from_pretrained") and "AutoModel" in name and _kw(call, "gguf_file") is None \
                    and not _is_true(_kw(call, "use_safetensors")):
                problems.append(f"{where}: model weights loaded without use_safetensors=True")
    assert not problems, "\n".join(problems)


def test_trust_remote_code_is_off_unless_the_flag_is_given(monkeypatch, tmp_path):
    from llm_influence.models.registry import load_model
    from llm_influence.training.load import load_finetuned

    for fn in (load_model, load_finetuned):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    parser = build_parser()
    for argv in (["finetune", "--task", "x", "--out", "o"], ["generate", "--run", "r", "--prompt", "p"],
                 ["attribute", "--run", "r"], ["explain", "--run", "r", "--prompt", "p"]):
        assert parser.parse_args(argv).trust_remote_code is False
        assert parser.parse_args(argv + ["--trust-remote-code"]).trust_remote_code is True

    # The flag reaches load_model, and only the flag.
    seen = []

    def fake_load_model(name, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise UserError("stop here")

    import importlib

    monkeypatch.setattr(importlib.import_module("llm_influence.training.finetune"), "load_model", fake_load_model)
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"prompt": "p", "response": "r", "group": "g"}) + "\n")
    base = ["finetune", "--task", f"jsonl:{train}", "--profile", "smoke", "--out", str(tmp_path / "run"), "--quiet",
            "--model", "some/model"]
    assert main(base) == 2 and main(base + ["--trust-remote-code"]) == 2
    assert seen == [False, True]

    # attribute and explain pass it on to the model load of feature extraction
    from llm_influence.attribute import AttributeArgs
    from llm_influence.explain import ExplainArgs

    assert AttributeArgs().trust_remote_code is False and ExplainArgs("m", Path("t")).trust_remote_code is False
    loads = []

    def fake_load_finetuned(run, name, **kwargs):
        loads.append(kwargs.get("trust_remote_code"))
        raise UserError("stop here")

    monkeypatch.setattr(importlib.import_module("llm_influence.training.load"), "load_finetuned", fake_load_finetuned)
    run = tmp_path / "run2"
    from llm_influence.config import TrainArgs
    from llm_influence.data import Example, TaskData
    from llm_influence.models import LoraSpec
    from llm_influence.training import finetune

    monkeypatch.undo()  # the real finetune for the run itself
    examples = [Example(f"t{i}", f"q{i}", f"a{i}", "g") for i in range(2)]
    finetune(run, TaskData("t", examples, examples[:1]), model_name="tiny-llama", lora=LoraSpec(r=2, alpha=4),
             args=TrainArgs(epochs=1, batch_size=2, max_length=24))
    monkeypatch.setattr(importlib.import_module("llm_influence.training.load"), "load_finetuned", fake_load_finetuned)
    for extra in ([], ["--trust-remote-code"]):
        assert main(["attribute", "--run", str(run), "--methods", "gradsim", "--quiet", *extra]) == 2
        assert main(["explain", "--run", str(run), "--prompt", "p", "--response", "r", "--methods", "gradsim",
                     "--cache-dir", str(tmp_path / "c"), "--quiet", *extra]) == 2
    assert loads == [False, False, True, True]


def _model_dir(tmp_path: Path, tiny, name: str) -> Path:
    """A local model folder with tiny-llama's tokenizer and config."""
    model, tokenizer = tiny
    folder = tmp_path / name
    tokenizer.save_pretrained(folder)
    model.config.to_json_file(folder / "config.json")
    return folder


def test_model_with_its_own_code_is_refused_without_the_flag(tmp_path, tiny, capsys):
    folder = _model_dir(tmp_path, tiny, "custom")
    marker = tmp_path / "CODE_RAN"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    "class EvilConfig(LlamaConfig):\n    model_type = 'evil-llama'\n"
                                    "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil-llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                     "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    from llm_influence.models.registry import load_model

    with pytest.raises(UserError) as info:
        load_model(str(folder))
    message = str(info.value)
    assert message.startswith(f"cannot load model {str(folder)!r} (the model needs its own Python code; pass "
                              "--trust-remote-code only if you trust its source): ")
    assert not marker.exists()


class _Payload:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_model_weights_are_never_loaded(tmp_path, tiny):
    from llm_influence.models.registry import load_model

    folder = _model_dir(tmp_path, tiny, "pickled")
    marker = tmp_path / "UNPICKLED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError, match=rf"^cannot load model {str(folder)!r}: "):
        load_model(str(folder))
    assert not marker.exists()


def test_pickled_adapter_is_never_loaded(tmp_path, tiny):
    from llm_influence.models import LoraSpec, attach_lora, load_model
    from llm_influence.models.lora import load_adapter

    model, _ = tiny
    adapter = tmp_path / "adapter"
    base, _, _ = load_model("tiny-llama")
    attach_lora(base, LoraSpec(), seed=0).save_pretrained(str(adapter), safe_serialization=True)
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    fresh, _, _ = load_model("tiny-llama")
    with pytest.raises(UserError, match=rf"^{adapter}: no adapter_model.safetensors \(only safetensors adapters "
                                        r"are loaded\)$"):
        load_adapter(fresh, adapter)
    assert not marker.exists()


def test_the_payload_is_real(tmp_path):
    """Control: the payload does create its marker when unpickled (so the tests above prove
    something)."""
    marker = tmp_path / "UNPICKLED"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
