"""CLIP score with open_clip from a local checkpoint (no hub access): 100 * max(cos(image, text), 0), averaged,
the definition torchmetrics' CLIPScore uses (Hessel et al., 2021, without the 2.5 rescaling); or, as a bench
protocol asks (``protocol.py``), the plain mean cosine with a prompt template and DMD2's image preparation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import FewstepError


class ClipScorer:
    """Scores images (N, 3, H, W) in [0, 1] against their prompts with an open_clip model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 64,
        template: str = "",
        definition: str = "100*max(cos,0)",
        image_side: int | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.template = template  # prepended to every prompt ("A photo depicts ": Hessel et al. 2021, DMD2)
        if definition not in ("100*max(cos,0)", "cos"):
            raise ValueError(f"unknown CLIP score definition {definition!r}")
        self.definition = definition
        # None: images resized (bicubic, antialiased) to the model's input; a side: each image center-cropped to a
        # square and LANCZOS-resized to it, then the model's own eval transform (resize, center crop), as DMD2 does
        self.image_side = image_side
        size = getattr(model.visual, "image_size", 224)
        self.image_size = tuple(size) if isinstance(size, list | tuple) else (size, size)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD)).view(1, 3, 1, 1)

    @classmethod
    def load(cls, spec: str, **options: Any) -> ClipScorer:
        """``ARCH:CHECKPOINT``: an open_clip architecture name (or a JSON model config file) and local weights;
        ``options``: the scorer's template, definition and image_side (a bench protocol's)."""
        try:
            import open_clip
        except ImportError:
            raise FewstepError("CLIP score needs open-clip-torch: pip install 'fewstep[clip]'") from None
        arch, sep, checkpoint = spec.partition(":")
        if not sep or not checkpoint:
            raise FewstepError(f"--clip expects ARCH:CHECKPOINT (e.g. ViT-B-32:/models/clip.bin), got {spec!r}")
        if arch.endswith(".json"):
            if not Path(arch).is_file():
                raise FewstepError(f"CLIP model config {arch} does not exist")
            open_clip.add_model_config(arch)
            arch = Path(arch).stem
        if not Path(checkpoint).is_file():
            raise FewstepError(f"CLIP checkpoint {checkpoint} does not exist")
        try:
            model = open_clip.create_model(arch, pretrained=checkpoint)
        except Exception as err:  # unknown arch, mismatched weights: the reason on one line
            raise FewstepError(
                f"could not load CLIP {spec}: {str(err).splitlines()[0] if str(err) else err}"
            ) from None
        return cls(model, open_clip.get_tokenizer(arch), **options)

    def preprocess(self, images: Tensor) -> Tensor:
        if self.image_side is not None:
            import open_clip

            from .protocol import center_crop_resize, to_pil

            square = center_crop_resize(self.image_side)
            evaluate = open_clip.image_transform(
                self.image_size, is_train=False, mean=self.mean.flatten().tolist(), std=self.std.flatten().tolist()
            )
            return torch.stack([evaluate(square(image)) for image in to_pil(images)])
        x = F.interpolate(images.float(), size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        return (x.clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Cosine similarity (N,) between each image and its prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        out = []
        for i in range(0, len(images), self.batch_size):
            img = self.model.encode_image(self.preprocess(images[i : i + self.batch_size]))
            texts = [self.template + p for p in prompts[i : i + self.batch_size]]
            txt = self.model.encode_text(self.tokenizer(texts))
            out.append(F.cosine_similarity(img.float(), txt.float(), dim=-1))
        return torch.cat(out)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> float:
        cos = self.cosine(images, prompts)
        return float(cos.mean() if self.definition == "cos" else (100 * cos.clamp_min(0)).mean())
