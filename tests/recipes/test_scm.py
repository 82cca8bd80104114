"""The sCM recipe on a small random digits pipeline: the training step runs through the JVP and trains only the
student; at initialisation the student's TrigFlow velocity equals the teacher's, so the first tangent term is 0."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.export.pipeline import scheduler_for_plan
from fewstep.export.scheduling_fewstep import FewStepScheduler
from fewstep.loading import load_denoiser
from fewstep.objectives.adversarial import ladd_losses, with_largest_time
from fewstep.objectives.losses import (
    adaptive_weighted_loss,
    normalize_tangent,
    rcm_tangent,
    scm_tangent,
    tangent_warmup,
    trigflow_time_proposal,
    trigflow_weight,
)
from fewstep.objectives.tangent import directional_derivative
from fewstep.recipes.base import Batch
from fewstep.recipes.scm import SCM, SCMConfig
from fewstep.sampling import plan_in, sample_plan
from fewstep.schedules import Flow, TrigFlow, append_dims, velocity
from fewstep.teacher import guidance_condition
from fewstep.time_embedding import time_input_layers
from fewstep.training.config import find_preset, merge_into, read_toml
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


# ---------------------------------------------------------------------------------------------------------------
# sigma_data and the proposals' reference std (issue 15, item 4); rCM's loss form and plan (item 3)


def digits_config(recipe: str, cfg: Any) -> Any:
    """The recipe's digits preset without its [train] table."""
    preset = {k: v for k, v in read_toml(find_preset(recipe, "digits")).items() if k != "train"}
    return merge_into(cfg, preset)


def old_scm_loss(recipe: SCM, batch: Batch, step: int) -> dict[str, torch.Tensor]:
    """sCM's loss as it was computed before the proposals took a reference std, written out: the proposal
    t = atan(exp(N) / sd) and LADD's t_D = atan(exp(N) / sd) with sd the schedule's own sigma_data."""
    cfg, sd = recipe.cfg, recipe.cfg.sigma_data
    assert batch.x0 is not None
    x0, b = batch.x0, batch.x0.shape[0]
    cond = {**batch.cond, **guidance_condition(recipe.student.model, torch.full((b,), cfg.guidance))}

    def proposal(mean: float, std: float) -> torch.Tensor:
        return torch.atan(torch.exp(mean + std * torch.randn(b, dtype=torch.float64)) / sd).float()

    t = proposal(cfg.p_mean, cfg.p_std).clamp(1e-3, math.pi / 2 - 1e-3)
    x_t = recipe.trig.add_noise(x0, torch.randn_like(x0), t)
    c_t = recipe.trig.coeffs(append_dims(t, x_t.ndim))
    with torch.no_grad():
        dxt_dt = velocity(recipe.teacher.guided(x_t, t, batch.cond, batch.uncond, cfg.guidance), x_t, c_t)
        cs = t.cos() * t.sin()
        F_minus, dF_dt, _ = directional_derivative(
            lambda x, s: recipe.F(x, s, cond), (x_t, t), (append_dims(cs, x_t.ndim) * dxt_dt, cs), recipe.method
        )
        g = scm_tangent(F_minus, dF_dt, dxt_dt, x_t, t, sd, tangent_warmup(step, cfg.tangent_warmup_steps))
        target = F_minus + normalize_tangent(g, cfg.tangent_c)
    logvar = recipe.logvar(t) if cfg.adaptive_weighting else torch.zeros_like(t)
    loss = adaptive_weighted_loss(recipe.F(x_t, t, cond), target, logvar, trigflow_weight(t, sd)).mean()
    if recipe.disc is None:
        return {"student": loss}
    t_g = with_largest_time(proposal(cfg.p_mean, cfg.p_std).clamp(1e-3, math.pi / 2), math.pi / 2,
                            cfg.adv_largest_t_prob)  # fmt: skip
    x_g = recipe.trig.add_noise(x0, torch.randn_like(x0), t_g)
    c_g = recipe.trig.coeffs(append_dims(t_g, x0.ndim))
    x0_theta = c_g.alpha * x_g - c_g.sigma * recipe.F(x_g, t_g, cond)
    t_d = proposal(cfg.adv_p_mean, cfg.adv_p_std).clamp(0, math.pi / 2)
    generator, critic = ladd_losses(recipe.disc, x0_theta, x0, t_d, batch.cond)
    return {"student": loss + cfg.adv_weight * generator, "critic": critic}


def test_digits_preset_losses_are_the_old_code_paths(random_digits: Path) -> None:
    """The digits preset was tuned at sigma_data 0.5 on the unscaled digits: it keeps that, bit for bit."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = SCM(teacher, digits_config("scm", SCMConfig()))
    assert recipe.cfg.sigma_data == 0.5 and recipe.disc is not None
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=8)(0)
    for step in (0, 100, 400):
        torch.manual_seed(step)
        new = recipe.loss(batch, step)
        torch.manual_seed(step)
        old = old_scm_loss(recipe, batch, step)
        assert sorted(new) == sorted(old) and all(torch.equal(new[k], old[k]) for k in new)


def unit_batch(model: torch.nn.Module, b: int) -> Batch:
    x0 = torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(b) % 10
    return Batch(x0, {"class_labels": labels}, {"class_labels": torch.full_like(labels, null_class_of(model))})


def recorder(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[torch.Tensor]:
    """Wrap ``module.name`` so that every result it returns is appended to the returned list."""
    seen: list[torch.Tensor] = []
    fn = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(fn(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(module, name, wrapped)
    return seen


def median_log_ratio(schedule: Any, t: torch.Tensor) -> float:
    return float(torch.log(schedule.ratio(t.double())).median())


def test_default_times_mean_sana_sprints_noise_to_signal_ratios_on_unit_data(
    random_digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SANA-Sprint scales unit latents to std 0.5 and states its proposals for that data: t = atan(exp(N) / 0.5),
    N ~ N(0.2, 1.6^2), and LADD's t_D with N ~ N(-0.6, 1). On unit-variance data their median noise-to-signal
    ratios are e^0.2 / 0.5 and e^-0.6 / 0.5; the defaults (sigma_data 1, the proposals stated for std 0.5) mean
    exactly that."""
    import fewstep.recipes.scm as scm_module

    teacher, _ = load_denoiser(str(random_digits))
    recipe = SCM(teacher, SCMConfig(adv_weight=0.5))
    assert recipe.cfg.sigma_data == 1.0
    seen = {"t": recorder(monkeypatch, scm_module, "trigflow_time_proposal"),
            "t_d": recorder(monkeypatch, scm_module, "discriminator_times")}  # fmt: skip
    torch.manual_seed(0)
    recipe.loss(unit_batch(teacher.model, 1024), 0)
    assert median_log_ratio(recipe.trig, seen["t"][0]) == pytest.approx(0.2 - math.log(0.5), abs=0.2)
    assert median_log_ratio(recipe.trig, seen["t_d"][0]) == pytest.approx(-0.6 - math.log(0.5), abs=0.15)


def test_rcm_consistency_loss_is_loss_scale_times_the_summed_square(random_digits: Path) -> None:
    """rCM's form (NVlabs/rcm t2v_model_distill_rcm.py, _student_scm_step): loss_scale * sum over elements of
    (F_theta - F^- - g)^2 with rCM's tangent warm-up, no w(t) and no logvar; averaged over the batch."""
    teacher, _ = load_denoiser(str(random_digits))
    cfg = SCMConfig(scm_loss="rcm", loss_scale=100.0, tangent_warmup_steps=10)
    recipe = SCM(teacher, cfg)
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    step = 5  # r = 0.5: rCM's warm-up differs from SANA-Sprint's
    torch.manual_seed(0)
    loss = recipe.loss(batch, step)["student"]
    torch.manual_seed(0)
    x0, b = batch.x0, 4
    assert x0 is not None
    cond = {**batch.cond, **guidance_condition(recipe.student.model, torch.full((b,), cfg.guidance))}
    t = trigflow_time_proposal(b, cfg.p_mean, cfg.p_std, cfg.sigma_data, cfg.p_sigma_data)
    t = t.clamp(1e-3, math.pi / 2 - 1e-3)
    x_t = recipe.trig.add_noise(x0, torch.randn_like(x0), t)
    with torch.no_grad():
        dxt_dt = velocity(recipe.teacher(x_t, t, batch.cond), x_t, recipe.trig.coeffs(append_dims(t, 4)))
        cs = t.cos() * t.sin()
        F_minus, dF_dt, _ = directional_derivative(
            lambda x, s: recipe.F(x, s, cond), (x_t, t), (append_dims(cs, 4) * dxt_dt, cs), recipe.method
        )
        g = normalize_tangent(rcm_tangent(F_minus, dF_dt, dxt_dt, x_t, t, cfg.sigma_data, 0.5), cfg.tangent_c)
    expected = 100.0 * ((recipe.F(x_t, t, cond) - F_minus - g) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in recipe.logvar.parameters())


def test_rcm_plan_is_rcms_sampler(random_digits: Path) -> None:
    """rCM's sampler (NVlabs/rcm t2v_model_distill_rcm.py, generate_samples_from_batch): from atan(sigma_max = 80),
    then the first n - 1 of mid_t = (1.5, 1.4, 1.0), x = cos t x0 + sin t z between steps; export keeps the times."""
    teacher, _ = load_denoiser(str(random_digits))
    cfg = SCMConfig(plan_t_max=math.atan(80), plan_mids=(1.5, 1.4, 1.0), plan_steps=(1, 2, 3, 4))
    plans = SCM(teacher, cfg).plan()
    for n in (1, 2, 3, 4):
        assert plans[n].times == (math.atan(80), *cfg.plan_mids[: n - 1]) and plans[n].gamma == 1.0
        assert plans[n].schedule == TrigFlow(1.0)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # any function of (x, t)
        return torch.tanh(x) * append_dims(t.cos(), x.ndim) + 0.1

    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    out = sample_plan(denoise, plans[4], noise, generator=torch.Generator().manual_seed(5))
    gen, x = torch.Generator().manual_seed(5), noise
    times = [*plans[4].times, 0.0]
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        x0 = denoise(x, torch.full((3,), t))
        x = x0 if t_next == 0 else math.cos(t_next) * x0 + math.sin(t_next) * torch.randn(x.shape, generator=gen)
    torch.testing.assert_close(out, x)
    exported = scheduler_for_plan(plans, "trigflow")
    assert isinstance(exported, FewStepScheduler)
    assert {n: tuple(ts) for n, ts in exported.config["plan"].items()} == {str(n): p.times for n, p in plans.items()}


@pytest.mark.parametrize(
    "bad",
    [
        {"plan_mids": (1.5, 1.4), "plan_steps": (1, 2, 4)},  # 4 steps need 3 mid times
        {"plan_mids": (1.4, 1.5), "plan_steps": (1, 2, 3)},  # not decreasing
        {"plan_t_max": 1.2},  # plan_mid 1.3 above the first time
    ],
)
def test_a_plan_that_cannot_run_is_a_one_line_error(random_digits: Path, bad: dict[str, Any]) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    with pytest.raises(FewstepError, match="plan"):
        SCM(teacher, SCMConfig(**bad))
