"""A built wheel carries both import roots, the presets and the embedded digits world, and works on its own."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("fewstep-*.whl")
    return path


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fewstep/cli.py" in names
    assert "fewstep_kernels/__init__.py" in names
    assert "fewstep/_presets/README.md" in names
    assert "fewstep/assets/digits/teacher/model_index.json" in names
    assert "fewstep/assets/digits/evaluator/config.json" in names
    assert "fewstep/assets/video/teacher/transformer/diffusion_pytorch_model.safetensors" in names
    assert "fewstep/assets/video/evaluator/config.json" in names
    assert "fewstep/assets/video/teacher_bench/report.json" in names
    assert not any(n.startswith(("recipes/", "kernels/", "tests/")) for n in names)


def test_installed_wheel_runs(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    subprocess.run(pip, check=True, timeout=300)
    code = (
        "import fewstep, fewstep_kernels, torch\n"
        "from fewstep.training.config import presets_dir\n"
        "from fewstep.loading import load_denoiser\n"
        f"assert fewstep.__file__.startswith({str(site)!r}), fewstep.__file__\n"
        "assert (presets_dir() / 'README.md').is_file() and '_presets' in str(presets_dir())\n"
        "den, pipe = load_denoiser('digits')\n"
        "x = torch.randn(2, 1, 8, 8)\n"
        "assert den(x, torch.tensor([0.5, 0.5]), {'class_labels': torch.tensor([1, 2])}).shape == x.shape\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
