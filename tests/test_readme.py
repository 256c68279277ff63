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
