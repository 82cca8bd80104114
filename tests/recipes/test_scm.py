"""The sCM recipe on a small random digits pipeline: the training step runs through the JVP and trains only the
student; at initialisation the student's TrigFlow velocity equals the teacher's, so the first tangent term is 0."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fewstep.loading import load_denoiser
from fewstep.recipes.scm import SCM, SCMConfig
from fewstep.sampling import plan_in
from fewstep.schedules import Flow, append_dims, velocity
from fewstep.time_embedding import time_input_layers
from fewstep.training.data import DigitsBatches, null_class_of
from fewstep.training.trainer import TrainConfig, Trainer


def test_student_starts_as_the_teacher(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = SCM(teacher, SCMConfig(time_max_freq=math.inf))  # no time smoothing: the very same function
    x, labels = torch.randn(4, 1, 8, 8), torch.arange(4)
    t = torch.tensor([0.2, 0.7, 1.2, 1.5])
    cond = {"class_labels": labels}
    with torch.no_grad():
        dxt_dt = velocity(recipe.teacher(x, t, cond), x, recipe.trig.coeffs(append_dims(t, x.ndim)))
        F = recipe.F(x, t, cond)
    torch.testing.assert_close(recipe.cfg.sigma_data * F, dxt_dt, rtol=1e-4, atol=1e-4)  # dx/dt = sd F


def test_default_student_differs_from_the_teacher_only_in_fast_time_channels(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = SCM(teacher, SCMConfig())
    changed = {
        name
        for (name, a), b in zip(teacher.model.named_parameters(), recipe.student.model.parameters(), strict=True)
        if not torch.equal(a, b)
    }
    assert changed and all(name.endswith("timestep_embedder.linear_1.weight") for name in changed)
    for linear, freqs in time_input_layers(teacher.model):  # the teacher keeps its fast columns
        assert torch.all(linear.weight[:, freqs > recipe.cfg.time_max_freq].abs().sum(0) > 0)
    for linear, freqs in time_input_layers(recipe.student.model):
        assert torch.all(linear.weight[:, freqs > recipe.cfg.time_max_freq] == 0)


def test_training_steps_move_only_the_student(random_digits: Path, tmp_path: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    frozen = [p.detach().clone() for p in teacher.model.parameters()]
    recipe = SCM(teacher, SCMConfig(tangent_warmup_steps=2))
    data = DigitsBatches(null_class_of(teacher.model), batch_size=8)
    trainer = Trainer(recipe, TrainConfig(max_steps=3, batch_size=8, progress=False), tmp_path, data)
    history = trainer.fit()
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["student"])) for h in history)
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.model.parameters(), strict=True))
    moved = [not torch.equal(a, b) for a, b in zip(frozen, recipe.student.model.parameters(), strict=True)]
    assert any(moved)
    plans = {n: plan_in(p, Flow()) for n, p in recipe.plan().items()}
    assert plans[1].times == (1.0,) and 0 < plans[2].times[1] < 1


def test_without_adaptive_weighting_the_logvar_head_stays_put(random_digits: Path, tmp_path: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = SCM(teacher, SCMConfig(adaptive_weighting=False))
    before = [p.detach().clone() for p in recipe.logvar.parameters()]
    data = DigitsBatches(null_class_of(teacher.model), batch_size=8)
    Trainer(recipe, TrainConfig(max_steps=2, batch_size=8, progress=False), tmp_path, data).fit()
    assert all(torch.equal(a, b) for a, b in zip(before, recipe.logvar.parameters(), strict=True))


def test_logvar_head_can_have_its_own_learning_rate(random_digits: Path, tmp_path: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = SCM(teacher, SCMConfig(lr=1e-4, logvar_lr=1e-6))
    data = DigitsBatches(null_class_of(teacher.model), batch_size=4)
    trainer = Trainer(recipe, TrainConfig(max_steps=1, batch_size=4, progress=False), tmp_path, data)
    groups = trainer.optimizers["student"].param_groups
    by_lr = {g["lr"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert by_lr == {1e-4: sum(p.numel() for p in recipe.student.model.parameters()),
                     1e-6: sum(p.numel() for p in recipe.logvar.parameters())}  # fmt: skip
