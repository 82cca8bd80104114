"""Training batches for recipes: batch k is a pure function of k (so data order survives a resume).

- ``DigitsBatches``: the embedded digits train split with class labels; the unconditional branch is DiT's null class.
- ``VideoBatches``: fresh random clips of the video world's train split with their condition tokens.
- ``PromptBatches``: cached prompt conditions of a text-to-image teacher, each with an x0 latent. Image-free by
  default: the x0 are the teacher's own samples for those prompts (its Euler sampler, computed once and cached);
  with ``data.images`` (``--data DIR``) they are captioned real images encoded by the teacher's VAE (image_data.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..recipes.base import Batch
from ..sampling import euler_sample, euler_times
from ..teacher import Denoiser
from .trainer import DataStream


@dataclass(frozen=True)
class DataConfig:
    """Where a text-to-image run's conditions and x0 come from (the digits world ignores it)."""

    prompts: str | None = None  # text file, JSONL or parquet (``prompt_field``)
    images: str | None = None  # a folder of captioned images (``--data``): real x0 instead of the teacher's samples
    prompt_field: str = "prompt"
    negative_prompt: str | None = None  # the unconditional branch of guidance; None: the family's own (Wan's) or ""
    max_sequence_length: int | None = None  # text tokens; None: the pipeline's __call__ default
    embedded_guidance: float | None = None  # FLUX.1-dev / SANA-Sprint guidance embedding; None: __call__'s default
    height: int | None = None  # pixels of the training images or clips; None: the pipeline's __call__ default
    width: int | None = None
    num_frames: int | None = None  # video teachers; None: the pipeline's __call__ default (Wan 81, CogVideoX 49)
    image_free: bool = False  # digits: train on the teacher's own samples instead of the train split
    num_teacher_samples: int = 2000  # digits, image-free: how many (class-balanced)
    teacher_steps: int = 25  # Euler steps of the teacher's samples that stand in for images
    teacher_guidance: float = 4.5  # guidance of those samples
    seed: int = 0


def null_class_of(model: Any) -> int:
    """The label index a class-conditional DiT reserves for the unconditional branch (its extra embedding row)."""
    return int(model.config.num_embeds_ada_norm)


class DigitsBatches:
    """Class-labelled digits from the train split, in a seeded per-epoch order."""

    def __init__(self, null_class: int, batch_size: int, seed: int = 0):
        from ..worlds.digits.data import load_split

        train = load_split("train")
        self.stream = DataStream([train.images, train.labels], batch_size=batch_size, seed=seed)
        self.null_class = null_class

    def __call__(self, index: int) -> Batch:
        x0, labels = self.stream.batch(index)
        return Batch(x0, {"class_labels": labels}, {"class_labels": torch.full_like(labels, self.null_class)})


class VideoBatches:
    """Random train-split clips: batch k is drawn from a generator seeded by (seed, k), so it survives a resume. Each
    clip comes with ``images`` still digits of its own class (``worlds/video/data.py``, ``still_frames``), the image
    set of frame-level losses."""

    def __init__(self, batch_size: int, seed: int = 0, images: int = 2):
        self.batch_size, self.seed, self.images = batch_size, seed, images

    def __call__(self, index: int) -> Batch:
        from ..worlds.video.data import condition_tokens, null_tokens, random_clips, still_frames

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        clips = random_clips("train", self.batch_size, gen)  # drawn first: the clips do not depend on ``images``
        tokens = condition_tokens(clips.labels, clips.motions)
        images = still_frames("train", clips.labels.repeat_interleave(self.images), gen)
        images = images.reshape(self.batch_size, self.images, *images.shape[1:])
        return Batch(clips.clips, {"encoder_hidden_states": tokens}, {"encoder_hidden_states": null_tokens(1)}, images)


@torch.no_grad()
def teacher_samples(
    teacher: Denoiser, cond: dict[str, Tensor], uncond: dict[str, Tensor], shape: tuple[int, ...],
    guidance: float, steps: int, seed: int, batch: int = 16, progress: bool = True,
) -> Tensor:  # fmt: skip
    """One x0 per condition row: the teacher's guided Euler sampler from seeded noise."""
    n = next(iter(cond.values())).shape[0]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=gen)
    times = euler_times(teacher.native, steps)
    out = []
    for i in tqdm(range(0, n, batch), desc="teacher samples", disable=not progress):
        part = {k: v[i : i + batch] for k, v in cond.items()}
        denoise = lambda x, t, part=part: teacher.guided(x, t, part, uncond, guidance)  # noqa: E731
        out.append(euler_sample(denoise, teacher.native, noise[i : i + batch], times))
    return torch.cat(out)  # type: ignore[arg-type]


def encode_options(cfg: DataConfig) -> Any:
    """The pipeline-call choices of a data config (families.EncodeOptions)."""
    from .families import EncodeOptions

    return EncodeOptions(
        negative=cfg.negative_prompt, max_sequence_length=cfg.max_sequence_length,
        embedded_guidance=cfg.embedded_guidance, height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
    )  # fmt: skip


def teacher_geometry(pipe: Any, cfg: DataConfig) -> tuple[Any, Any, tuple[int, ...]]:
    """(encode options, pixel size, latent shape of one sample) of a prompt-conditioned teacher under ``cfg``."""
    from .families import latent_shape, pixel_size

    options = encode_options(cfg)
    size = pixel_size(pipe, options)
    return options, size, latent_shape(pipe, size)


class PromptBatches:
    """Rows of (x0, condition) drawn in a seeded per-epoch order; uncond is one shared row. Conditions are prompt
    embeddings (text-to-image) or class labels (digits, image-free)."""

    def __init__(self, x0: Tensor, cond: dict[str, Tensor], uncond: dict[str, Tensor], batch_size: int, seed: int = 0):
        self.x0, self.cond, self.uncond = x0, cond, uncond
        self.stream = DataStream([torch.arange(len(x0))], batch_size=batch_size, seed=seed)

    @classmethod
    def for_teacher(
        cls, pipe: Any, teacher: Denoiser, source: str, cfg: DataConfig, batch_size: int, seed: int, cache_dir: Path
    ) -> PromptBatches:
        from ..errors import FewstepError
        from ..io import cached_tensors
        from .prompts import read_prompts
        from .text import cache_key, cached_prompt_conditions

        if cfg.images is not None:
            return cls.for_images(pipe, teacher, source, cfg, batch_size, seed, cache_dir)
        if cfg.prompts is None:
            raise FewstepError(f"{type(pipe).__name__} is a text-to-image teacher: pass --prompts FILE or --data DIR")
        prompts = read_prompts(cfg.prompts, cfg.prompt_field)
        options, size, shape = teacher_geometry(pipe, cfg)
        cond, uncond = cached_prompt_conditions(pipe, source, prompts, options, size, cache_dir)
        # every encoding choice (negative prompt, text length, embedded guidance, size) changes the conditions
        settings = [asdict(options), cfg.teacher_steps, cfg.teacher_guidance, cfg.seed, shape]
        key = cache_key(source, prompts, settings)
        x0 = cached_tensors(
            cache_dir / f"teacher-samples-{key}.safetensors",
            lambda: {"x0": teacher_samples(teacher, cond, uncond, shape, cfg.teacher_guidance, cfg.teacher_steps,
                                           cfg.seed)},
        )["x0"]  # fmt: skip
        return cls(x0, cond, uncond, batch_size, seed)

    @classmethod
    def for_images(
        cls, pipe: Any, teacher: Denoiser, source: str, cfg: DataConfig, batch_size: int, seed: int, cache_dir: Path
    ) -> PromptBatches:
        """Captioned real images: x0 from the teacher's VAE, conditions from the captions (both cached)."""
        from ..errors import FewstepError
        from ..io import cached_tensors
        from .families import family_of
        from .image_data import encode_images, folder_digest, read_captioned_images
        from .text import cached_prompt_conditions

        assert cfg.images is not None
        if family_of(pipe).video or type(pipe).__name__ == "FluxPipeline":
            raise FewstepError(
                f"--data (captioned images) is for image teachers with plain latents, not {type(pipe).__name__}: "
                "distill from --prompts"
            )
        pairs = read_captioned_images(cfg.images, cfg.prompt_field)
        paths, captions = [p for p, _ in pairs], [c for _, c in pairs]
        options, size, shape = teacher_geometry(pipe, cfg)
        cond, uncond = cached_prompt_conditions(pipe, source, captions, options, size, cache_dir)
        key = hashlib.sha256(f"{source}|{folder_digest(pairs)}|{cfg.seed}|{shape}".encode()).hexdigest()[:16]
        x0 = cached_tensors(
            cache_dir / f"image-latents-{key}.safetensors", lambda: {"x0": encode_images(pipe, paths, shape, cfg.seed)}
        )["x0"]
        return cls(x0, cond, uncond, batch_size, seed)

    @classmethod
    def digits_image_free(
        cls, teacher: Denoiser, null_class: int, cfg: DataConfig, batch_size: int, seed: int, cache_dir: Path
    ) -> PromptBatches:
        """Class-balanced teacher samples of the digits world (its Euler sampler at ``cfg.teacher_guidance``)."""
        from ..io import cached_tensors
        from ..worlds.digits.data import RESOLUTION, balanced_labels

        labels = balanced_labels(cfg.num_teacher_samples)
        cond, uncond = {"class_labels": labels}, {"class_labels": torch.tensor([null_class])}
        key = f"{cfg.num_teacher_samples}-{cfg.teacher_steps}-{cfg.teacher_guidance}-{cfg.seed}"
        shape = (1, RESOLUTION, RESOLUTION)
        x0 = cached_tensors(
            cache_dir / f"digits-teacher-samples-{key}.safetensors",
            lambda: {"x0": teacher_samples(teacher, cond, uncond, shape, cfg.teacher_guidance, cfg.teacher_steps,
                                           cfg.seed, 500)},
        )["x0"]  # fmt: skip
        return cls(x0.clamp(-1, 1), cond, uncond, batch_size, seed)

    def __call__(self, index: int) -> Batch:
        (idx,) = self.stream.batch(index)
        return Batch(self.x0[idx], {k: v[idx] for k, v in self.cond.items()}, dict(self.uncond))
