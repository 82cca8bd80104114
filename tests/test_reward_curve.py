"""benchmarks/reward_curve.py: each checkpoint's EMA adapter is what is scored (the last one equals the exported
student), a feedback stage's checkpoints differ, and the table, JSON and plot are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

from fewstep.bench.worlds import DigitsWorld, generate_digits
from fewstep.distill import run_distill
from fewstep.loading import load_pipeline
from fewstep.recipes.hyper_sd import HyperSD, HyperSDConfig
from fewstep.training.config import merge_into


def test_reward_and_fid_over_a_feedback_runs_checkpoints(random_digits: Path, tmp_path: Path) -> None:
    # adapters beside the default set too (the digits preset's time path): the checkpoints hold them
    cfg = HyperSDConfig(w_min=1.0, w_max=1.0, segments=(1,), stage_steps=(2,), lora_rank=4, lr=1e-2,
                        lora_extra_targets=("norm1.linear", "proj_out_1"),
                        reward="digits", reward_steps=2, reward_weight=10.0)  # fmt: skip
    train = {"max_steps": 4, "batch_size": 4, "progress": False, "checkpoint_every": 2, "keep_checkpoints": 5}
    cfg = merge_into(cfg, {"train": train})
    run_distill(HyperSD, cfg, teacher=str(random_digits), output=tmp_path / "run", bench=False)
    script, out = load_benchmark("reward_curve"), tmp_path / "reward"
    args = [str(tmp_path / "run"), "--steps", "2", "--num", "40", "--seeds", "1", "--output", str(out)]
    assert script.main(args) == 0
    rows = json.loads((out / "reward_curve.json").read_text())["rows"]
    assert [r["checkpoint"] for r in rows] == [2, 4]
    assert rows[0]["reward"] != rows[1]["reward"] and all(r["reward"] <= 0 for r in rows)  # log p <= 0
    # the last checkpoint's EMA adapter is the exported student: the same samples, the same FID
    with torch.no_grad():
        images, _ = generate_digits(load_pipeline(str(tmp_path / "run" / "student")), 40, 2, 1.0, 0, 500)
    # equal up to float32 rounding: the export merges the adapter into the weights, the script keeps it apart
    assert DigitsWorld().metrics.fid_held_out(images) == pytest.approx(rows[1]["fid"], rel=1e-6)
    assert (out / "reward_curve.png").stat().st_size > 0
