"""Task loaders read the shared data with the sizes its README states; user JSONL is
validated strictly (one-line errors naming file, line and field, exit status 2)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from llm_influence.cli import main
from llm_influence.data import PAPER_TASKS, Example, load_task, read_examples, subsample
from llm_influence.errors import UserError

# (train size, test size, train group counts, test group counts) from shared/data/README.md
EXPECTED = {
    "mixed-small": (40, 40, {"harmful": 20, "benign": 20}, {"harmful": 40}),
    "mixed-large": (260, 260, {"harmful": 20, "benign": 240}, {"harmful": 260}),
    "grammars": (900, 100, None, None),
    "math": (900, 100, None, None),
    "harmfulcheck": (100, 400, {"harmful": 50, "harmless": 50}, {"harmful": 200, "harmless": 200}),
    "backdoor-1": (700, 100, {"clean": 350, "trigger": 350}, {"clean": 50, "trigger": 50}),
    "backdoor-3": (1200, 200, {g: 300 for g in ["clean", "trigger_1", "trigger_2", "trigger_3"]},
                   {g: 50 for g in ["clean", "trigger_1", "trigger_2", "trigger_3"]}),
    "backdoor-5": (1800, 300, {g: 300 for g in ["clean"] + [f"trigger_{i}" for i in range(1, 6)]},
                   {g: 50 for g in ["clean"] + [f"trigger_{i}" for i in range(1, 6)]}),
    "mixed-l": (250, 250, {"harmful": 20, "benign": 230}, {"harmful": 250}),
    "emotion": (750, 250, {g: 150 for g in ["sad", "joyful", "angry", "fearful", "surprised"]},
                {g: 50 for g in ["sad", "joyful", "angry", "fearful", "surprised"]}),
    "grammars-rule": (900, 100, None, None),
}


def test_every_registered_task_has_expected_sizes():
    assert set(EXPECTED) == set(PAPER_TASKS)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_paper_task_sizes(name, data_dir):
    n_train, n_test, train_groups, test_groups = EXPECTED[name]
    task = load_task(name, data_dir)
    assert (len(task.train), len(task.test)) == (n_train, n_test)
    if train_groups is None:  # the 10-class tasks: 90 train / 10 test per class
        assert sorted(task.group_counts("train").values()) == [90] * 10
        assert sorted(task.group_counts("test").values()) == [10] * 10
        assert set(task.group_counts("train")) == set(task.group_counts("test"))
    else:
        assert task.group_counts("train") == train_groups
        assert task.group_counts("test") == test_groups
    assert len({e.id for e in task.train}) == n_train
    assert all(e.prompt and e.response and e.group for e in task.train + task.test)


def test_mixed_harmful_rows_come_first_and_k(data_dir):
    task = load_task("mixed-small", data_dir)
    assert [e.group for e in task.train[:20]] == ["harmful"] * 20
    assert task.k(task.test[0]) == 20


def test_subsample_is_stratified_deterministic_and_order_preserving(data_dir):
    task = load_task("grammars", data_dir)
    a = subsample(task.train, 7, seed=3)
    b = subsample(task.train, 7, seed=3)
    c = subsample(task.train, 7, seed=4)
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.id for e in a] != [e.id for e in c]
    assert Counter(e.group for e in a) == {g: 7 for g in task.group_counts("train")}
    positions = [int(e.id.split("-")[1]) for e in a]
    assert positions == sorted(positions)


def test_subsample_per_group_mapping_keeps_unlisted_groups_whole(data_dir):
    task = load_task("mixed-large", data_dir, train_per_group={"benign": 30}, seed=0)
    assert task.group_counts("train") == {"harmful": 20, "benign": 30}


def test_load_task_profile_caps(data_dir):
    task = load_task("backdoor-3", data_dir, train_per_group=5, test_per_group=2, seed=0)
    assert task.group_counts("train") == {g: 5 for g in ["clean", "trigger_1", "trigger_2", "trigger_3"]}
    assert task.group_counts("test") == {g: 2 for g in ["clean", "trigger_1", "trigger_2", "trigger_3"]}


def _write(path, lines):
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return path


GOOD = json.dumps({"prompt": "p", "response": "r", "group": "g"})


@pytest.mark.parametrize("lines, expected", [
    ([GOOD, "{not json"], ":2: invalid JSON"),
    ([GOOD, json.dumps({"response": "r", "group": "g"})], ":2: field 'prompt': missing"),
    ([json.dumps({"prompt": " ", "response": "r", "group": "g"})], ":1: field 'prompt': empty"),
    ([json.dumps({"prompt": "p", "response": 3, "group": "g"})], ":1: field 'response': expected a string, got int"),
    ([json.dumps({"prompt": "p", "response": "r"})], ":1: field 'group': missing"),
    ([json.dumps({"id": "a", "prompt": "p", "response": "r", "group": "g"}),
      json.dumps({"id": "a", "prompt": "q", "response": "r", "group": "g"})], ":2: field 'id': duplicate id 'a'"),
    ([json.dumps({"id": [1], "prompt": "p", "response": "r", "group": "g"})], ":1: field 'id': expected a string or integer"),
    (["[1, 2]"], ":1: expected a JSON object"),
    ([b"\xff\xfe{}"], ":1: invalid UTF-8"),
    ([""], "empty file"),
])
def test_malformed_user_jsonl_is_one_line_error(tmp_path, lines, expected):
    path = _write(tmp_path / "train.jsonl", lines)
    with pytest.raises(UserError) as info:
        read_examples(path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_malformed_user_jsonl_exits_2_from_cli(tmp_path, capsys):
    path = _write(tmp_path / "train.jsonl", [GOOD, json.dumps({"prompt": "p", "response": "", "group": "g"})])
    status = main(["finetune", "--task", f"jsonl:{path}", "--profile", "smoke", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err == f"llm-influence: error: {path}:2: field 'response': empty"
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_user_jsonl_ids_and_test_split(tmp_path):
    _write(tmp_path / "train.jsonl", [json.dumps({"id": 7, "prompt": "p", "response": "r", "group": "a"}), GOOD])
    _write(tmp_path / "test.jsonl", [GOOD])
    task = load_task(f"jsonl:{tmp_path}")
    assert [e.id for e in task.train] == ["7", "train-1"]
    assert task.test == [Example("test-0", "p", "r", "g")]
    task2 = load_task(f"jsonl:{tmp_path / 'train.jsonl'},{tmp_path / 'test.jsonl'}")
    assert task2.train == task.train and task2.test == task.test


def test_missing_data_dir_messages(tmp_path, monkeypatch):
    monkeypatch.delenv("LLM_INFLUENCE_DATA", raising=False)
    with pytest.raises(UserError, match="LLM_INFLUENCE_DATA"):
        load_task("mixed-small")
    with pytest.raises(UserError, match="does not exist"):
        load_task("mixed-small", tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown task"):
        load_task("nope", tmp_path)


def _examples(prefix, groups):
    return [Example(f"{prefix}{i}", f"p{i}", f"r{i}", g) for i, g in enumerate(groups)]


def test_validation_comes_from_rows_the_test_subsample_left_out():
    from llm_influence.data.tasks import split_validation

    full = _examples("t", ["a"] * 6 + ["b"] * 6)
    test = [e for e in full if e.id in {"t0", "t1", "t6", "t7"}]
    kept, val = split_validation(full, test, 2, seed=5)
    assert kept == test                                      # nothing attributed is taken
    assert Counter(e.group for e in val) == {"a": 2, "b": 2}
    assert not {e.id for e in val} & {e.id for e in test}    # never attributed
    assert split_validation(full, test, 2, seed=5) == (kept, val)


def test_validation_is_held_out_of_the_test_rows_when_all_are_attributed():
    from llm_influence.data.tasks import split_validation

    full = _examples("t", ["harmful"] * 10 + ["x"])
    kept, val = split_validation(full, list(full), 3, seed=0)
    assert Counter(e.group for e in val) == {"harmful": 3}   # group 'x' has one row: it stays attributed
    assert len(kept) == 8 and not {e.id for e in val} & {e.id for e in kept}
    assert [e.id for e in kept + val if e.group == "harmful"] != []  # file order kept in both lists
    assert [e.id for e in kept] == [e.id for e in full if e.id not in {v.id for v in val}]


def test_load_task_validation_rows_are_disjoint_from_attributed_rows(data_dir):
    task = load_task("backdoor-1", data_dir, train_per_group=5, test_per_group=3, val_per_group=2)
    assert Counter(e.group for e in task.test) == {g: 3 for g in {e.group for e in task.test}}
    assert all(c == 2 for c in Counter(e.group for e in task.val).values())
    assert not {e.id for e in task.val} & {e.id for e in task.test}
    small = load_task("mixed-small", data_dir, val_per_group=8)
    assert len(small.test) == 32 and len(small.val) == 8    # all 40 test rows attributed: 8 held out
