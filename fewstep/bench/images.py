"""Sample grids as PNG: the pictures people look at before reading a number."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def make_grid(images: Tensor, nrow: int, upscale: int = 4, pad: int = 2) -> Image.Image:
    """(N, C, H, W) in [0, 1] -> one PIL image with ``nrow`` images per row, nearest-neighbour upscaled."""
    images = images.detach().float().clamp(0, 1).cpu()
    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, top : top + h, left : left + w] = images[i]
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0] if c == 1 else array)


def save_grid(images: Tensor, path: Path, nrow: int, upscale: int = 4) -> Path:
    make_grid(images, nrow=nrow, upscale=upscale).save(path)
    return path


def save_animation(clips: Tensor, path: Path, nrow: int, upscale: int = 4, frame_ms: int = 150) -> Path:
    """Clips (N, F, C, H, W) in [0, 1] -> one looping GIF whose frame f is the grid of every clip's frame f."""
    frames = [make_grid(clips[:, f], nrow=nrow, upscale=upscale) for f in range(clips.shape[1])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return path
