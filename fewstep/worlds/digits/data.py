"""scikit-learn's bundled 8x8 digits as the embedded data set, with a fixed train / held-out split.

The models work at the native 8x8 resolution, one channel, pixels scaled from 0..16 to [-1, 1]; pictures are
upsampled with nearest-neighbour only for display.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor

NUM_CLASSES = 10
RESOLUTION = 8
SPLIT_SEED = 0  # the 80/20 stratified split of ../shared/DIGITS.md: 1,437 train and 360 held-out images
HELD_OUT_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSplit:
    """Images (N, 1, 8, 8) in [-1, 1] and labels (N,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


@cache
def _load() -> tuple[DigitsSplit, DigitsSplit]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 -> [-1, 1]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=HELD_OUT_FRACTION, stratify=y, random_state=SPLIT_SEED)
    return (
        DigitsSplit(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        DigitsSplit(torch.from_numpy(x_te), torch.from_numpy(y_te)),
    )


def load_split(name: str) -> DigitsSplit:
    """``"train"`` (1,437 images) or ``"held_out"`` (360 images); the same split on every machine."""
    train, held_out = _load()
    if name == "train":
        return train
    if name == "held_out":
        return held_out
    raise ValueError(f"unknown digits split {name!r}; expected 'train' or 'held_out'")


def balanced_labels(num: int) -> Tensor:
    """0, 1, ..., 9, 0, 1, ...: class labels for ``num`` conditional samples, as balanced as ``num`` allows."""
    return torch.arange(num) % NUM_CLASSES
