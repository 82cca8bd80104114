"""The digits world's reward model: an MLP on raw pixels that scores how plainly an image shows its class.

Hyper-SD's human-feedback stage needs a reward model (ImageReward, an aesthetic head) that the bench does not read, or
a student could raise its bench figures by gaming them. This scorer is built apart from the evaluator (fully connected
on the 64 pixels, no convolutions, its own seed, trained with noise rather than shifts), so its gradients are not the
evaluator's features'. It is trained on the train split: the held-out split is the FID reference, and a reward
fitted to it would pull students toward those 360 images. ``fewstep teacher train --what scorer`` reproduces it.
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn


class DigitsScorer(ModelMixin, ConfigMixin):
    """64 pixels -> hidden -> hidden -> num_classes logits (GELU, dropout). Input (B, 1, 8, 8) in [-1, 1]."""

    @register_to_config
    def __init__(self, num_classes: int = 10, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())

    def reward(self, x: Tensor, labels: Tensor) -> Tensor:
        """(B,) log p(label | x): the reward of an image for the class it was asked for (0 at certainty)."""
        return F.log_softmax(self(x), dim=1).gather(1, labels.long().view(-1, 1)).squeeze(1)
