"""Loss pieces that recipes compose (consistency distillation first; DMD pieces join with their issue).

Shapes: images (B, ...); per-sample results (B,); t is (B,) in TrigFlow radians unless said otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import batch_random
from ..schedules import append_dims


def mean_per_sample(x: Tensor) -> Tensor:
    """(B, ...) -> (B,) mean over everything but the batch."""
    return x.flatten(1).mean(1)


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """sqrt(d^2 + c^2) - c per element, averaged per sample (LCM; Song & Dhariwal, 2023, iCT Sec. 3.3).

    Quadratic (d^2 / 2c) for |d| << c, linear (|d| - c) beyond, so outliers pull with bounded force.
    """
    work = torch.promote_types(pred.dtype, torch.float32)
    d2 = (pred.to(work) - target.to(work)) ** 2
    return mean_per_sample(d2 / (torch.sqrt(d2 + c * c) + c))  # = sqrt(d^2 + c^2) - c, without cancellation


def lcm_boundary(timestep: Tensor, sigma_data: float = 0.5, scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """LCM's boundary-condition scalings f = c_skip x_t + c_out x0_hat, as diffusers' LCMScheduler computes them:
    c_skip = sigma_d^2 / ((s t)^2 + sigma_d^2), c_out = s t / sqrt((s t)^2 + sigma_d^2), t the DDPM timestep and s
    ``timestep_scaling``; c_skip(0) = 1 and c_out(0) = 0 make f the identity at the boundary."""
    st = scaling * timestep.float()
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / torch.sqrt(st**2 + sigma_data**2)
    return c_skip, c_out


def trigflow_time_proposal(
    n: int,
    p_mean: float,
    p_std: float,
    sigma_data: float,
    p_sigma_data: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """sCM's log-normal proposal over the noise level (Lu & Song, 2024, Sec. 4.2), t in (0, pi/2).

    exp(N(p_mean, p_std^2)) is sigma for data of std ``p_sigma_data`` (SANA-Sprint states it for latents scaled to
    0.5, rCM for unit latents), so on the data as given (taken as unit variance) the noise-to-signal ratio is
    exp(N) / p_sigma_data, and on TrigFlow with ``sigma_data`` = sd, where that ratio is sd tan t,
    t = atan(exp(N) / (p_sigma_data sd)). The reference std is the paper's, independent of the schedule's sd.
    """
    z = (torch.randn(n, generator=generator, dtype=torch.float64) if generator is not None
         else batch_random.randn((n,), dtype=torch.float64))  # fmt: skip
    log_sigma = p_mean + p_std * z
    return torch.atan(torch.exp(log_sigma) / (p_sigma_data * sigma_data)).float()


def scm_tangent(
    F_minus: Tensor, dF_dt: Tensor, dxt_dt: Tensor, x_t: Tensor, t: Tensor, sigma_data: float, warmup: float = 1.0
) -> Tensor:
    """The sCM training direction g (Lu & Song, 2024, Eq. 8 with the tangent warm-up r of Sec. 4.2):

        g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d dF^-/dt)

    F^- is the student without gradient and dF^-/dt its JVP with tangents (cos t sin t dx_t/dt, cos t sin t) (the
    JVP rearrangement). At r = 1, g = cos(t) d f / dt along the probability-flow ODE for the consistency function
    f = cos t x_t - sigma_d sin t F, which the loss drives to zero.
    """
    cos, sin = append_dims(t.cos(), x_t.ndim), append_dims(t.sin(), x_t.ndim)
    return -(cos**2) * (sigma_data * F_minus - dxt_dt) - warmup * (cos * sin * x_t + sigma_data * dF_dt)


def rcm_tangent(
    F_minus: Tensor, dF_dt: Tensor, dxt_dt: Tensor, x_t: Tensor, t: Tensor, sigma_data: float, warmup: float = 1.0
) -> Tensor:
    """rCM's training direction (NVlabs/rcm, t2v_model_distill_rcm.py, _student_scm_step), written for any sd:

        g = -cos t sqrt(1 - r^2 sin^2 t) (sigma_d F^- - dx_t/dt) - (r cos t sin t x_t + sigma_d dF^-/dt)

    Equal to ``scm_tangent`` at r = 1 (sqrt(1 - sin^2 t) = cos t); during the warm-up rCM keeps dF/dt whole and
    fades in only the x_t term, with the first term's factor moving from cos t to cos^2 t.
    """
    cos, sin = append_dims(t.cos(), x_t.ndim), append_dims(t.sin(), x_t.ndim)
    first = -cos * torch.sqrt(1 - warmup**2 * sin**2) * (sigma_data * F_minus - dxt_dt)
    return first - (warmup * cos * sin * x_t + sigma_data * dF_dt)


def normalize_tangent(g: Tensor, c: float = 0.1) -> Tensor:
    """g / (||g|| + c) per sample (Lu & Song, 2024, Sec. 4.2: tangent normalization), a bounded target step."""
    norm = g.flatten(1).norm(dim=1)
    return g / append_dims(norm + c, g.ndim)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """r = min(1, step / warmup_steps): the second tangent term fades in over the first steps (Sec. 4.2)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def adaptive_weighted_loss(F_theta: Tensor, target: Tensor, logvar: Tensor, weight: Tensor) -> Tensor:
    """(w / e^logvar) ||F_theta - target||^2 + logvar per sample, with a learned logvar(t) (sCM Sec. 4.2, after
    EDM2's uncertainty weighting); at its optimum e^logvar = w * mse, balancing the loss across times.

    target is sg(F^- + g); ||.||^2 is the per-sample mean square.
    """
    mse = mean_per_sample((F_theta.float() - target.float()) ** 2)
    return weight * mse / torch.exp(logvar) + logvar


def trigflow_weight(t: Tensor, sigma_data: float) -> Tensor:
    """w(t) = 1 / (sigma_d tan t) (SANA-Sprint's sCM weighting)."""
    return 1.0 / (sigma_data * torch.tan(t).clamp_min(1e-6))


def log_normal_density(t: Tensor, p_mean: float, p_std: float, sigma_data: float, p_sigma_data: float) -> Tensor:
    """Density of ``trigflow_time_proposal`` in t (for importance weights): change of variables from log sigma."""
    log_ratio = torch.log(p_sigma_data * sigma_data * torch.tan(t))
    d_log_ratio_dt = 1.0 / (torch.sin(t) * torch.cos(t))
    gauss = torch.exp(-0.5 * ((log_ratio - p_mean) / p_std) ** 2) / (p_std * math.sqrt(2 * math.pi))
    return gauss * d_log_ratio_dt
