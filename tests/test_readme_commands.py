"""The README's shell commands, executed.

Every command of a fenced ``bash``/``sh``/``shell`` block of README.md (``\\``-continued
lines joined, ``# comments`` stripped by shlex) must be classified in :data:`COMMANDS`,
keyed by its exact text (``shlex.join`` of its words): run in this process through
``llm_influence.cli.main``, run as a subprocess (``python -m llm_influence`` with this
venv's python, ``torchrun`` with the venv's ``torchrun``), applied to the environment
(``export``), run in a reduced form, or not run, with the reason. A README command in none
of them fails :func:`test_every_readme_command_is_classified`, and so does a classified
command that is no longer in the README: a new or edited command must be classified here.

The runnable commands run in README order in one temporary working directory, since they
use each other's outputs (``runs/ms``, ``q.jsonl``, ``top.csv``, the README's
``my_methods.py``), after :data:`SUBSTITUTIONS` (the ``smoke`` profile and ``tiny-llama``
instead of the larger ones, 2 torchrun processes). Each must exit 0, and key commands are
checked for what they wrote (the torchrun scores against the single-process ones,
bitwise). About a minute on 2 CPU cores.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SHELL_INFO = {"bash", "sh", "shell"}


# ---------------------------------------------------------------------------------------
# parsing

@dataclass(frozen=True)
class ReadmeCommand:
    line: int            # README line the command starts on
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return join(self.words)


def join(words) -> str:
    """The words as one shell line, quoted as a person writes them (``'...'``, or ``"..."``
    around a word holding a ``'``); ``shlex.split`` gives the words back."""
    out = []
    for word in words:
        if shlex.quote(word) == word:
            out.append(word)
        elif "'" not in word:
            out.append(f"'{word}'")
        else:
            out.append('"' + re.sub(r'([\\"$`])', r"\\\1", word) + '"')
    return " ".join(out)


def readme_commands(text: Optional[str] = None) -> list[ReadmeCommand]:
    """The commands of the README's fenced shell blocks, in order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    out: list[ReadmeCommand] = []
    info: Optional[str] = None  # the open block's info string (None: outside a block)
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(.*)$", line)
        if fence:
            if info is None:
                info = (fence.group(1).split() or [""])[0].lower()
            else:
                assert not pending, f"README.md:{start}: a shell block ends inside a '\\' continuation"
                info = None
            continue
        if info not in SHELL_INFO:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            out.append(ReadmeCommand(start, tuple(words)))
    assert info is None, "README.md: an unclosed ``` block"
    return out


def test_parser_joins_continuations_and_strips_comments():
    text = "\n".join([
        "```bash", "a --x '# not a comment' \\", "    --y 2   # a comment", "", "# only a comment", "```",
        "```python", "print('not shell')", "```", "```", "plain block", "```", "```sh", "b", "```"])
    assert [(c.line, c.words) for c in readme_commands(text)] == [
        (2, ("a", "--x", "# not a comment", "--y", "2")), (14, ("b",))]
    for words in (("x", "it's", 'a "b" $c'), ("y", "How do I?", "plain")):
        assert tuple(shlex.split(join(words))) == words
    assert join(("p", "--r", "I can't.", "--q", "a b")) == "p --r \"I can't.\" --q 'a b'"


# ---------------------------------------------------------------------------------------
# substitutions: the one place where README commands are changed before they run

SUBSTITUTIONS: list[tuple[str, str, str]] = [
    # (regex on the command text, replacement, why)
    (r"--profile (cpu|paper)\b", "--profile smoke", "the smoke profile (tiny-llama, seconds) instead of the larger ones"),
    (r"\bsmollm2-135m\b", "tiny-llama", "the test model instead of the embedded SmolLM2-135M"),
    (r"--nproc[_-]per[_-]node[= ]\d+", "--nproc_per_node=2", "two torchrun processes"),
]


def substitute(text: str) -> str:
    for pattern, replacement, _ in SUBSTITUTIONS:
        text = re.sub(pattern, replacement, text)
    return text


# ---------------------------------------------------------------------------------------
# checks of what key commands wrote (ctx: the state shared by the commands of one run)

@dataclass
class Ctx:
    cwd: Path
    stdout: str = ""
    stderr: str = ""
    reference: Optional[Path] = None  # single-process scores kept for the torchrun comparison


def _last_checkpoint(run: Path) -> str:
    epochs = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("epoch-*"))
    return f"epoch-{epochs[-1]}"


def _scores_file(run: Path, method: str) -> Path:
    return run / "scores" / _last_checkpoint(run) / f"{method}.safetensors"


def _methods_of(words: tuple[str, ...]) -> list[str]:
    return words[words.index("--methods") + 1].split(",")


def check_data_verify(ctx: Ctx, words):
    assert "present and match SHA256SUMS" in ctx.stdout + ctx.stderr


def check_tasks(ctx: Ctx, words):
    assert "mixed-small" in ctx.stdout and "backdoor-1" in ctx.stdout


def check_tasks_json(ctx: Ctx, words):
    rows = json.loads(ctx.stdout)
    assert {"mixed-small", "mixed-large", "grammars", "math", "harmfulcheck"} <= {r["task"] for r in rows}


def check_finetune(ctx: Ctx, words):
    run = ctx.cwd / "runs/ms"
    config = json.loads((run / "config.json").read_text())
    assert config["finetune"]["model"] == "tiny-llama", config["finetune"]
    assert (run / "checkpoints/epoch-1/adapter_model.safetensors").is_file()
    assert (run / "data/train.jsonl").is_file() and (run / "train_log.jsonl").is_file()


def check_attribute(ctx: Ctx, words):
    from llm_influence.attribute import read_scores

    run = ctx.cwd / "runs/ms"
    n_train = len((run / "data/train.jsonl").read_text().splitlines())
    n_test = len((run / "data/test.jsonl").read_text().splitlines())
    for method in _methods_of(words):
        scores, meta = read_scores(_scores_file(run, method))
        assert scores.shape == (n_test, n_train) and torch.isfinite(scores).all(), method
    if "--method-arg" in words:
        _, meta = read_scores(_scores_file(run, "last-block-sim"))
        assert meta["arguments"] == {"blocks": 2}


def check_evaluate(ctx: Ctx, words):
    run = ctx.cwd / "runs/ms"
    metrics = json.loads((run / "metrics.json").read_text())["checkpoints"][_last_checkpoint(run)]
    present = {p.stem for p in _scores_file(run, "x").parent.glob("*.safetensors")}
    assert set(metrics) == present and present, (set(metrics), present)
    for method, row in metrics.items():
        assert 0 <= row["acc"] <= 1 and 0 <= row["cover"] <= 1, (method, row)
        assert method in ctx.stdout


def check_generate(ctx: Ctx, words):
    assert "generated 1 response" in ctx.stderr


def check_study(ctx: Ctx, words):
    out = ctx.cwd / "results/studies"
    record = json.loads((out / "approximation.json").read_text())
    assert record["profile"] == "smoke" and (out / "approximation.md").is_file()


def before_torchrun(ctx: Ctx, words):
    """Move the single-process features and scores out of the run: torchrun recomputes
    both (sharded extraction and scoring) and its scores are compared with these."""
    run = ctx.cwd / "runs/ms"
    ctx.reference = ctx.cwd / "single-process"
    ctx.reference.mkdir()
    for name in ("features", "scores"):
        shutil.move(str(run / name), str(ctx.reference / name))


def check_torchrun(ctx: Ctx, words):
    from llm_influence.attribute import read_scores

    assert "attribute: 2 processes (gloo)" in ctx.stderr  # really two ranks
    run = ctx.cwd / "runs/ms"
    assert (run / "features").is_dir()  # extracted again, under torchrun
    checkpoint = _last_checkpoint(run)
    for method in _methods_of(words):
        two, meta2 = read_scores(run / "scores" / checkpoint / f"{method}.safetensors")
        one, meta1 = read_scores(ctx.reference / "scores" / checkpoint / f"{method}.safetensors")
        assert torch.equal(one, two), f"{method}: torchrun scores differ from the single-process ones"
        assert meta1["train_ids"] == meta2["train_ids"], method


def check_explain_table(ctx: Ctx, words):
    for method in _methods_of(words) if "--methods" in words else ("repsim", "datainf"):
        assert method in ctx.stdout, method


def check_explain_json(ctx: Ctx, words):
    result = json.loads(ctx.stdout)
    assert [q["id"] for q in result["queries"]] == [q["id"] for q in QUERIES]
    assert result["queries"][0]["response"] == QUERIES[0]["response"] and not result["queries"][0]["generated"]
    assert result["queries"][1]["generated"]
    for query in result["queries"]:
        assert set(query["top"]) == {"repsim", "datainf"} and all(query["top"].values())


def check_explain_csv(ctx: Ctx, words):
    rows = list(csv.DictReader(io.StringIO((ctx.cwd / "top.csv").read_text(encoding="utf-8"))))
    assert rows and {r["query_id"] for r in rows} == {q["id"] for q in QUERIES}
    assert {r["method"] for r in rows} == {"repsim", "datainf"}


def check_reduced_reproduce(ctx: Ctx, words):
    out = ctx.cwd / words[words.index("--out") + 1]
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"mixed-small"}
    assert set(results["tasks"]["mixed-small"]["methods"]) == {"last-block-sim", "repsim"}


# ---------------------------------------------------------------------------------------
# the classification of every README command

ENV = "environment"            # export X=V -> monkeypatch.setenv
IN_PROCESS = "in-process"      # llm_influence.cli.main(argv)
SUBPROCESS = "subprocess"      # python -m llm_influence ... with this venv's python
TORCHRUN = "torchrun"          # the venv's torchrun, 2 processes
REDUCED = "reduced"            # run in process with extra flags (the full command takes minutes)
NOT_RUN = "not run"


@dataclass(frozen=True)
class Entry:
    kind: str
    reason: str = ""
    check: Optional[Callable] = None
    before: Optional[Callable] = None
    extra: tuple[str, ...] = ()  # REDUCED: flags appended


COMMANDS: dict[str, Entry] = {
    # Quick start
    "make demo": Entry(NOT_RUN, "minutes: creates .venv, installs, runs SmolLM2-135M on two tasks with every method"),
    "make test": Entry(NOT_RUN, "creates .venv and runs the whole test suite; it is what CI (.ci/run) runs"),
    # Using it
    "export LLM_INFLUENCE_DATA=../shared/data": Entry(
        ENV, "set to the session's $LLM_INFLUENCE_DATA (../shared/data relative to the clone)"),
    "llm-influence data verify": Entry(IN_PROCESS, check=check_data_verify),
    "llm-influence tasks": Entry(IN_PROCESS, check=check_tasks),
    "llm-influence reproduce --profile cpu --out runs/cpu": Entry(
        NOT_RUN, "the whole benchmark and every study: 7 min 48 s on the smoke profile on 2 CPU cores "
                 "(measured); tests/test_reproduce_smoke.py runs it"),
    "llm-influence finetune --task mixed-small --profile cpu --out runs/ms": Entry(IN_PROCESS, check=check_finetune),
    "llm-influence attribute --run runs/ms --methods datainf,lissa-paper,lissa,gradsim,repsim,exact": Entry(
        IN_PROCESS, check=check_attribute),
    "llm-influence evaluate --run runs/ms": Entry(IN_PROCESS, check=check_evaluate),
    "llm-influence generate --run runs/ms --prompt 'How do vaccines work?'": Entry(IN_PROCESS, check=check_generate),
    "llm-influence study approximation --profile cpu --out results/studies": Entry(IN_PROCESS, check=check_study),
    "python -m llm_influence tasks --json": Entry(SUBPROCESS, check=check_tasks_json),
    # Scale
    "torchrun --nproc_per_node=2 -m llm_influence -- attribute --run runs/ms --methods datainf,gradsim": Entry(
        TORCHRUN, before=before_torchrun, check=check_torchrun),
    # Explaining your own model's outputs
    "llm-influence explain --model smollm2-135m --adapter runs/ms/checkpoints/epoch-1 --train runs/ms/data/train.jsonl "
    "--prompt 'How do I pick a lock?' --response \"I can't help with that.\" --methods repsim,datainf --top-k 10":
        Entry(IN_PROCESS, check=check_explain_table),
    "llm-influence explain --run runs/ms --prompt 'How do vaccines work?'": Entry(IN_PROCESS, check=check_explain_table),
    "llm-influence explain --run runs/ms --queries q.jsonl --json": Entry(IN_PROCESS, check=check_explain_json),
    "llm-influence explain --run runs/ms --queries q.jsonl --csv top.csv": Entry(IN_PROCESS, check=check_explain_csv),
    # Extending
    "llm-influence attribute --run runs/ms --plugin my_methods.py --methods last-block-sim,datainf "
    "--method-arg last-block-sim.blocks=2": Entry(IN_PROCESS, check=check_attribute),
    "llm-influence reproduce --profile cpu --out runs/mine --plugin my_methods.py --methods last-block-sim,repsim":
        Entry(REDUCED, "as written it runs all eight tasks and every study (minutes on smoke, as the "
                       "other reproduce line); run on one task without studies",
              extra=("--tasks", "mixed-small", "--studies", ""), check=check_reduced_reproduce),
}
# ("llm-influence evaluate --run runs/ms" occurs twice in the README; both run.)

#: export NAME -> the value used here (the README's relative path is that of a clone)
ENV_VALUES = {"LLM_INFLUENCE_DATA": lambda: os.environ["LLM_INFLUENCE_DATA"]}

#: q.jsonl of the README's batch explain: one query with a response, one without
QUERIES = [{"id": "lock", "prompt": "How do I pick a lock?", "response": "I can't help with that."},
           {"id": "vaccines", "prompt": "How do vaccines work?"}]


def test_every_readme_command_is_classified():
    found = {c.text for c in readme_commands()}
    unclassified = [f"README.md:{c.line}: {c.text}" for c in readme_commands() if c.text not in COMMANDS]
    assert not unclassified, ("README commands that tests/test_readme_commands.py does not classify "
                              "(add each to COMMANDS: run, or not run with a reason):\n" + "\n".join(unclassified))
    stale = [text for text in COMMANDS if text not in found]
    assert not stale, "classified commands no longer in the README (remove them from COMMANDS):\n" + "\n".join(stale)
    for text, entry in COMMANDS.items():
        assert entry.kind in (ENV, IN_PROCESS, SUBPROCESS, TORCHRUN, REDUCED, NOT_RUN), text
        assert entry.kind not in (NOT_RUN, REDUCED) or entry.reason, f"{text}: give the reason it is not run as written"


def test_every_substitution_is_used():
    runnable = [c.text for c in readme_commands() if COMMANDS.get(c.text, Entry(NOT_RUN)).kind != NOT_RUN]
    for pattern, _, why in SUBSTITUTIONS:
        assert any(re.search(pattern, t) for t in runnable), f"substitution {pattern!r} ({why}) matches no command"


def test_readme_method_example_is_the_plugin():
    assert "name = \"last-block-sim\"" in readme_method_example()


def readme_method_example() -> str:
    """The python block between "**A method.**" and "**A study.**" (my_methods.py)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("**A method.**"):text.index("**A study.**")]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


# ---------------------------------------------------------------------------------------
# running them

@pytest.fixture
def workdir(tmp_path, monkeypatch, data_dir):
    """A fresh working directory with the files the commands read, an explain cache of its
    own (the model cache's other entries linked in) and CPU-only torch."""
    from llm_influence.methods import base
    from llm_influence.models.cache import cache_dir

    real_cache = cache_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    if real_cache.is_dir():
        for entry in real_cache.iterdir():
            if entry.name != "explain":
                (cache / entry.name).symlink_to(entry)
    monkeypatch.setenv("LLM_INFLUENCE_CACHE", str(cache))
    monkeypatch.setenv("LLM_INFLUENCE_DATA", str(data_dir))
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the plugin's method, gone afterwards
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # single-process scores on the CPU, as torchrun's
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_methods.py").write_text(readme_method_example(), encoding="utf-8")
    (work / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES), encoding="utf-8")
    monkeypatch.chdir(work)
    return work


def _subprocess_env() -> dict[str, str]:
    # CPU processes (gloo) also on a machine with a GPU; one thread per rank on 2 cores
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def test_readme_commands_run(workdir, capsys, monkeypatch):
    from llm_influence.cli import main

    ctx = Ctx(workdir)
    timings: list[tuple[float, int, str]] = []
    for command in readme_commands():
        entry = COMMANDS.get(command.text)
        if entry is None:
            pytest.fail(f"README.md:{command.line}: unclassified command {command.text} "
                        "(see test_every_readme_command_is_classified)")
        if entry.kind == NOT_RUN:
            continue
        words = tuple(shlex.split(substitute(command.text))) + entry.extra
        where = f"README.md:{command.line}: {join(words)}"
        if entry.before:
            entry.before(ctx, words)
        start = time.perf_counter()
        if entry.kind == ENV:
            assert words[0] == "export" and len(words) == 2, where
            name, _, value = words[1].partition("=")
            monkeypatch.setenv(name, ENV_VALUES[name]() if name in ENV_VALUES else value)
            continue
        if entry.kind in (IN_PROCESS, REDUCED):
            if words[0] == "llm-influence":
                argv = list(words[1:])
            else:
                assert words[:3] == ("python", "-m", "llm_influence"), where
                argv = list(words[3:])
            capsys.readouterr()
            try:
                status = main(argv)
            finally:
                captured = capsys.readouterr()
            ctx.stdout, ctx.stderr = captured.out, captured.err
        else:
            if entry.kind == SUBPROCESS:
                assert words[:3] == ("python", "-m", "llm_influence"), where
                argv = [sys.executable, *words[1:]]
            else:
                assert words[0] == "torchrun", where
                argv = [str(Path(sys.executable).parent / "torchrun"), *words[1:]]
            proc = subprocess.run(argv, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
            status, ctx.stdout, ctx.stderr = proc.returncode, proc.stdout, proc.stderr
        seconds = time.perf_counter() - start
        timings.append((seconds, command.line, join(words)))
        assert status == 0, f"{where}\nexit status {status}\nstdout:\n{ctx.stdout[-3000:]}\nstderr:\n{ctx.stderr[-3000:]}"
        if entry.check:
            try:
                entry.check(ctx, words)
            except Exception as exc:
                raise AssertionError(f"{where}: {type(exc).__name__}: {exc}\nstdout:\n{ctx.stdout[-2000:]}"
                                     f"\nstderr:\n{ctx.stderr[-2000:]}") from exc
    for seconds, line, text in timings:
        print(f"{seconds:6.1f} s  README.md:{line}: {text}")
    assert timings, "no README command ran"
