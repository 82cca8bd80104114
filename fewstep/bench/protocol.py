"""Named text-to-image bench protocols: how generated and reference images are prepared for FID, how CLIP score is
defined, and what report.json records so that a reader can reproduce a number.

- ``mjhq`` (default), MJHQ-30K style (Playground v2.5, Li et al. 2024): FID against the reference folder with the
  references resized (bicubic) to the generated resolution; CLIP score 100 max(cos, 0) averaged (torchmetrics'
  CLIPScore, Hessel et al. 2021, without the 2.5 rescaling) on the prompt as written.
- ``coco-dmd2``, DMD2's COCO evaluator (Yin et al. 2024; tianweiy/DMD2 main/coco_eval/coco_evaluator.py):
  FID with generated and reference images center-cropped to a square (the short edge) and LANCZOS-resized to
  ``fid_resolution`` (512, as DMD2 evaluates), plus a patch-FID on the center 299 x 299 crop of each image at full
  resolution (DMD2's 1024 px evaluation) when every image has that much; CLIP score the mean cosine of images
  center-cropped and LANCZOS-resized to 256 before the CLIP model's own preprocessing, each prompt read as
  "A photo depicts <prompt>" (Hessel et al. 2021). DMD2 scores with OpenAI's CLIP ViT-B/32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError

PATCH = 299  # the Inception input a patch-FID crops to


@dataclass(frozen=True)
class Protocol:
    name: str
    reference_preprocessing: str  # "resize-bicubic" | "center-crop-lanczos"
    fid_resolution: int | None  # square side both sets are resized to (None: the generated resolution)
    patch_fid: bool  # also FID on the center 299 x 299 crops
    clip_template: str  # prepended to each prompt
    clip_definition: str  # "100*max(cos,0)" | "cos"
    clip_image_side: int | None  # generated images center-cropped and LANCZOS-resized to this before CLIP
    reference_clip: str  # the CLIP model the protocol's authors use


PROTOCOLS = {
    "mjhq": Protocol("mjhq", "resize-bicubic", None, False, "", "100*max(cos,0)", None, "any (user's --clip)"),
    "coco-dmd2": Protocol(
        "coco-dmd2", "center-crop-lanczos", 512, True, "A photo depicts ", "cos", 256, "OpenAI CLIP ViT-B/32"
    ),
}


def get_protocol(name: str, fid_resolution: int | None = None) -> Protocol:
    """The named protocol, with its FID resolution overridden when given (center-crop protocols only)."""
    if name not in PROTOCOLS:
        raise FewstepError(f"unknown bench protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    if fid_resolution is not None:
        if fid_resolution < 1:
            raise FewstepError(f"--fid-resolution must be >= 1, got {fid_resolution}")
        if protocol.reference_preprocessing != "center-crop-lanczos":
            raise FewstepError(f"the {name} protocol compares at the generated resolution: drop --fid-resolution")
        protocol = Protocol(**{**asdict(protocol), "fid_resolution": fid_resolution})
    return protocol


def center_crop_resize(side: int | None) -> Callable[[Any], Any]:
    """PIL image -> its centered square (the short edge), LANCZOS-resized to ``side`` (kept as is for None)."""
    from PIL import Image

    def transform(image: Any) -> Any:
        w, h = image.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        square = image.crop((left, top, left + s, top + s))
        return square if side is None else square.resize((side, side), Image.Resampling.LANCZOS)

    return transform


def center_patch(image: Any) -> Any:
    """PIL image -> its center 299 x 299 crop (a patch-FID input)."""
    w, h = image.size
    left, top = (w - PATCH) // 2, (h - PATCH) // 2
    return image.crop((left, top, left + PATCH, top + PATCH))


def to_pil(images: Tensor) -> list[Any]:
    """(N, 3, H, W) in [0, 1] -> uint8 PIL images, rounded as DMD2's evaluator writes them."""
    from PIL import Image

    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def from_pil(images: list[Any]) -> Tensor:
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1).float() / 255 for i in images])


def map_images(images: Tensor, transform: Callable[[Any], Any]) -> Tensor:
    """A PIL transform applied to a batch of [0, 1] images, through uint8 as the protocols' evaluators do."""
    return from_pil([transform(i) for i in to_pil(images)])


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def record(
    protocol: Protocol, *, prompts: str, num_prompts: int, seeds: int, resolution: tuple[int, ...], clip: str | None,
    reference: str | None, fid_features: str | None,
) -> dict[str, Any]:  # fmt: skip
    """What report.json says about the protocol a text-to-image bench ran under."""
    return {
        **asdict(protocol),
        "prompts": prompts,
        "prompts_sha256": file_sha256(prompts),
        "num_prompts": num_prompts,
        "seeds": list(range(seeds)),
        "resolution": list(resolution),
        "clip": clip,
        "reference_dir": reference,
        "fid_features": fid_features,
    }
