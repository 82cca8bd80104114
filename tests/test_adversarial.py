"""The LADD discriminator reads every supported backbone: one head per block, (B,) logits, gradients to the input."""

from __future__ import annotations

import torch
from conftest import TinyModel

from fewstep.adversarial import TeacherDiscriminator, hinge_critic_loss, hinge_generator_loss
from fewstep.schedules import schedule_from_diffusers_config
from fewstep.teacher import Denoiser


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
