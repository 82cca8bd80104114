"""The video world's evaluator: a small 3-D CNN over whole clips whose penultimate features give a Frechet distance
on clips (FVD-style, with our own network standing in for I3D), with a class head and a motion head; and the frame-
level measures built on the digits evaluator (``frame_crops``, ``track``).

Trained on train-split clips only, by ``fewstep teacher train --world video --what evaluator``; shipped with the
package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from ..digits.data import RESOLUTION
from .data import NUM_CLASSES, NUM_MOTIONS


class VideoEvaluator(ModelMixin, ConfigMixin):
    """conv3d 16 -> conv3d 32 -> pool (1,2,2) -> conv3d 64 -> pool 2 -> fc(feature_dim) -> dropout -> two heads.

    Input (B, 1, F, H, W) in [-1, 1]; ``features`` gives the (B, feature_dim) penultimate activations, ``forward`` the
    class logits (B, 10) and the motion logits (B, 5).
    """

    @register_to_config
    def __init__(
        self, num_frames: int = 8, size: int = 16, feature_dim: int = 128, dropout: float = 0.3,
        num_classes: int = NUM_CLASSES, num_motions: int = NUM_MOTIONS,
    ):  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv3d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv3d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv3d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (num_frames // 2) * (size // 4) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.class_head = nn.Linear(feature_dim, num_classes)
        self.motion_head = nn.Linear(feature_dim, num_motions)

    def features(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool3d(F.relu(self.conv2(h)), (1, 2, 2))
        h = F.max_pool3d(F.relu(self.conv3(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.drop(self.features(x))
        return self.class_head(h), self.motion_head(h)


class ClipFeatures(nn.Module):
    """Adapter for torchmetrics' FrechetInceptionDistance(feature=..., normalize=True): clips flattened to
    (N, F, H, W) "images" in [0, 1] (frames as channels) -> the evaluator's (N, feature_dim) features."""

    def __init__(self, evaluator: VideoEvaluator):
        super().__init__()
        self.evaluator = evaluator.eval()
        self.num_features = evaluator.config.feature_dim

    @torch.no_grad()
    def forward(self, clips: Tensor) -> Tensor:
        return self.evaluator.features(clips.float()[:, None] * 2 - 1)


def crop_corners(frames: Tensor) -> Tensor:
    """Top-left corners (N, 2) of the 8x8 window holding the most ink of each frame (N, H, W) in [0, 1]: where the
    digits evaluator looks. Windows that tie (a digit with blank border rows or columns) are resolved to the middle
    of the tied ones, which for real frames is most often the digit's own box."""
    mass = F.avg_pool2d(frames[:, None].float(), RESOLUTION, stride=1)[:, 0]  # (N, H - 7, W - 7)
    top = mass.flatten(1).amax(1)[:, None, None]
    tied = (mass >= top - 1e-5).float()
    rows = torch.arange(mass.shape[-2], dtype=torch.float32)[:, None]
    cols = torch.arange(mass.shape[-1], dtype=torch.float32)[None, :]
    count = tied.sum((1, 2))
    r = (tied * rows).sum((1, 2)) / count
    c = (tied * cols).sum((1, 2)) / count
    return torch.stack([r, c], 1).round().long()


def frame_crops(frames: Tensor) -> Tensor:
    """The 8x8 digit window of each frame (N, H, W) in [0, 1]: (N, 1, 8, 8), the digits evaluator's input size."""
    corners = crop_corners(frames)
    r = corners[:, :1, None] + torch.arange(RESOLUTION)[None, :, None]  # (N, 8, 1)
    c = corners[:, 1:, None] + torch.arange(RESOLUTION)[None, None, :]  # (N, 1, 8)
    return frames[torch.arange(len(frames))[:, None, None], r, c][:, None]


def track(clips: Tensor) -> Tensor:
    """The ink's centre of mass per frame, (N, F, 2) in pixels, for clips (N, F, H, W) in [0, 1]."""
    mass = clips.float().clamp_min(0)
    total = mass.sum((-2, -1)).clamp_min(1e-6)
    rows = torch.arange(clips.shape[-2], dtype=torch.float32)
    cols = torch.arange(clips.shape[-1], dtype=torch.float32)
    y = (mass.sum(-1) * rows).sum(-1) / total
    x = (mass.sum(-2) * cols).sum(-1) / total
    return torch.stack([y, x], -1)


def jitter(clips: Tensor) -> Tensor:
    """Per clip, the mean size (px) of the second difference of the ink's track, |c_{f+1} - 2 c_f + c_{f-1}|: zero
    for a digit moving at constant velocity (every real clip), larger the more the motion wobbles. (N,)"""
    c = track(clips)
    return (c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]).norm(dim=-1).mean(1)
