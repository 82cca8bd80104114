"""A diffusers pipeline for the digits world, so ``DiffusionPipeline.from_pretrained(dir)`` loads teacher and students.

The sampling loop is the ordinary diffusers one: whatever scheduler the folder ships (FlowMatchEulerDiscreteScheduler
for the teacher, LCMScheduler / SCMScheduler / FewStepScheduler for students) drives the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from torch import Tensor

from ..loop import denoise, guided_output
from .data import NUM_CLASSES, RESOLUTION


@dataclass
class DigitsPipelineOutput(BaseOutput):
    """images: (B, 1, 8, 8) in [0, 1] (``output_type="pt"``), (B, 8, 8, 1) numpy, or a list of PIL images."""

    images: Tensor | np.ndarray | list


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional 8x8 digits: a DiT (``transformer``) and a scheduler."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        """The label index of the unconditional branch (the extra row of DiT's label table)."""
        return int(self.transformer.config.num_embeds_ada_norm)

    def model_output(self, x: Tensor, timestep: Tensor, class_labels: Tensor, guidance_scale: float) -> Tensor:
        """One network evaluation with classifier-free guidance on the raw output (affine in x0 at fixed x_t)."""
        null = torch.full_like(class_labels, self.null_class)
        forward = lambda x, t, labels: self.transformer(x, timestep=t, class_labels=labels).sample  # noqa: E731
        return guided_output(forward, x, timestep, class_labels, null, guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        num_images: int | None = None,
    ) -> DigitsPipelineOutput | tuple:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if class_labels is None:
            class_labels = torch.arange(num_images or NUM_CLASSES) % NUM_CLASSES
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        if ((labels < 0) | (labels >= NUM_CLASSES)).any():
            raise ValueError(f"class labels must lie in 0..{NUM_CLASSES - 1}")
        dtype = self.transformer.dtype
        shape = (len(labels), self.transformer.config.in_channels, RESOLUTION, RESOLUTION)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, dtype)
        x = denoise(
            self, latents.to(self.device, dtype), num_inference_steps,
            lambda x, t: self.model_output(x, t, labels, guidance_scale), generator,
        )  # fmt: skip

        images: Tensor | np.ndarray | list = (x.float().clamp(-1, 1) + 1) / 2
        if output_type == "np" or output_type == "pil":
            images = images.permute(0, 2, 3, 1).cpu().numpy()  # type: ignore[union-attr]
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DigitsPipelineOutput(images=images)


def _register_with_diffusers() -> None:
    """Let ``DiffusionPipeline.from_pretrained(dir)`` resolve ``"_class_name": "DigitsPipeline"`` once fewstep's
    digits pipeline has been imported (diffusers looks pipeline classes up in its own namespace)."""
    import diffusers

    if getattr(diffusers, "DigitsPipeline", None) is not DigitsPipeline:
        diffusers.DigitsPipeline = DigitsPipeline


_register_with_diffusers()
