"""The denoising loop the embedded worlds' pipelines share: the ordinary diffusers one, driven by whatever scheduler
the folder ships (FlowMatchEulerDiscreteScheduler for teachers; LCMScheduler, SCMScheduler, TCDScheduler or
FewStepScheduler for students)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor


def guided_output(
    forward: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, timestep: Tensor, cond: Tensor, null: Tensor,
    guidance_scale: float,
) -> Tensor:  # fmt: skip
    """One network evaluation ``forward(x, timestep, condition)`` with classifier-free guidance on the raw output
    (affine in x0 at fixed x_t): one branch at w = 1 (conditional) or w = 0 (unconditional), else both in one batch."""
    timestep = timestep.to(x.dtype).expand(x.shape[0])
    if guidance_scale in (0.0, 1.0):
        return forward(x, timestep, cond if guidance_scale == 1.0 else null)
    out = forward(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([cond, null]))
    cond_out, uncond_out = out.chunk(2)
    return uncond_out + guidance_scale * (cond_out - uncond_out)


def denoise(
    pipe: Any, x: Tensor, num_inference_steps: int, model_output: Callable[[Tensor, Tensor], Tensor],
    generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """Run ``pipe.scheduler`` for ``num_inference_steps`` from the noise ``x``; ``model_output(x, t)`` is one guided
    network evaluation at the scheduler's timestep ``t``."""
    x = x * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
    if isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        # As FluxPipeline does: evenly spaced sigmas 1 .. 1/n, so n Euler steps cover [0, 1] evenly (the
        # scheduler's own grid would end on a wasted step from 1/1000 to 0)
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        pipe.scheduler.set_timesteps(sigmas=sigmas, device=pipe.device)
    else:
        pipe.scheduler.set_timesteps(num_inference_steps, device=pipe.device)
    for t in pipe.progress_bar(pipe.scheduler.timesteps):
        scale_input = getattr(pipe.scheduler, "scale_model_input", None)  # flow schedulers have none
        model_in = scale_input(x, t) if scale_input is not None else x
        x = pipe.scheduler.step(model_output(model_in, t), t, x, generator=generator, return_dict=False)[0]
    return x
