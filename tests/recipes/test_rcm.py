"""rCM on a small random digits pipeline: sCM alone until dmd_start, then the DMD term on backward-simulated student
samples with a fake score that starts as the teacher and steps on its own schedule."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fewstep.distill import run_distill
from fewstep.loading import load_denoiser
from fewstep.objectives.dmd import distribution_matching_loss, uniform_times
from fewstep.recipes import resolve
from fewstep.recipes.rcm import RCM, RCMConfig
from fewstep.training.config import merge_into
from fewstep.training.data import DigitsBatches, null_class_of


def test_registered() -> None:
    assert resolve("rcm") is RCM


def test_fake_score_starts_as_the_teacher_so_the_first_dmd_gradient_is_zero(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = RCM(teacher, RCMConfig())
    x0 = torch.randn(6, 1, 8, 8)
    cond = {"class_labels": torch.arange(6)}
    native = recipe.real.schedule
    t = uniform_times(native, 6)
    real = lambda x, s: recipe.real(x, s, cond)  # noqa: E731
    fake = lambda x, s: recipe.fake(x, s, cond)  # noqa: E731
    loss, grad = distribution_matching_loss(x0, t, native, real, fake)
    assert torch.equal(grad, torch.zeros_like(grad)) and float(loss) == 0.0
    assert all(p.requires_grad for p in recipe.fake.model.parameters())
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_schedule_of_losses(random_digits: Path) -> None:
    """sCM alone before dmd_start; then the fake score on every iteration and the student on every k-th."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = RCM(teacher, RCMConfig(dmd_start=2, student_update_freq=3, plan_steps=(1, 2)))
    data = DigitsBatches(null_class_of(teacher.model), batch_size=4)
    keys = [sorted(recipe.loss(data(step), step)) for step in range(7)]
    assert keys[:2] == [["student"], ["student"]]
    assert keys[2:] == [["fake", "student"], ["fake"], ["fake"], ["fake", "student"], ["fake"]]


def test_distill_trains_student_and_fake_and_resumes_exactly(random_digits: Path, tmp_path: Path) -> None:
    def cfg(steps: int) -> RCMConfig:
        train = {"max_steps": steps, "batch_size": 4, "checkpoint_every": 2, "progress": False}
        rcm = RCMConfig(dmd_start=1, student_update_freq=2, fake_lr=1e-3, lr=1e-3, plan_steps=(1, 2))
        return merge_into(rcm, {"train": train})

    straight, parts = tmp_path / "straight", tmp_path / "parts"
    run_distill(RCM, cfg(4), teacher=str(random_digits), output=straight, bench=False)
    run_distill(RCM, cfg(2), teacher=str(random_digits), output=parts, bench=False)
    run_distill(RCM, cfg(4), teacher=str(random_digits), output=parts, resume="", bench=False)
    a = json.loads((straight / "checkpoints" / "losses.json").read_text())
    b = json.loads((parts / "checkpoints" / "losses.json").read_text())
    assert [sorted(k for k in h if k in ("student", "fake")) for h in a] == [
        ["student"], ["fake", "student"], ["fake"], ["fake", "student"]
    ]  # fmt: skip
    assert [(h.get("student"), h.get("fake")) for h in a] == [(h.get("student"), h.get("fake")) for h in b]
    assert (straight / "student" / "model_index.json").is_file()


def test_dmd_alone_when_the_consistency_weight_is_zero(random_digits: Path) -> None:
    """scm_weight = 0 and dmd_start = 0: the student's loss is the DMD term alone (the ablation baseline)."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = RCM(teacher, RCMConfig(dmd_start=0, scm_weight=0.0, plan_steps=(1,)))
    data = DigitsBatches(null_class_of(teacher.model), batch_size=4)
    calls = []
    recipe.scm.loss = lambda *a: calls.append(a) or {}  # type: ignore[method-assign]
    out = recipe.loss(data(0), 0)
    assert sorted(out) == ["fake", "student"] and not calls
    assert float(out["student"]) == 0.0  # the fake score starts as the teacher: DMD's first gradient is zero
