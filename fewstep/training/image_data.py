"""Real images for text-to-image distillation (``--data DIR``): captioned images encoded once by the teacher's own VAE.

A folder holds images with their captions in one of two layouts:
- ``metadata.jsonl`` (the Hugging Face ``imagefolder`` layout): one JSON object per line with ``file_name`` and a
  caption field (``data.prompt_field``, "prompt" by default; "text" is also accepted);
- a caption file beside each image: ``cat.png`` with ``cat.txt``.

Images are resized and center-cropped to the teacher's resolution by the pipeline's ``image_processor``, encoded with
``vae.encode(...).latent_dist.sample()`` (a seeded draw, as diffusers' training scripts do), shifted and scaled into
the backbone's latent space, and cached with the folder's digest as key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import FewstepError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_captioned_images(folder: str | Path, field: str = "prompt") -> list[tuple[Path, str]]:
    """(image path, caption) pairs of ``folder``, sorted by file name."""
    root = Path(folder)
    if not root.is_dir():
        raise FewstepError(f"image folder {root} does not exist")
    metadata = root / "metadata.jsonl"
    pairs = _from_metadata(root, metadata, field) if metadata.is_file() else _from_sidecars(root)
    if not pairs:
        raise FewstepError(f"{root} holds no captioned images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(pairs, key=lambda pair: pair[0].name)


def _from_metadata(root: Path, metadata: Path, field: str) -> list[tuple[Path, str]]:
    pairs = []
    for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = str(row["file_name"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FewstepError(f"{metadata}:{n}: every line must be a JSON object with a 'file_name'") from None
        caption = row.get(field, row.get("text"))
        if caption is None:
            raise FewstepError(f"{metadata}:{n}: no {field!r} (or 'text') caption for {name}")
        path = root / name
        if not path.is_file():
            raise FewstepError(f"{metadata}:{n}: {path} does not exist")
        pairs.append((path, str(caption).strip()))
    return pairs


def _from_sidecars(root: Path) -> list[tuple[Path, str]]:
    pairs = []
    for path in root.iterdir():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            raise FewstepError(f"{path} has no caption: add {caption.name} or a metadata.jsonl")
        pairs.append((path, caption.read_text(encoding="utf-8").strip()))
    return pairs


def folder_digest(pairs: list[tuple[Path, str]]) -> str:
    digest = hashlib.sha256()
    for path, caption in pairs:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
        digest.update(caption.encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_images(pipe: Any, paths: list[Path], shape: tuple[int, ...], seed: int, batch: int = 16) -> Tensor:
    """Latents x0, (N, *shape), in the backbone's space: (z - shift_factor) * scaling_factor with z ~ q(z | image)."""
    from PIL import Image, UnidentifiedImageError

    vae, processor = getattr(pipe, "vae", None), getattr(pipe, "image_processor", None)
    if vae is None or processor is None:
        raise FewstepError(f"{type(pipe).__name__} has no VAE and image processor to encode images with")
    _, h, w = shape
    scale = int(pipe.vae_scale_factor)
    shift = vae.config.get("shift_factor") or 0.0
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(paths), batch), desc="encode images"):
        images = []
        for path in paths[i : i + batch]:
            try:
                images.append(Image.open(path).convert("RGB"))
            except (UnidentifiedImageError, OSError):
                raise FewstepError(f"{path} is not a readable image") from None
        pixels = processor.preprocess(images, height=h * scale, width=w * scale, resize_mode="crop")
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        z = vae.encode(pixels).latent_dist.sample(generator=gen)
        out.append(((z - shift) * vae.config.scaling_factor).float().cpu())
    x0 = torch.cat(out)
    if tuple(x0.shape[1:]) != tuple(shape):
        raise FewstepError(f"the VAE gives latents of shape {tuple(x0.shape[1:])}, the backbone takes {shape}")
    return x0
