"""What a bench measures quality against. Each world generates ``num`` samples for one (steps, guidance, seed),
scores them, and says how to call the pipeline for a latency batch:

- ``DigitsWorld``: class-balanced conditional samples; FID against the held-out and the train split, class accuracy,
  per-class diversity.
- ``VideoWorld``: moving-digits clips balanced over (class, motion); clip Frechet distance against the held-out and
  the train clips, frame FID, class and motion accuracy, temporal consistency (``video_metrics.py``).
- ``TextWorld``: prompts from a file; CLIP score (open_clip, local weights) and FID against a reference folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError
from ..worlds.digits.data import NUM_CLASSES, balanced_labels, load_split
from .metrics import DigitsMetrics, FeatureFID, to_unit


@dataclass
class Scored:
    """One seed's samples: metric values, and the images (with their grid layout) to show."""

    metrics: dict[str, float]
    grid: Tensor
    nrow: int
    upscale: int
    animation: Tensor | None = None  # clips (N, F, C, H, W) in [0, 1] to show as one animated grid (video worlds)


def generate_digits(pipe: Any, num: int, steps: int, guidance: float, seed: int, batch: int) -> tuple[Tensor, Tensor]:
    """``num`` class-balanced samples (N, 1, 8, 8) in [0, 1] and their labels, one generator per seed."""
    labels = balanced_labels(num)
    gen = torch.Generator().manual_seed(seed)
    images = torch.cat([
        pipe(class_labels=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images.cpu()
        for chunk in labels.split(batch)
    ])  # fmt: skip
    return images, labels


def by_class(images: Tensor, labels: Tensor, per_class: int | None = None) -> Tensor:
    """Images reordered class by class (one grid row per class), at most ``per_class`` of each."""
    return torch.cat([images[labels == c][:per_class] for c in range(NUM_CLASSES)])


@dataclass
class DigitsWorld:
    metrics: DigitsMetrics = field(default_factory=DigitsMetrics.load)

    def score(self, pipe: Any, num: int, steps: int, guidance: float, seed: int, batch: int) -> Scored:
        images, labels = generate_digits(pipe, num, steps, guidance, seed, batch)
        values = {
            "fid": self.metrics.fid_held_out(images),
            "fid_train": self.metrics.fid_train(images),
            "accuracy": self.metrics.accuracy(images, labels),
            "diversity": self.metrics.diversity(images, labels),
        }
        return Scored(values, by_class(images, labels, NUM_CLASSES), nrow=NUM_CLASSES, upscale=4)

    def latency_call(self, steps: int, guidance: float, batch: int) -> dict[str, Any]:
        return {"class_labels": balanced_labels(batch), "num_inference_steps": steps, "guidance_scale": guidance}

    def reference(self, num: int, subsets: int, seeds: int = 1) -> dict[str, Any]:
        floor, floor_std, floor_count = self.metrics.floor(num, subsets=subsets)
        train = load_split("train")
        return {
            "real_fid_floor": floor,
            "real_fid_floor_std": floor_std,
            "real_fid_floor_subsets": subsets,
            "floor_num_samples": floor_count,
            "held_out_vs_train_fid": self.metrics.fid_train(to_unit(load_split("held_out").images)),
            "real_diversity": self.metrics.diversity(to_unit(train.images), train.labels),
            "world": "digits",
            "evaluator": "digits CNN, 128-d penultimate features",
        }


def generate_clips(
    pipe: Any, num: int, steps: int, guidance: float, seed: int, batch: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``num`` clips (N, F, H, W) in [0, 1] balanced over the 50 (class, motion) conditions, with their labels and
    motions; one generator per seed."""
    from ..worlds.video.data import balanced_conditions

    labels, motions = balanced_conditions(num)
    gen = torch.Generator().manual_seed(seed)
    clips = torch.cat([
        pipe(class_labels=lab, motions=mot, num_inference_steps=steps, guidance_scale=guidance,
             generator=gen).frames.cpu()[:, :, 0]
        for lab, mot in zip(labels.split(batch), motions.split(batch), strict=True)
    ])  # fmt: skip
    return clips, labels, motions


def shown_clips(labels: Tensor, motions: Tensor) -> Tensor:
    """Indices of ten clips to show: one per class, the motions cycling (class c in motion c mod 5)."""
    from ..worlds.video.data import NUM_MOTIONS

    wanted = [(c, c % NUM_MOTIONS) for c in range(NUM_CLASSES)]
    hits = [((labels == c) & (motions == m)).nonzero() for c, m in wanted]
    return torch.tensor([int(h[0]) for h in hits if len(h)], dtype=torch.long)


@dataclass
class VideoWorld:
    metrics: Any = None  # video_metrics.VideoMetrics, loaded on first use

    def __post_init__(self) -> None:
        if self.metrics is None:
            from .video_metrics import VideoMetrics

            self.metrics = VideoMetrics.load()

    def score(self, pipe: Any, num: int, steps: int, guidance: float, seed: int, batch: int) -> Scored:
        clips, labels, motions = generate_clips(pipe, num, steps, guidance, seed, batch)
        shown = clips[shown_clips(labels, motions)]  # (10, F, H, W): one frame strip per row
        return Scored(
            self.metrics.score(clips, labels, motions), shown.flatten(0, 1)[:, None], nrow=shown.shape[1], upscale=4,
            animation=shown[:, :, None],
        )  # fmt: skip

    def latency_call(self, steps: int, guidance: float, batch: int) -> dict[str, Any]:
        from ..worlds.video.data import balanced_conditions

        labels, motions = balanced_conditions(batch)
        return {"class_labels": labels, "motions": motions, "num_inference_steps": steps, "guidance_scale": guidance}

    def reference(self, num: int, subsets: int, seeds: int = 1) -> dict[str, Any]:
        return {
            **self.metrics.floor(num, subsets=subsets),
            "real_fid_floor_subsets": subsets,
            "world": "video",
            "evaluator": "video world: clip 3-D CNN (128-d features) for the Frechet distance, class and motion; "
            "digits CNN on each frame's digit window for frame FID and class agreement",
        }


@dataclass(frozen=True)
class TextOptions:
    """Inputs of a text-to-image bench: prompts file, ``ARCH:CHECKPOINT`` for CLIP, a reference image folder, the
    FID feature network, and the named protocol (``protocol.py``) with its FID resolution override."""

    prompts: str | None = None
    clip: str | None = None
    reference: str | None = None
    fid_features: str = "inception"
    protocol: str = "mjhq"
    fid_resolution: int | None = None


@dataclass
class TextWorld:
    options: TextOptions
    prompts: list[str]
    protocol: Any = None  # protocol.Protocol
    clip: Any = None  # ClipScorer
    fid: FeatureFID | None = None
    patch_fid: FeatureFID | None = None
    resolution: tuple[int, int] = (0, 0)
    fid_transform: Any = None  # PIL -> PIL for both image sets (coco-dmd2's center crop); None: references resized

    @classmethod
    def load(cls, pipe: Any, options: TextOptions) -> TextWorld:
        from ..training.prompts import read_prompts
        from .clip import ClipScorer
        from .metrics import reference_fid
        from .protocol import PATCH, center_crop_resize, center_patch, get_protocol

        protocol = get_protocol(options.protocol, options.fid_resolution)  # a bad name fails before any work
        if options.prompts is None:
            raise FewstepError(f"{type(pipe).__name__} is a text-to-image pipeline: pass --prompts FILE")
        world = cls(options, read_prompts(options.prompts), protocol)
        if options.clip:
            world.clip = ClipScorer.load(
                options.clip, template=protocol.clip_template, definition=protocol.clip_definition,
                image_side=protocol.clip_image_side,
            )  # fmt: skip
        probe = pipe(prompt=world.prompts[:1], num_inference_steps=1, output_type="pt").images
        world.resolution = (int(probe.shape[-2]), int(probe.shape[-1]))
        if protocol.reference_preprocessing == "center-crop-lanczos":  # both sets; else references resized to ours
            world.fid_transform = center_crop_resize(protocol.fid_resolution)
        if options.reference:
            world.fid = reference_fid(options.reference, options.fid_features, world.resolution, world.fid_transform)
            if protocol.patch_fid and min(world.resolution) >= PATCH:
                world.patch_fid = reference_fid(
                    options.reference, options.fid_features, world.resolution, center_patch
                )
        if world.clip is None and world.fid is None:
            raise FewstepError("nothing to measure quality with: pass --clip ARCH:CHECKPOINT and/or --reference DIR")
        return world

    def cycled(self, num: int) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(num)]

    def score(self, pipe: Any, num: int, steps: int, guidance: float, seed: int, batch: int) -> Scored:
        from .protocol import center_patch, map_images

        prompts = self.cycled(num)
        gen = torch.Generator().manual_seed(seed)
        # pipelines that pass no generator to scheduler.step (SD3, Flux, Wan) draw a stochastic scheduler's noise
        # (FlowMatchEuler's stochastic_sampling) from the global generator: seed it too, so a seed is one sample set
        torch.manual_seed(seed)
        images = torch.cat([
            pipe(prompt=prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                 output_type="pt").images.float().cpu()
            for i in range(0, num, batch)
        ])  # fmt: skip
        values = {}
        if self.fid is not None:
            compared = images if self.fid_transform is None else map_images(images, self.fid_transform)
            values["fid"] = self.fid(compared)
        if self.patch_fid is not None:
            values["patch_fid"] = self.patch_fid(map_images(images, center_patch))
        if self.clip is not None:
            values["clip_score"] = self.clip(images, prompts)
        return Scored(values, images[:16], nrow=4, upscale=1)

    def latency_call(self, steps: int, guidance: float, batch: int) -> dict[str, Any]:
        return {"prompt": self.cycled(batch), "num_inference_steps": steps, "guidance_scale": guidance}

    def reference(self, num: int, subsets: int, seeds: int = 1) -> dict[str, Any]:
        from .protocol import record

        assert self.options.prompts is not None
        return {
            "world": "text",
            "real_fid_floor": None,  # one reference set gives no real-vs-real floor
            "reference_dir": self.options.reference,
            "fid_features": self.options.fid_features if self.options.reference else None,
            "clip": self.options.clip,
            "prompts": self.options.prompts,
            "num_prompts": len(self.prompts),
            "protocol": record(
                self.protocol, prompts=self.options.prompts, num_prompts=len(self.prompts), seeds=seeds,
                resolution=self.resolution, clip=self.options.clip, reference=self.options.reference,
                fid_features=self.options.fid_features if self.options.reference else None,
            ),
        }  # fmt: skip
