"""Adversarial terms on a frozen teacher's features (LADD, Sauer et al. 2024; SANA-Sprint's sCM + LADD; PCM's
adversarial consistency loss, Wang et al. 2024), and on a fake score's own features (DMD2, Yin et al. 2024b, Sec.
4.4; SiDA's Diffusion-GAN, Zhou et al. 2024).

The discriminator is the frozen teacher read at several blocks, each with a small trainable head that scores every
token; inputs are re-noised (real or generated) x0 at a discriminator time, so the teacher sees what it was trained
on. Hinge losses: the critic minimizes E relu(1 - D(real)) + E relu(1 + D(fake)); the generator E -D(fake).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import batch_random
from ..schedules import NoiseSchedule, append_dims, forward_transition
from ..teacher import Denoiser, block_channels, block_tokens, concat_cond, feature_blocks


class FeatureHeads(nn.Module):
    """One head per teacher block: LayerNorm -> Linear -> SiLU -> Linear(1), a logit per token, averaged."""

    def __init__(self, channels: list[int], hidden: int = 256):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(c), nn.Linear(c, min(hidden, c)), nn.SiLU(), nn.Linear(min(hidden, c), 1))
            for c in channels
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        """(B,) logits: the mean over heads of each head's mean token logit."""
        return torch.stack([h(f.float()).mean(dim=(1, 2)) for h, f in zip(self.heads, features, strict=True)]).mean(0)


class TeacherDiscriminator:
    """D(x0) = heads(teacher features at (x_tD, t_D)); the teacher stays frozen, the heads train."""

    def __init__(self, teacher: Denoiser, every: int = 1):
        self.teacher = teacher
        self.blocks = feature_blocks(teacher.model)[::every]
        self.heads = FeatureHeads([block_channels(b) for b in self.blocks])

    def features(self, x_t: Tensor, t: Tensor, cond: dict[str, Any]) -> list[Tensor]:
        found: list[Tensor] = []
        first = self.teacher.backbone.image_first
        hooks = [
            b.register_forward_hook(lambda _m, _i, out: found.append(block_tokens(out, first))) for b in self.blocks
        ]
        try:
            self.teacher(x_t, t, cond)
        finally:
            for h in hooks:
                h.remove()
        return found

    def __call__(self, x_t: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        return self.heads(self.features(x_t, t, cond))


def hinge_critic_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()


def hinge_generator_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


def discriminator_times(
    schedule: NoiseSchedule, n: int, p_mean: float, p_std: float, p_sigma_data: float = 1.0
) -> Tensor:
    """(n,) re-noising times t_D in ``schedule``'s units with a log-normal noise level: exp(N(p_mean, p_std^2)) is
    sigma for data of std ``p_sigma_data``, so the noise-to-signal ratio on the data as given is sigma/alpha =
    exp(N) / p_sigma_data (written through the ratio so that it means the same on every schedule). SANA-Sprint's
    LADD draws t_D = atan(exp(N) / 0.5) on latents scaled to std 0.5 (NVlabs/Sana train_scm_ladd.py, the
    "logit_normal_trigflow" sampler): ``p_sigma_data`` = 0.5 on unit latents. 1 states the ratio itself."""
    ratio = torch.exp(p_mean + p_std * batch_random.randn((n,), dtype=torch.float64)) / p_sigma_data
    return schedule.time_at_ratio(ratio).clamp(schedule.t_min, schedule.t_max).float()


def ladd_losses(
    disc: TeacherDiscriminator, x0_fake: Tensor, x0_real: Tensor, t_d: Tensor, cond: dict[str, Any],
    t_from: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(generator loss, critic loss): fake and real x0 re-noised at t_D (the discriminator teacher's schedule) and
    scored on its features. The fake's features are computed once: the critic reads them detached (the teacher is
    frozen, so they equal the features of the detached fake), and the real ones need no graph.

    ``t_from``: fake and real are states at these (B,) times rather than x0, carried forward to max(t_D, t_from)
    (``schedules.forward_transition``): PCM's adversarial consistency loss scores the student's and the target's
    points at a segment edge, both moved further along the forward process (its ``noise_travel``)."""
    schedule = disc.teacher.schedule
    if t_from is None:
        fake = schedule.add_noise(x0_fake, batch_random.randn_like(x0_fake), t_d)
        real = schedule.add_noise(x0_real, batch_random.randn_like(x0_real), t_d)
    else:
        t_d = torch.maximum(t_d.to(t_from), t_from)
        c_from, c_d = (schedule.coeffs(append_dims(t, x0_fake.ndim)) for t in (t_from, t_d))
        fake = forward_transition(x0_fake, c_from, c_d, batch_random.randn_like(x0_fake))
        real = forward_transition(x0_real, c_from, c_d, batch_random.randn_like(x0_real))
    fake_features = disc.features(fake, t_d, cond)
    with torch.no_grad():
        real_features = disc.features(real, t_d, cond)
    generator = hinge_generator_loss(disc.heads(fake_features))
    critic = hinge_critic_loss(disc.heads(real_features), disc.heads([f.detach() for f in fake_features]))
    return generator, critic


def with_largest_time(t: Tensor, t_max: float, prob: float) -> Tensor:
    """t with each entry replaced by t_max with probability ``prob`` (SANA-Sprint's train_largest_timestep: the
    one-step generator from pure noise gets a share of the adversarial signal)."""
    return torch.where(batch_random.rand(t.shape) < prob, torch.full_like(t, t_max), t)


def score_gan_losses(
    disc: TeacherDiscriminator, x0_fake: Tensor, x0_real: Tensor, t_d: Tensor, cond: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """(generator loss, critic loss) of DMD2's GAN: heads on a *trainable* fake score's features (``disc.teacher``
    is the fake Denoiser), non-saturating logistic losses on re-noised x0. Unlike ``ladd_losses`` the critic's
    features are recomputed with their graph, so the critic loss trains the heads and the fake score's backbone
    together (DMD2 adds it to the fake score's denoising loss); the generator's reaches x0_fake."""
    schedule = disc.teacher.schedule
    fake = schedule.add_noise(x0_fake, batch_random.randn_like(x0_fake), t_d)
    real = schedule.add_noise(x0_real, batch_random.randn_like(x0_real), t_d)
    generator = F.softplus(-disc(fake, t_d, cond)).mean()
    # the critic's fake and real rows in one forward (per-sample, so the same logits as two)
    n = fake.shape[0]
    both = concat_cond(cond, cond, n, disc.teacher.backbone.shared)
    logits = disc(torch.cat([fake.detach(), real]), torch.cat([t_d, t_d]), both)
    critic = F.softplus(logits[:n]).mean() + F.softplus(-logits[n:]).mean()
    return generator, critic
