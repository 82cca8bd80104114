"""benchmarks/eta_tradeoff.py: each gamma replaces the student's per-step gammas too, one step is flat in gamma (it
re-noises nothing), and the table, JSON and plot are written."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from benchmark_scripts import load_benchmark

from fewstep.distill import run_distill
from fewstep.recipes.hyper_sd import HyperSD, HyperSDConfig
from fewstep.training.config import merge_into


def load_script() -> ModuleType:
    return load_benchmark("eta_tradeoff")


def test_gamma_sweep_of_a_lora_student(random_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = HyperSDConfig(w_min=1.0, w_max=1.0, stage_steps=(1, 1, 1, 1), lora_rank=4, plan_gammas=(1.0, 0.3, 0.5, 1.0))
    cfg = merge_into(cfg, {"train": {"max_steps": 1, "batch_size": 4, "progress": False}})
    student = run_distill(HyperSD, cfg, teacher=str(random_digits), output=tmp_path / "run", bench=False)
    out = tmp_path / "eta"
    script = load_script()
    seeds: list[int] = []
    score = script.DigitsWorld.score
    monkeypatch.setattr(script.DigitsWorld, "score", lambda self, *a: seeds.append(a[4]) or score(self, *a))
    args = [str(student), "--gammas", "0,1", "--steps", "1,2", "--num", "40", "--seeds", "1", "--output", str(out)]
    assert script.main([*args, "--first-seed", "100"]) == 0
    assert set(seeds) == {100}  # noise seeds apart from the bench's 0, 1, 2, ...
    assert script.main(args) == 0 and set(seeds) == {0, 100}
    rows = {(r["steps"], r["gamma"]): r for r in json.loads((out / "eta_tradeoff.json").read_text())["rows"]}
    assert rows[(1, 0.0)]["fid"] == rows[(1, 1.0)]["fid"]  # one step: no re-noising, the same samples
    assert rows[(2, 0.0)]["fid"] != rows[(2, 1.0)]["fid"]  # the student's own 2-step gamma (0.3) did not stick
    assert (out / "eta_tradeoff.png").stat().st_size > 0
