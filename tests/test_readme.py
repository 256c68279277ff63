"""The README's test command is what CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line and not line.startswith(("#", "set ", "cd "))]
    readme_blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    readme_commands = [line for block in readme_blocks for line in block.splitlines()]
    assert len(ci_commands) == 1
    assert ci_commands[0] in readme_commands
    assert "pytest" in ci_commands[0]
