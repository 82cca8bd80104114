"""Consistency-distillation pieces shared by LCM, MCM, DCM and Hyper-SD (Song et al. 2023; Luo et al. 2023, Alg. 1).

A consistency step compares the student's consistency output at the noisier point t with a target's at the point s
one teacher-ODE step further: the student at (x_t, t) against sg target(x_s, s), x_s = Phi(x_t, t -> s; teacher).
Times are the teacher's own (``teacher.native``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..sampling import euler_times, guidance_at
from ..schedules import NoiseSchedule, append_dims, ddim_step
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


def segment_edges(schedule: NoiseSchedule, k: int) -> Tensor:
    """(k + 1,) descending edges of k equal segments of the teacher's sampling range: t_max, then the times at the
    fractions (k - 1)/k, ..., 0 of the scheduler's unshifted grid (``sampling.grid_time``), so that on a flow teacher
    the k-step Euler grid's times are the edges (PCM's phases, Wang et al. 2024; Hyper-SD's segments, Ren et al.
    2024, Sec. 3.1)."""
    return torch.tensor(euler_times(schedule, k)).float()


def segment_edge(t: Tensor, edges: Tensor) -> Tensor:
    """The lower edge of the segment holding each t: the largest edge strictly below t (t_min for t in the last
    segment); a t on an edge belongs to the segment below it, which it opens."""
    below = edges.to(t).unsqueeze(0) < t.unsqueeze(1)  # (B, k + 1); edges descend, so the first True is the largest
    return edges.to(t)[below.float().argmax(dim=1)]


def segment_output(denoiser: Denoiser, x: Tensor, t: Tensor, e: Tensor, cond: dict[str, Any]) -> Tensor:
    """f(x, t -> e): x carried to the segment edge e < t along the DDIM line through the model's (x0, eps_hat), PCM's
    multiphase prediction (``ddim_style_multiphase_pred``); at e = t_min it is the x0 estimate (on flow) or alpha
    x0 + sigma eps_hat at the VP boundary. Consistency within a segment is f(x_t, t -> e) = f(x_s, s -> e) for every
    s in [e, t] on one ODE trajectory."""
    native = denoiser.native
    c_t, c_e = native.coeffs(append_dims(t, x.ndim)), native.coeffs(append_dims(e, x.ndim))
    return ddim_step(denoiser(x, t, cond), x, c_t, c_e)
