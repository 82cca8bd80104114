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


@dataclass(frozen=True)
class Clips:
    """Clips (N, 1, F, H, W) in [-1, 1] with their digit labels (N,) and motions (N,) (indices into MOTIONS)."""

    clips: Tensor
    labels: Tensor
    motions: Tensor

    def __len__(self) -> int:
        return len(self.labels)


def start_positions(motions: Tensor) -> Tensor:
    """Top-left corners (N, 2) at frame 0, one per motion: the centre (4, 4) across the motion, and along it the
    start from which the F - 1 px of travel end on the canvas (0 moving right or down, FREE moving left or up).

    Why fixed starts: a (1, 4, 4)-patch transformer sees a digit drawn at a 1-px offset as a different set of token
    contents, so every digit has to be learned at each of the 16 sub-token offsets it appears at. Measured on single
    frames (the teacher's Wan, 7-8 min on one thread, class accuracy of 20-step samples by the digits evaluator):
    uniform starts 15-21%, starts on the 4-px token grid 72%, one fixed start 94%. With fixed starts, a clip's only
    offsets are those its own motion passes through (4 along its axis), and its variety is the digit's handwriting,
    as in the digits world."""
    v = VELOCITY[motions]  # (N, 2)
    centre = torch.full_like(v, FREE // 2)
    return torch.where(v > 0, torch.zeros_like(v), torch.where(v < 0, torch.full_like(v, FREE), centre))


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
    """``num`` clips of random digits of ``split`` with uniformly drawn motions."""
    data = load_split(split)
    idx = torch.randint(len(data), (num,), generator=generator)
    motions = torch.randint(NUM_MOTIONS, (num,), generator=generator)
    starts = start_positions(motions)
    return Clips(render(data.images[idx], motions, starts), data.labels[idx], motions)


def still_frames(split: str, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Still images (N, 1, 1, H, W), one-frame clips in [-1, 1]: a random digit of ``split`` of each given class,
    drawn where a clip's frame can hold it (a random motion's path at a random frame). The image set that stands
    beside the clips for frame-level losses (MCM's adversarial real frames)."""
    data = load_split(split)
    by_class = [torch.nonzero(data.labels == c).flatten() for c in range(NUM_CLASSES)]
    pick = torch.stack(
        [by_class[int(c)][torch.randint(len(by_class[int(c)]), (), generator=generator)] for c in labels]
    )
    motions = torch.randint(NUM_MOTIONS, (len(labels),), generator=generator)
    frame = torch.randint(NUM_FRAMES, (len(labels), 1), generator=generator)
    corners = start_positions(motions) + frame * VELOCITY[motions]
    still = torch.zeros_like(motions)
    return render(data.images[pick], still, corners)[:, :, :1]


@cache
def reference_clips(split: str) -> Clips:
    """The fixed reference set of a split: every digit of it in every motion (train: 1,437 x 5 = 7,185 clips;
    held-out: 360 x 5 = 1,800)."""
    data = load_split(split)
    n = len(data)
    motions = torch.arange(NUM_MOTIONS).repeat_interleave(n)
    starts = start_positions(motions)
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
