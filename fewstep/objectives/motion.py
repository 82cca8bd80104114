"""Motion representations of a latent clip (B, C, F, H, W) on which video consistency losses compare prediction and
target: MCM's learned per-frame head and frame differences (Zhai et al. 2024, yhZhai/mcm ``prepare_cd_target``), and
DCM's strided frame differences (Lv et al. 2025, its temporal-coherence loss).
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn


def frame_differences(x: Tensor, stride: int = 1, dim: int = 2) -> Tensor:
    """x[f + stride] - x[f] along the frame axis ``dim`` (2 for (B, C, F, H, W), 1 for CogVideoX's (B, F, C, H, W))."""
    frames = x.shape[dim]
    if not 0 < stride < frames:
        raise ValueError(f"frame stride {stride} needs more than {stride} frames, got {frames}")
    return x.narrow(dim, stride, frames - stride) - x.narrow(dim, 0, frames - stride)


class MotionHead(nn.Module):
    """MCM's learned motion representation ("learn": 2 layers, 1x1 kernels; "hlearn": 5 layers, 3x3), applied to each
    frame alone: SiLU of the input, (layers - 1) blocks of [conv, GroupNorm, SiLU] at ``width`` channels, a
    zero-initialized conv back to the clip's channels, plus the input itself, so the head starts as the identity
    (yhZhai/mcm models/spatial_head.py)."""

    def __init__(self, channels: int, layers: int = 2, kernel: int = 1, width: int = 64, groups: int = 32):
        super().__init__()
        if layers < 2 or kernel % 2 == 0:
            raise ValueError(f"a motion head needs >= 2 layers and an odd kernel, got {layers} and {kernel}")
        blocks: list[nn.Module] = [nn.SiLU()]
        for i in range(layers - 1):
            blocks += [
                nn.Conv2d(channels if i == 0 else width, width, kernel, padding=kernel // 2),
                nn.GroupNorm(min(groups, width), width),
                nn.SiLU(),
            ]
        out = nn.Conv2d(width, channels, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(cast(Tensor, out.bias))
        self.body = nn.Sequential(*blocks, out)

    def forward(self, x: Tensor, dim: int = 2) -> Tensor:
        """x with frames along ``dim`` (2: (B, C, F, H, W); 1: (B, F, C, H, W)), each frame through the head."""
        by_frame = x.movedim(dim, 1)  # (B, F, C, H, W)
        frames = by_frame.flatten(0, 1)
        out = frames + self.body(frames)
        return out.reshape(by_frame.shape).movedim(1, dim)
