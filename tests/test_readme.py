"""README holds exactly two set-up commands, and CI runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    return dict(re.findall(r"<!-- (\w+-command) -->\n```bash\n(.+)\n```", text))


def test_readme_has_the_two_commands() -> None:
    commands = readme_commands()
    assert set(commands) == {"main-command", "test-command"}
    assert "fewstep distill --recipe lcm" in commands["main-command"]
    assert "pytest" in commands["test-command"]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()["test-command"] in ci
