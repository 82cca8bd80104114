"""Adversarial terms on a frozen teacher's features (LADD, Sauer et al. 2024; SANA-Sprint's sCM + LADD).

The discriminator is the frozen teacher read at several blocks, each with a small trainable head that scores every
token; inputs are re-noised (real or generated) x0 at a discriminator time, so the teacher sees what it was trained
on. Hinge losses: the critic minimizes E relu(1 - D(real)) + E relu(1 + D(fake)); the generator E -D(fake).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .teacher import Denoiser, block_channels, block_tokens, feature_blocks


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
        hooks = [b.register_forward_hook(lambda _m, _i, out: found.append(block_tokens(out))) for b in self.blocks]
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
