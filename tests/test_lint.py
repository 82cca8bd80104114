"""ruff and mypy (on fewstep/) as part of the suite, so CI holds the style the project agreed on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "fewstep", "tests", "benchmarks", "kernels"],
        ["ruff", "format", "--check", "fewstep", "tests", "benchmarks", "kernels"],
        [sys.executable, "-m", "mypy", "fewstep"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tool_is_clean(cmd: list[str]) -> None:
    if cmd[0] == "ruff" and shutil.which("ruff") is None:
        cmd = [sys.executable, "-m", *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
