"""Moving digits: one 8x8 digit of scikit-learn's set sliding over a 16x16 canvas for 8 frames.

Why this size: 8 frames at 1 px per frame carry the digit 7 px, almost the whole free range of a 16-px canvas, so its
content crosses token boundaries of a (1, 4, 4)-patch transformer twice and a model has to move it rather than copy
it; 16x16x8 clips keep a teacher, its evaluator and a 50-step bench within the CPU budget of the digits world. Five
motions (still, right, left, down, up) make the motion condition something a classifier can check, and "still" is
the case where any frame-to-frame jitter is visible.

A clip is (B, 1, F, H, W) in [-1, 1], the layout of diffusers' video transformers; the background is -1 (the digits'
own zero). Train clips are made only from the digits train split and held-out clips only from the held-out split
(``worlds/digits/data.py``), so the video split inherits the image split. The condition is the digit's class and
the motion.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from ..digits.data import NUM_CLASSES, RESOLUTION, load_split

NUM_FRAMES = 8
CANVAS = 16
MOTIONS = ("still", "right", "left", "down", "up")
NUM_MOTIONS = len(MOTIONS)
VELOCITY = torch.tensor([[0, 0], [0, 1], [0, -1], [1, 0], [-1, 0]])  # (dy, dx) in px per frame, by motion
FREE = CANVAS - RESOLUTION  # positions 0..FREE of the digit's top-left corner
REFERENCE_SEED = 0  # positions of the fixed reference clips


@dataclass(frozen=True)
class Clips:
    """Clips (N, 1, F, H, W) in [-1, 1] with their digit labels (N,) and motions (N,) (indices into MOTIONS)."""

    clips: Tensor
    labels: Tensor
    motions: Tensor

    def __len__(self) -> int:
        return len(self.labels)


def start_positions(motions: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Top-left corners (N, 2) at frame 0 such that the whole path stays on the canvas: uniform over 0..FREE across
    the motion, and over the starts whose path of (F - 1) px fits along it."""
    v = VELOCITY[motions]  # (N, 2)
    travel = (NUM_FRAMES - 1) * v.abs()
    u = torch.rand(len(motions), 2, generator=generator)
    lo = torch.where(v < 0, travel, torch.zeros_like(travel))
    span = FREE - travel + 1  # how many starts fit
    return lo + (u * span).long()


def render(digits: Tensor, motions: Tensor, starts: Tensor) -> Tensor:
    """Digits (N, 1, 8, 8) moved from ``starts`` (N, 2) by their motion's velocity: clips (N, 1, F, H, W)."""
    n = len(digits)
    f = torch.arange(NUM_FRAMES)
    corner = starts[:, None, :] + f[None, :, None] * VELOCITY[motions][:, None, :]  # (N, F, 2)
    rows = torch.arange(CANVAS)[None, None, :] - corner[..., 0:1]  # (N, F, H): row inside the digit
    cols = torch.arange(CANVAS)[None, None, :] - corner[..., 1:2]  # (N, F, W)
    inside = ((rows >= 0) & (rows < RESOLUTION))[..., :, None] & ((cols >= 0) & (cols < RESOLUTION))[..., None, :]
    r = rows.clamp(0, RESOLUTION - 1)[..., :, None].expand(n, NUM_FRAMES, CANVAS, CANVAS)
    c = cols.clamp(0, RESOLUTION - 1)[..., None, :].expand(n, NUM_FRAMES, CANVAS, CANVAS)
    img = digits[:, 0][:, None].expand(n, NUM_FRAMES, RESOLUTION, RESOLUTION)
    picked = img.gather(2, r.reshape(n, NUM_FRAMES, -1, 1).expand(-1, -1, -1, RESOLUTION).reshape(
        n, NUM_FRAMES, CANVAS * CANVAS, RESOLUTION))  # fmt: skip
    picked = picked.gather(3, c.reshape(n, NUM_FRAMES, -1, 1)).reshape(n, NUM_FRAMES, CANVAS, CANVAS)
    return torch.where(inside, picked, torch.full_like(picked, -1.0))[:, None]


def random_clips(split: str, num: int, generator: torch.Generator | None = None) -> Clips:
    """``num`` clips of random digits of ``split`` with uniformly drawn motions and start positions."""
    data = load_split(split)
    idx = torch.randint(len(data), (num,), generator=generator)
    motions = torch.randint(NUM_MOTIONS, (num,), generator=generator)
    starts = start_positions(motions, generator)
    return Clips(render(data.images[idx], motions, starts), data.labels[idx], motions)


@cache
def reference_clips(split: str) -> Clips:
    """The fixed reference set of a split: every digit of it in every motion, at seeded start positions
    (train: 1,437 x 5 = 7,185 clips; held-out: 360 x 5 = 1,800)."""
    data = load_split(split)
    n = len(data)
    motions = torch.arange(NUM_MOTIONS).repeat_interleave(n)
    starts = start_positions(motions, torch.Generator().manual_seed(REFERENCE_SEED))
    images = data.images.repeat(NUM_MOTIONS, 1, 1, 1)
    return Clips(render(images, motions, starts), data.labels.repeat(NUM_MOTIONS), motions)


def balanced_conditions(num: int) -> tuple[Tensor, Tensor]:
    """(labels, motions) for ``num`` samples cycling through all 50 (class, motion) pairs."""
    k = torch.arange(num) % (NUM_CLASSES * NUM_MOTIONS)
    return k % NUM_CLASSES, k // NUM_CLASSES


COND_DIM = 16  # one-hot class in dims 0..9, one-hot motion in dims 10..14, dim 15 unused


def condition_tokens(labels: Tensor, motions: Tensor) -> Tensor:
    """The teacher's condition as two "text" tokens (N, 2, COND_DIM): a one-hot class and a one-hot motion, which
    WanTransformer3DModel embeds with its own text embedder. The unconditional branch is all zeros
    (``null_tokens``)."""
    tokens = torch.zeros(len(labels), 2, COND_DIM)
    tokens[torch.arange(len(labels)), 0, labels] = 1.0
    tokens[torch.arange(len(labels)), 1, NUM_CLASSES + motions] = 1.0
    return tokens


def null_tokens(num: int = 1) -> Tensor:
    return torch.zeros(num, 2, COND_DIM)
