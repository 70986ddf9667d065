"""The command line's contract: every option of every subcommand has help text, finite
choices are declared, one flag name has one meaning, ``--data-dir`` exists exactly where
task data are read, and ``python -m llm_influence`` is the CLI."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from llm_influence.cli import PLUGIN_COMMANDS, build_parser, main


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """``{"attribute": parser, "data fetch": parser, ...}``, walking nested subcommands."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix}{name}"
                out[full] = sub
                out.update(_subcommands(sub, full + " "))
    return out


COMMANDS = _subcommands(build_parser())


def _options(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in sub._actions for opt in a.option_strings if opt.startswith("--") and opt != "--help"}


def test_every_option_of_every_subcommand_has_help():
    missing = [(name, a.dest) for name, sub in COMMANDS.items() for a in sub._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and (not a.help or a.help == argparse.SUPPRESS or not a.help.strip())]
    assert not missing, f"options without help: {missing}"
    assert {"tasks", "finetune", "generate", "attribute", "evaluate", "reproduce", "explain", "study", "report",
            "data", "data fetch", "data verify"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_of_every_subcommand_prints(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main(name.split() + ["--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_one_flag_one_meaning():
    """The renamed flags are gone everywhere, and a shared flag reads the same wherever it is."""
    retired = {"--batch-size", "--dtype", "--autocast", "--top", "--lissa-iters", "--lissa-scale", "--hessian"}
    for name, sub in COMMANDS.items():
        assert not retired & set(_options(sub)), (name, retired & set(_options(sub)))
    helps: dict[str, set[str]] = {}
    for name, sub in COMMANDS.items():
        for opt, action in _options(sub).items():
            helps.setdefault(opt, set()).add(action.help)
    for opt in ("--extract-batch-size", "--extract-dtype", "--rank-by", "--method-arg", "--damping",
                "--chunk-size", "--quiet", "--trust-remote-code"):
        assert len(helps[opt]) == 1 or opt == "--extract-batch-size", (opt, helps[opt])


def test_data_dir_exactly_where_data_are_read():
    with_data = {name for name, sub in COMMANDS.items() if "--data-dir" in _options(sub)}
    assert with_data == {"tasks", "finetune", "reproduce", "study", "data verify", "backdoor"}


def test_plugin_exactly_where_methods_or_studies_are_chosen():
    with_plugin = {name for name, sub in COMMANDS.items() if "--plugin" in _options(sub)}
    assert with_plugin == set(PLUGIN_COMMANDS)


def test_finite_choices_are_declared():
    for name, opt in [("finetune", "--profile"), ("reproduce", "--profile"), ("study", "--profile"),
                      ("finetune", "--train-dtype"), ("attribute", "--extract-dtype"), ("finetune", "--loss-on"),
                      ("attribute", "--rep-pooling"), ("evaluate", "--rank-by"), ("finetune", "--validation")]:
        assert _options(COMMANDS[name])[opt].choices, (name, opt)


def test_loss_on_choices_are_the_formatters():
    """Every ``--loss-on`` accepts exactly the encodings :class:`ChatFormatter` implements."""
    from llm_influence.models.formatting import LOSS_ON_CHOICES

    flags = [(name, _options(sub)["--loss-on"]) for name, sub in COMMANDS.items() if "--loss-on" in _options(sub)]
    assert {name for name, _ in flags} >= {"finetune", "explain"}
    for name, action in flags:
        assert tuple(action.choices) == LOSS_ON_CHOICES, name


def test_inapplicable_flags_are_errors(tmp_path, capsys):
    run = str(tmp_path / "run")
    cases = [
        (["attribute", "--run", run, "--methods", "gradsim", "--damping", "0.1"], "--damping"),
        (["attribute", "--run", run, "--project-seed", "3"], "--project-seed/--project-kind"),
        (["reproduce", "--out", run, "--seed-tasks", "mixed-small"], "--seed-tasks"),
        (["finetune", "--task", "mixed-small", "--out", run, "--validation", "none", "--val-per-group", "2"],
         "--val-per-group"),
        (["explain", "--model", "m", "--train", "t.jsonl", "--checkpoint", "last", "--prompt", "p"], "--checkpoint"),
        (["evaluate", "--run", run, "--data-dir", "x"], "unrecognized arguments: --data-dir"),
        (["report", "--out", run], "unrecognized arguments: --out"),
    ]
    for argv, flag in cases:
        status = main(argv)
        err = capsys.readouterr().err.strip()
        assert status == 2 and flag in err and len(err.splitlines()) == 1, (argv, err)


def test_python_dash_m_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "llm_influence", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "attribute" in out.stdout and "llm-influence" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "llm_influence", "attribute", "--nope"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
