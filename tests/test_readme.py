"""The README tells the truth: CI runs its test command, and every Python snippet in it runs as written."""

import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line and not line.startswith(("#", "set ", "cd ", "export "))]
    readme_blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    readme_commands = [line for block in readme_blocks for line in block.splitlines()]
    assert len(ci_commands) == 1
    assert ci_commands[0] in readme_commands
    assert "pytest" in ci_commands[0]


def test_ci_requires_the_cpp_extension():
    """CI fails when the C++ extension did not build instead of skipping its tests."""
    assert "export FASTCNF_REQUIRE_EXTENSION=1" in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_has_python_snippets():
    assert len(PYTHON_BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_snippet_runs(index, capsys):
    torch.manual_seed(0)
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})


def _cli_commands():
    """``(command, argument tokens)`` of every ``-m fastcnf`` command line in README's code blocks."""
    blocks = re.findall(r"```(?:bash|text)\n(.*?)```", README, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        match = re.search(r"-m fastcnf (\w+)(.*)", line.split(" # ")[0])
        if match:
            tokens = [re.sub(r"\{(\w+),.*\}", r"\1", token) for token in match.group(2).split() if token != "..."]
            commands.append((match.group(1), tokens))
    return commands


def _subparsers():
    import argparse

    from fastcnf.training.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_cli_options_have_one_spelling_and_the_readme_uses_it():
    """``--batch`` and ``--batch-size`` were two spellings of one option, and README used the first."""
    commands = _subparsers()
    for name, parser in commands.items():
        for action in parser._actions:
            long_options = [option for option in action.option_strings if option.startswith("--")]
            assert len(long_options) <= 1, (name, long_options)
    found = _cli_commands()
    assert {name for name, _ in found} >= {"train", "sample", "eval"}
    for name, tokens in found:
        parser = commands[name]
        for token in tokens:
            if token.startswith("--"):
                assert token in parser._option_string_actions, (name, token)
        parser.parse_args(tokens)  # exits (SystemExit) on a bad value or a missing argument
    train = commands["train"]._option_string_actions
    for option in set(re.findall(r"`(--[a-z0-9-]+)", README)):
        assert option in train, option


def test_adjoint_snippets_give_the_solver_their_parameters():
    """odeint_adjoint finds parameters on an nn.Module only: a lambda needs ``adjoint_params``."""
    calls = [block[match.start():] for block in PYTHON_BLOCKS for match in re.finditer(r"odeint_adjoint\(", block)]
    assert calls
    for call in calls:
        head = call[:call.find(")\n") + 1]
        if "lambda" in head.split(",")[0]:
            assert "adjoint_params" in head, head
