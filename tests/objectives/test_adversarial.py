"""The LADD discriminator reads every supported backbone: one head per block, (B,) logits, gradients to the input;
its re-noising times, its losses, and the recipes that use it (sCM's LADD, LCM with PCM's adversarial term)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TinyModel

from fewstep.loading import load_denoiser
from fewstep.objectives.adversarial import (
    TeacherDiscriminator,
    discriminator_times,
    hinge_critic_loss,
    hinge_generator_loss,
    ladd_losses,
    score_gan_losses,
    with_largest_time,
)
from fewstep.schedules import VP, Flow, TrigFlow, schedule_from_diffusers_config
from fewstep.teacher import Denoiser
from fewstep.training.data import DigitsBatches, null_class_of
from fewstep.training.trainer import TrainConfig, Trainer


def test_discriminator_on_every_backbone(tiny: TinyModel) -> None:
    model = tiny.build().eval().requires_grad_(False)
    native, prediction = schedule_from_diffusers_config(tiny.scheduler())
    disc = TeacherDiscriminator(Denoiser(model, native, prediction))
    x = torch.randn(2, *tiny.shape, requires_grad=True)
    logits = disc(x, torch.full((2,), 0.5 * native.t_max), tiny.cond(2))
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator's signal reaches its sample
    assert all(p.grad is None for p in model.parameters())


def test_hinge_losses() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_critic_loss(real, fake)) == (0 + 0.5) / 2 + (0 + 1.0) / 2
    assert float(hinge_generator_loss(fake)) == 1.0


@pytest.mark.parametrize("schedule", [TrigFlow(0.5), Flow(), VP()], ids=["trigflow", "flow", "vp"])
def test_discriminator_times_have_the_log_normal_ratio_on_every_schedule(schedule) -> None:
    torch.manual_seed(0)
    t = discriminator_times(schedule, 4096, -0.6, 1.0)
    torch.manual_seed(0)
    expected = torch.exp(-0.6 + torch.randn(4096, dtype=torch.float64))
    inside = (t > schedule.t_min) & (t < schedule.t_max)  # the ends clamp the tails
    assert inside.float().mean() > 0.9
    ratio = schedule.ratio(t.double())
    torch.testing.assert_close(ratio[inside], expected[inside], rtol=2e-3, atol=0)


def test_trigflow_discriminator_times_are_sana_sprints_proposal() -> None:
    """SANA-Sprint draws t_D = atan(exp(N) / 0.5) on latents scaled to std 0.5 (NVlabs/Sana train_scm_ladd.py,
    compute_density_for_timestep_sampling "logit_normal_trigflow"): on unit-variance latents that is TrigFlow with
    sigma_d = 1 and exp(N) stated for data of std 0.5 (p_sigma_data = 0.5). The digits presets' old convention
    (sigma_d = 0.5, the ratio exp(N) on the data as given) draws the very same angles."""
    expected = None
    for schedule, p_sd in ((TrigFlow(1.0), 0.5), (TrigFlow(0.5), 1.0)):
        torch.manual_seed(1)
        t = discriminator_times(schedule, 8, -0.6, 1.0, p_sigma_data=p_sd)
        torch.manual_seed(1)
        expected = torch.atan(torch.exp(-0.6 + torch.randn(8, dtype=torch.float64)) / 0.5).float()
        torch.testing.assert_close(t, expected)


@pytest.mark.parametrize("schedule", [TrigFlow(1.0), Flow(), VP()], ids=["trigflow", "flow", "vp"])
def test_discriminator_times_state_sigma_for_data_of_the_reference_std(schedule) -> None:
    """exp(N) is sigma for data of std p_sigma_data: the noise-to-signal ratio on the data as given is
    exp(N) / p_sigma_data on every schedule."""
    torch.manual_seed(2)
    t = discriminator_times(schedule, 4096, -0.6, 1.0, p_sigma_data=0.5)
    torch.manual_seed(2)
    expected = torch.exp(-0.6 + torch.randn(4096, dtype=torch.float64)) / 0.5
    inside = (t > schedule.t_min) & (t < schedule.t_max)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(schedule.ratio(t.double())[inside], expected[inside], rtol=2e-3, atol=0)


def test_with_largest_time() -> None:
    t = torch.rand(1000)
    assert torch.equal(with_largest_time(t, 9.0, 0.0), t)
    assert torch.all(with_largest_time(t, 9.0, 1.0) == 9.0)
    share = (with_largest_time(t, 9.0, 0.5) == 9.0).float().mean()
    assert 0.4 < share < 0.6


def test_ladd_losses_equal_the_hinge_losses_on_the_discriminator(random_digits: Path) -> None:
    """Same re-noising draws: the generator loss is -D(fake) and the critic's the hinge of D(real), D(fake); only the
    generator loss reaches the fake sample."""
    teacher, _ = load_denoiser(str(random_digits))
    disc = TeacherDiscriminator(teacher)
    x0_fake = torch.randn(4, 1, 8, 8, requires_grad=True)
    x0_real, t_d, cond = (
        torch.randn(4, 1, 8, 8),
        torch.tensor([0.1, 0.4, 0.7, 0.95]),
        {"class_labels": torch.arange(4)},
    )
    torch.manual_seed(0)
    generator, critic = ladd_losses(disc, x0_fake, x0_real, t_d, cond)
    torch.manual_seed(0)
    fake = teacher.native.add_noise(x0_fake, torch.randn_like(x0_fake), t_d)
    real = teacher.native.add_noise(x0_real, torch.randn_like(x0_real), t_d)
    torch.testing.assert_close(generator, hinge_generator_loss(disc(fake, t_d, cond)))
    torch.testing.assert_close(critic, hinge_critic_loss(disc(real, t_d, cond), disc(fake.detach(), t_d, cond)))
    (grad,) = torch.autograd.grad(critic, x0_fake, allow_unused=True)
    assert grad is None
    (grad,) = torch.autograd.grad(generator, x0_fake)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("recipe_name", ["scm", "lcm"])
def test_adversarial_term_trains_heads_and_student_apart(
    recipe_name: str, random_digits: Path, tmp_path: Path
) -> None:
    """With the adversarial term on, the critic heads and the student each take their own optimizer step; the
    frozen teacher (the discriminator's trunk) does not move."""
    from fewstep.recipes.lcm import LCM, LCMConfig
    from fewstep.recipes.scm import SCM, SCMConfig

    teacher, _ = load_denoiser(str(random_digits))
    frozen = [p.detach().clone() for p in teacher.model.parameters()]
    if recipe_name == "scm":
        recipe = SCM(teacher, SCMConfig(adv_weight=0.5, tangent_warmup_steps=2))
    else:
        recipe = LCM(teacher, LCMConfig(adv_weight=0.5, w_min=1.0, w_max=1.0))
    assert recipe.disc is not None and len(recipe.disc.heads.heads) == len(teacher.model.transformer_blocks)
    heads = [p.detach().clone() for p in recipe.disc.heads.parameters()]
    student = [p.detach().clone() for p in recipe.trainable()["student"].parameters()]
    data = DigitsBatches(null_class_of(teacher.model), batch_size=8)
    trainer = Trainer(recipe, TrainConfig(max_steps=2, batch_size=8, progress=False), tmp_path, data)
    history = trainer.fit()
    assert {"student", "critic"} <= set(history[-1])
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.model.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(heads, recipe.disc.heads.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(student, recipe.trainable()["student"].parameters(), strict=True))
    assert set(trainer.ema) == {"student"}
    assert math.isfinite(history[-1]["critic"])


def test_score_gan_critic_trains_the_fake_score_and_its_heads(random_digits: Path) -> None:
    """DMD2's GAN: logistic losses on a trainable fake score's features. The critic loss reaches the heads and the
    fake backbone but not the generator's sample; the generator loss reaches the sample."""
    from fewstep.objectives.dmd import fake_score_network

    teacher, _ = load_denoiser(str(random_digits))
    fake = Denoiser(fake_score_network(teacher.model).eval(), teacher.native, teacher.prediction)
    disc = TeacherDiscriminator(fake)
    x0_fake = torch.randn(4, 1, 8, 8, requires_grad=True)
    x0_real, t_d, cond = (
        torch.randn(4, 1, 8, 8),
        torch.tensor([0.1, 0.4, 0.7, 0.95]),
        {"class_labels": torch.arange(4)},
    )
    torch.manual_seed(0)
    generator, critic = score_gan_losses(disc, x0_fake, x0_real, t_d, cond)
    torch.manual_seed(0)
    fake_t = teacher.native.add_noise(x0_fake, torch.randn_like(x0_fake), t_d)
    real_t = teacher.native.add_noise(x0_real, torch.randn_like(x0_real), t_d)
    softplus = torch.nn.functional.softplus
    torch.testing.assert_close(generator, softplus(-disc(fake_t, t_d, cond)).mean())
    expected = softplus(disc(fake_t.detach(), t_d, cond)).mean() + softplus(-disc(real_t, t_d, cond)).mean()
    torch.testing.assert_close(critic, expected)
    backbone, heads = list(fake.model.parameters()), list(disc.heads.parameters())
    grads = torch.autograd.grad(critic, [x0_fake, *backbone, *heads], allow_unused=True)
    assert grads[0] is None
    assert any(g is not None and g.abs().sum() > 0 for g in grads[1 : 1 + len(backbone)])
    assert all(g is not None for g in grads[1 + len(backbone) :])
    (grad,) = torch.autograd.grad(generator, x0_fake)
    assert grad.abs().sum() > 0
