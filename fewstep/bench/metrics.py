"""Quality metrics: FID on the digits evaluator's features, class accuracy, the real-vs-real FID floor, CLIP score.

FID at a few hundred samples is strongly biased (../shared/DIGITS.md), so the floor is measured at exactly the
sample counts of the generated sets: ``num`` train images against the held-out split, averaged over subsets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError
from ..worlds.digits.data import load_split
from ..worlds.digits.evaluator import DigitsEvaluator, FIDFeatures


def load_evaluator(path: str | None = None) -> DigitsEvaluator:
    from ..loading import embedded_path

    return DigitsEvaluator.from_pretrained(str(path or embedded_path("evaluator"))).eval()


class FeatureFID:
    """torchmetrics' FrechetInceptionDistance on a fixed reference set, reused for many generated sets.

    features: a module mapping [0, 1] images to (N, F), or an Inception layer size (2048; needs torch-fidelity).
    """

    def __init__(self, features: torch.nn.Module | int, reference: Tensor, batch_size: int = 500):
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

    @torch.no_grad()
    def diversity(self, images: Tensor, labels: Tensor) -> float:
        """Per-class sample diversity: the mean pairwise distance between evaluator features of samples of one class,
        averaged over classes (images in [0, 1]). Mode collapse lowers it; it does not depend on any reference set."""
        features = torch.cat([self._features(chunk) for chunk in images.split(1000)]).double()
        means = []
        for c in labels.unique():
            f = features[labels.cpu() == c]
            if len(f) > 1:
                means.append(torch.cdist(f, f).sum() / (len(f) * (len(f) - 1)))
        return float(torch.stack(means).mean()) if means else 0.0

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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image_folder(
    path: str | Path, size: tuple[int, int] | None = None, transform: Callable[[Any], Any] | None = None
) -> Tensor:
    """Every image in a folder as (N, 3, H, W) floats in [0, 1]: resized (bicubic) to ``size`` (H, W) when given, or
    passed through ``transform`` (a PIL image to a PIL image, e.g. a protocol's center crop)."""
    import numpy as np
    from PIL import Image

    folder = Path(path)
    if not folder.is_dir():
        raise FewstepError(f"reference folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise FewstepError(f"reference folder {folder} holds fewer than 2 images")
    images = []
    for file in files:
        img = Image.open(file).convert("RGB")
        if transform is not None:
            img = transform(img)
        elif size is not None:
            img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
    if len({tuple(i.shape) for i in images}) > 1:
        raise FewstepError(f"images in {folder} differ in size; fewstep resizes them only to a known size")
    return torch.stack(images)


class ScriptedFeatures(torch.nn.Module):
    """A feature network from a TorchScript or torch.export (.pt2) file: [0, 1] images -> (N, F), e.g. an Inception."""

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            if str(path).endswith(".pt2"):  # torch.export archive
                self.net = torch.export.load(str(path)).module()
            else:  # TorchScript
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError, FileNotFoundError) as err:
            raise FewstepError(f"could not load FID feature network {path}: {str(err).splitlines()[0]}") from None
        self.num_features = int(self.net(torch.rand(1, 3, 64, 64)).shape[-1])

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.float())


def reference_fid(
    reference_dir: str | Path, features: str, size: tuple[int, int], transform: Callable[[Any], Any] | None = None
) -> FeatureFID:
    """FID against a folder of real images (resized to ``size``, or through ``transform``): Inception (needs
    torch-fidelity and its weights) or a local network."""
    reference = load_image_folder(reference_dir, size=size, transform=transform)
    if features != "inception":
        return FeatureFID(ScriptedFeatures(features), reference)
    try:
        return FeatureFID(2048, reference)
    except Exception as err:  # ModuleNotFoundError for torch-fidelity, or weights it cannot fetch offline
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FewstepError(
            f"Inception FID needs torch-fidelity and its weights ({reason}); "
            "or pass --fid-features PATH to a local TorchScript feature network"
        ) from None
