"""The digits evaluator: a small CNN classifier whose penultimate features stand in for Inception in FID.

Trained on the train split only, by ``fewstep teacher train --what evaluator``; shipped with the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn


class DigitsEvaluator(ModelMixin, ConfigMixin):
    """conv32 -> conv64 -> pool -> conv128 -> pool -> fc(feature_dim) -> dropout -> fc(num_classes).

    Input (B, 1, 8, 8) in [-1, 1]; ``features`` gives the (B, feature_dim) penultimate activations.
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, feature_dim: int = 128, dropout: float = 0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 2 * 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.features(x)))


class FIDFeatures(nn.Module):
    """Adapter for torchmetrics' FrechetInceptionDistance(feature=..., normalize=True).

    With a custom module and normalize=True torchmetrics hands images over unchanged in [0, 1]; we map them to the
    evaluator's [-1, 1] and return its penultimate features in float64-friendly float32.
    """

    def __init__(self, evaluator: DigitsEvaluator):
        super().__init__()
        self.evaluator = evaluator.eval()
        self.num_features = evaluator.config.feature_dim

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.evaluator.features(images.float() * 2 - 1)
