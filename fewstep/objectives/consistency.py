"""Consistency-distillation pieces shared by LCM, MCM and DCM (Song et al. 2023; Luo et al. 2023, Alg. 1).

A consistency step compares the student's consistency output at the noisier point t with a target's at the point s
one teacher-ODE step further: the student at (x_t, t) against sg target(x_s, s), x_s = Phi(x_t, t -> s; teacher).
Times are the teacher's own (``teacher.native``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..sampling import guidance_at
from ..schedules import append_dims, ddim_step
from ..teacher import Denoiser
from .losses import lcm_boundary


def consistency_output(denoiser: Denoiser, x: Tensor, t: Tensor, cond: dict[str, Any], scaling: float) -> Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0(x, t) with LCMScheduler's boundary scalings at the model timestep of t
    (identity at t = 0; ``scaling`` is its ``timestep_scaling``)."""
    timestep = denoiser.native.to_model_timestep(t)
    c_skip, c_out = (append_dims(c, x.ndim) for c in lcm_boundary(timestep, scaling=scaling))
    return c_skip * x + c_out * denoiser(x, t, cond)


@torch.no_grad()
def teacher_ode_step(
    teacher: Denoiser, x_t: Tensor, t: Tensor, s: Tensor, cond: dict[str, Any], uncond: dict[str, Any],
    guidance: float | Tensor, interval: tuple[float, float] | None = None,
) -> Tensor:  # fmt: skip
    """x_s: one DDIM step of the teacher's guided probability-flow ODE from t to s (Euler on a flow teacher), the
    x0 and eps of the step both taken from the guided x0 (LCM's DDIMSolver with guidance on x0 and eps alike).
    ``interval``: guidance only for t in (lo, hi] (``sampling.guidance_at``), as the teacher's own sampler does."""
    native = teacher.native
    x0 = teacher.guided(x_t, t, cond, uncond, guidance_at(guidance, t, interval))
    return ddim_step(x0, x_t, native.coeffs(append_dims(t, x_t.ndim)), native.coeffs(append_dims(s, x_t.ndim)))
