"""benchmarks/gpu_check.sh (the script run when a GPU is lent) without a GPU: its bash syntax, the flags it passes
to bench_attention_jvp.py parse with that script's own parser, and without CUDA it stops with one line."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BENCH = ROOT / "benchmarks" / "bench_attention_jvp.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_attention_jvp", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_invocations() -> list[list[str]]:
    """The argument lists gpu_check.sh passes to bench_attention_jvp.py, with its shell variables filled in as the
    loop over head dims would ("$d" -> 64, "$out" -> a folder)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        if "benchmarks/bench_attention_jvp.py" in line and not line.lstrip().startswith("#"):
            words = shlex.split(line.split("benchmarks/bench_attention_jvp.py", 1)[1].split("||")[0])
            calls.append([w.replace("$d", "64").replace("$out", "/tmp/out") for w in words])
    return calls


def test_gpu_check_is_valid_bash() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    subprocess.run([bash, "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text and os.access(SCRIPT, os.X_OK)
    # every kernel test runs on the compiled kernels, not only the gpu-marked ones
    assert re.search(r"pytest -q -m \"not slow\" tests/kernels tests/bench/test_measure.py", text)


def test_gpu_check_bench_flags_parse() -> None:
    calls = bench_invocations()
    assert calls, "gpu_check.sh runs bench_attention_jvp.py"
    parser = load_bench().build_parser()
    for words in calls:
        args = parser.parse_args(words)
        assert args.device == "cuda" and args.sizes == "4096" and args.dtype == "bfloat16"
        assert str(args.out).startswith("/tmp/out/")
    assert "for d in 64 128" in SCRIPT.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_without_cuda_fails_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "no CUDA" in proc.stderr
