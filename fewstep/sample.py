"""``fewstep sample``: draw samples from any model folder at any step count and save them with a grid."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bench.images import save_grid
from .errors import FewstepError
from .io import atomic_dir, check_writable_parent
from .loading import load_pipeline, resolve_source


def _digits(pipe: Any, num: int, steps: int, guidance: float, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    from .bench.worlds import by_class, generate_digits
    from .worlds.digits.data import NUM_CLASSES

    images, labels = generate_digits(pipe, num, steps, guidance, seed, batch=num)
    ordered = by_class(labels[:, None], labels).flatten().tolist()  # the labels in grid order
    return by_class(images, labels), {"labels": ordered, "nrow": math.ceil(num / NUM_CLASSES)}


def _video(pipe: Any, num: int, steps: int, guidance: float, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    from .bench.worlds import generate_clips
    from .worlds.video.data import MOTIONS

    clips, labels, motions = generate_clips(pipe, num, steps, guidance, seed, batch=num)
    meta = {"labels": labels.tolist(), "motions": [MOTIONS[m] for m in motions.tolist()], "clips": clips[:, :, None]}
    return clips.flatten(0, 1)[:, None], {**meta, "nrow": clips.shape[1]}  # one frame strip per row


def _text_to_image(
    pipe: Any, prompt: str, num: int, steps: int, guidance: float, seed: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the noise of stochastic schedulers in pipelines that pass them no generator (SD3, Flux)
    out = pipe(
        prompt=prompt,
        num_images_per_prompt=num,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gen,
        output_type="np",
    )
    images = torch.from_numpy(np.asarray(out.images)).permute(0, 3, 1, 2).float()
    return images, {"prompt": prompt, "nrow": math.ceil(math.sqrt(num))}


def run_sample(
    source: str,
    output: Path,
    steps: int,
    num: int,
    guidance: float,
    seed: int,
    prompt: str | None = None,
    device: str = "cpu",
) -> Path:
    """Write samples.npz (uint8 images), grid.png and meta.json to ``output`` atomically; for clips, samples.npz
    holds (N, F, H, W) frames, grid.png one frame strip per clip, and samples.gif the clips in motion."""
    from .bench.images import save_animation
    from .worlds.digits.pipeline import DigitsPipeline
    from .worlds.video.pipeline import VideoDigitsPipeline

    if steps < 1 or num < 1:
        raise FewstepError(f"--steps and --num must be >= 1, got {steps} and {num}")
    resolve_source(source)
    check_writable_parent(output, "meta.json")
    pipe = load_pipeline(source, device=device)
    if isinstance(pipe, DigitsPipeline):
        images, meta = _digits(pipe, num, steps, guidance, seed)
        upscale = 4
    elif isinstance(pipe, VideoDigitsPipeline):
        images, meta = _video(pipe, num, steps, guidance, seed)
        upscale = 4
    elif prompt is not None:
        images, meta = _text_to_image(pipe, prompt, num, steps, guidance, seed)
        upscale = 1
    else:
        raise FewstepError(f"{type(pipe).__name__} needs --prompt")
    with atomic_dir(output, "meta.json") as tmp:
        save_grid(images, tmp / "grid.png", nrow=meta.pop("nrow"), upscale=upscale)
        clips = meta.pop("clips", None)
        if clips is not None:
            save_animation(clips, tmp / "samples.gif", nrow=math.ceil(math.sqrt(len(clips))), upscale=upscale)
            images = clips[:, :, 0]
        np.savez_compressed(tmp / "samples.npz", images=(images.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        meta.update(model=source, steps=steps, num=num, guidance=guidance, seed=seed)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return output
