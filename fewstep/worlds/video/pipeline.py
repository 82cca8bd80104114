"""A diffusers pipeline for the video world, so ``DiffusionPipeline.from_pretrained(dir)`` loads its teacher and
students: a WanTransformer3DModel (``transformer``) conditioned on a digit class and a motion, and a scheduler.

The condition enters as Wan's "text": two one-hot tokens (``data.condition_tokens``) through the model's own
text embedder, so the backbone is a stock Wan transformer with ``text_dim = 16``; the unconditional branch is all
zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from torch import Tensor

from ...sampling import guidance_at
from ..loop import denoise, guided_output
from .data import CANVAS, MOTIONS, NUM_CLASSES, NUM_FRAMES, NUM_MOTIONS, condition_tokens, null_tokens


@dataclass
class VideoDigitsPipelineOutput(BaseOutput):
    """frames: (B, F, 1, H, W) in [0, 1] (``output_type="pt"``, diffusers' video layout), (B, F, H, W, 1) numpy, or
    one list of PIL frames per clip."""

    frames: Tensor | np.ndarray | list


class VideoDigitsPipeline(DiffusionPipeline):
    """Class- and motion-conditional 8-frame 16x16 clips of moving digits."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler, guidance_interval: Sequence[float] | None = None):
        """``guidance_interval``: the (lo, hi] of noise levels sigma (timestep / num_train_timesteps) where
        classifier-free guidance applies by default (``sampling.guidance_at``); None: at every step. Saved in
        model_index.json, so a teacher folder carries its own sampler."""
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        interval = None if guidance_interval is None else [float(v) for v in guidance_interval]
        self.register_to_config(guidance_interval=interval)

    def model_output(
        self, x: Tensor, timestep: Tensor, tokens: Tensor, guidance_scale: float,
        guidance_interval: tuple[float, float] | None = None,
    ) -> Tensor:  # fmt: skip
        """One network evaluation with classifier-free guidance on the raw output (affine in x0 at fixed x_t), at
        ``guidance_scale`` where the step's sigma lies in ``guidance_interval`` and at 1 (one branch) elsewhere."""
        null = null_tokens(x.shape[0]).to(tokens)
        forward = lambda x, t, cond: self.transformer(x, timestep=t, encoder_hidden_states=cond).sample  # noqa: E731
        sigma = float(timestep.reshape(-1)[0]) / self.scheduler.config.num_train_timesteps
        w = float(guidance_at(guidance_scale, sigma, guidance_interval))
        return guided_output(forward, x, timestep, tokens, null, w)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | Tensor | None = None,
        motions: Sequence[int | str] | Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        guidance_interval: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        num_videos: int | None = None,
    ) -> VideoDigitsPipelineOutput | tuple:
        """``class_labels`` 0..9 and ``motions`` (indices or names of MOTIONS: still, right, left, down, up), one
        per clip; a missing one cycles through its values. ``guidance_interval`` (lo, hi]: where ``guidance_scale``
        applies; None takes the folder's own (``config.guidance_interval``); (0, 1) is every step."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = len(class_labels) if class_labels is not None else len(motions) if motions is not None else None
        n = n or num_videos or NUM_CLASSES
        if class_labels is None:
            class_labels = torch.arange(n) % NUM_CLASSES
        if motions is None:
            motions = torch.arange(n) % NUM_MOTIONS
        if not isinstance(motions, Tensor):
            motions = [MOTIONS.index(m) if isinstance(m, str) and m in MOTIONS else m for m in motions]
            if any(isinstance(m, str) for m in motions):
                raise ValueError(f"motions must be indices or names of {', '.join(MOTIONS)}")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        moves = torch.as_tensor(motions, dtype=torch.long).reshape(-1)
        if len(labels) != len(moves):
            raise ValueError(f"{len(labels)} class labels but {len(moves)} motions")
        if ((labels < 0) | (labels >= NUM_CLASSES)).any():
            raise ValueError(f"class labels must lie in 0..{NUM_CLASSES - 1}")
        if ((moves < 0) | (moves >= NUM_MOTIONS)).any():
            raise ValueError(f"motions must lie in 0..{NUM_MOTIONS - 1}")
        given = guidance_interval if guidance_interval is not None else self.config.get("guidance_interval")
        if given is not None and not (len(given) == 2 and 0 <= given[0] < given[1]):
            raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo < hi, got {given}")
        interval = None if given is None else (float(given[0]), float(given[1]))
        dtype = self.transformer.dtype
        tokens = condition_tokens(labels, moves).to(self.device, dtype)
        shape = (len(labels), self.transformer.config.in_channels, NUM_FRAMES, CANVAS, CANVAS)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        x = denoise(
            self, latents.to(self.device, dtype), num_inference_steps,
            lambda x, t: self.model_output(x, t, tokens, guidance_scale, interval), generator,
        )  # fmt: skip

        frames: Tensor | np.ndarray | list = ((x.float().clamp(-1, 1) + 1) / 2).transpose(1, 2)  # (B, F, C, H, W)
        if output_type == "np" or output_type == "pil":
            frames = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # type: ignore[union-attr]
            if output_type == "pil":
                frames = [self.numpy_to_pil(clip) for clip in frames]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return VideoDigitsPipelineOutput(frames=frames)


def _register_with_diffusers() -> None:
    """Let ``DiffusionPipeline.from_pretrained(dir)`` resolve ``"_class_name": "VideoDigitsPipeline"`` once this
    module has been imported (diffusers looks pipeline classes up in its own namespace)."""
    import diffusers

    if getattr(diffusers, "VideoDigitsPipeline", None) is not VideoDigitsPipeline:
        diffusers.VideoDigitsPipeline = VideoDigitsPipeline


_register_with_diffusers()
