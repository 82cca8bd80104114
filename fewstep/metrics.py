"""Quality metrics: FID on the digits evaluator's features, class accuracy, the real-vs-real FID floor, CLIP score.

FID at a few hundred samples is strongly biased (../shared/DIGITS.md), so the floor is measured at exactly the
sample counts of the generated sets: ``num`` train images against the held-out split, averaged over subsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .digits.data import load_split
from .digits.evaluator import DigitsEvaluator, FIDFeatures


def load_evaluator(path: str | None = None) -> DigitsEvaluator:
    from .teacher import embedded_path

    return DigitsEvaluator.from_pretrained(str(path or embedded_path("evaluator"))).eval()


class FeatureFID:
    """torchmetrics' FrechetInceptionDistance on a fixed reference set, reused for many generated sets."""

    def __init__(self, features: torch.nn.Module, reference: Tensor, batch_size: int = 500):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.batch_size = batch_size
        self.metric = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)
        for chunk in reference.split(batch_size):
            self.metric.update(chunk, real=True)

    def __call__(self, images: Tensor) -> float:
        """FID of ``images`` (N, C, H, W) in [0, 1] against the reference."""
        self.metric.reset()  # keeps the reference statistics
        for chunk in images.split(self.batch_size):
            self.metric.update(chunk, real=False)
        return float(self.metric.compute())


@dataclass
class DigitsMetrics:
    """FID against the held-out and the train split, class accuracy, and the real-vs-real floor."""

    evaluator: DigitsEvaluator

    @classmethod
    def load(cls, path: str | None = None) -> DigitsMetrics:
        return cls(load_evaluator(path))

    @cached_property
    def _features(self) -> FIDFeatures:
        return FIDFeatures(self.evaluator)

    @cached_property
    def fid_held_out(self) -> FeatureFID:
        return FeatureFID(self._features, to_unit(load_split("held_out").images))

    @cached_property
    def fid_train(self) -> FeatureFID:
        return FeatureFID(self._features, to_unit(load_split("train").images))

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Fraction of ``images`` (in [0, 1]) the evaluator assigns to the class they were generated for."""
        logits = torch.cat([self.evaluator(chunk * 2 - 1) for chunk in images.float().split(1000)])
        return float((logits.argmax(1).cpu() == labels.cpu()).float().mean())

    def floor(self, num: int, subsets: int = 3, seed: int = 0) -> tuple[float, float, int]:
        """Real-vs-real FID: ``num`` random train images against the held-out split, mean and std over subsets.

        Returns (mean, std, count actually used); the count is capped at the train split's size.
        """
        train = to_unit(load_split("train").images)
        count = min(num, len(train))
        gen = torch.Generator().manual_seed(seed)
        values = [self.fid_held_out(train[torch.randperm(len(train), generator=gen)[:count]]) for _ in range(subsets)]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
        return mean, std, count


def to_unit(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1]."""
    return (images.float() + 1) / 2
