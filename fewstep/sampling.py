"""Sampling on a Denoiser: the teacher's probability-flow ODE (Euler) and few-step plans (predict x0, re-noise).

One ``SamplingPlan`` drives training rollouts, ``fewstep sample`` / bench (through ``FewStepScheduler``, which
applies the same ``renoise`` rule) and export.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from . import batch_random
from .schedules import VP, Coeffs, Flow, NoiseSchedule, append_dims, ddim_step, forward_transition, velocity

# how a plan's gamma picks the intermediate time s of a re-noising step: "ratio", by its noise-to-signal ratio
# (``renoise``, the same on every schedule); "tcd", TCDScheduler's own rule on a VP schedule's DDPM timesteps
# (``tcd_intermediate``), so that a plan exports as stock TCDScheduler run with ``eta`` = gamma
RULES = ("ratio", "tcd")


def tcd_intermediate(schedule: NoiseSchedule, t_next: float, gamma: float) -> float:
    """TCD's intermediate timestep s = floor((1 - gamma) t_next) (Zheng et al. 2024, Sec. 4.3), computed as
    TCDScheduler.step computes it (a float32 product with the integer timestep, then floor), so that s matches it
    exactly. Only a VP schedule's time is a DDPM timestep."""
    if not isinstance(schedule, VP):
        raise ValueError(f"TCD's re-noise rule needs a VP schedule's DDPM timesteps, not {type(schedule).__name__}")
    return float(torch.floor((1 - gamma) * torch.tensor(round(t_next))))


def renoise(
    x0: Tensor, x_t: Tensor, c_t: Coeffs, c_next: Coeffs, gamma: float, noise: Tensor | None, c_s: Coeffs | None = None
) -> Tensor:
    """x at the next (lower-noise) time from an x0 estimate at t, with stochasticity gamma in [0, 1].

    x_next = alpha_next x0 + sigma_next ((1 - gamma) eps_hat + sqrt(1 - (1 - gamma)^2) z), eps_hat implied by x_t.
    gamma = 0 is DDIM (Song et al., 2021, Eq. 12, eta = 0); gamma = 1 is consistency-model multistep sampling (Song et
    al., 2023, Alg. 1); in between it is TCD's DDIM-to-s then forward-to-next (Zheng et al., 2024, Sec. 4.3) with s
    defined by its noise-to-signal ratio sigma_s / alpha_s = (1 - gamma) sigma_next / alpha_next, so that gamma means
    the same on every schedule. ``c_s`` given: s is that point instead (TCD's own rule, ``tcd_intermediate``).
    ``noise`` may be None only for gamma = 0.
    """
    if gamma == 0.0:
        return ddim_step(x0, x_t, c_t, c_next)
    if noise is None:
        raise ValueError("renoise with gamma > 0 needs noise")
    if c_s is None:
        # Both steps are invariant to rescaling x_s, so write s in the frame alpha_s = 1 (exists even for gamma = 1).
        r_s = (1.0 - gamma) * c_next.sigma / c_next.alpha
        one = torch.ones_like(r_s)
        c_s = Coeffs(alpha=one, sigma=r_s, d_alpha=torch.zeros_like(r_s), d_sigma=one)
    return forward_transition(ddim_step(x0, x_t, c_t, c_s), c_s, c_next, noise)


def guidance_at(guidance: float | Tensor, t: float | Tensor, interval: tuple[float, float] | None) -> float | Tensor:
    """The classifier-free guidance scale at noise level ``t`` when guidance applies only on ``interval`` = (lo, hi]
    of the teacher's native time: ``guidance`` inside, 1 (the conditional model alone) outside; everywhere when
    ``interval`` is None. Kynkaanniemi et al. (2024), "Applying guidance in a limited interval improves sample and
    distribution quality in diffusion models": at high noise guidance costs variety, at low noise it does little.

    t: a float or a (B,) tensor; returns ``guidance`` unchanged without an interval, else a tensor shaped like t.
    """
    if interval is None:
        return guidance
    lo, hi = interval
    t = torch.as_tensor(t)
    w = torch.as_tensor(guidance, dtype=torch.float32, device=t.device).expand(t.shape)
    return torch.where((t > lo) & (t <= hi), w, torch.ones_like(w))


@dataclass(frozen=True)
class SamplingPlan:
    """Where a few-step student is evaluated: descending ``times`` in ``schedule``'s units, the re-noise gamma and
    its ``rule`` (``RULES``). Under "tcd" the last step also ends as TCDScheduler's does: x0 carried by DDIM to t_min
    (x at timestep 0, where a VP schedule's sigma is not 0), not x0 itself."""

    schedule: NoiseSchedule
    times: tuple[float, ...]
    gamma: float = 1.0
    rule: str = "ratio"

    def __post_init__(self) -> None:
        if not self.times or any(a <= b for a, b in pairwise(self.times)):
            raise ValueError(f"plan times must be non-empty and strictly decreasing, got {self.times}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.rule == "tcd" and not isinstance(self.schedule, VP):
            raise ValueError(f"the tcd rule needs a VP schedule, not {type(self.schedule).__name__}")

    @property
    def steps(self) -> int:
        return len(self.times)


def plan_in(plan: SamplingPlan, schedule: NoiseSchedule) -> SamplingPlan:
    """The same plan on another schedule: each time mapped to the time of equal SNR. x0 estimates and the re-noise
    rule (defined through noise-to-signal ratios) are unchanged, so sampling gives the same x0 on either schedule."""
    if plan.schedule == schedule:
        return plan
    if plan.rule == "tcd":
        raise ValueError("a plan under TCD's rule lives on its VP schedule's DDPM timesteps and cannot move")
    # a time at or past pure noise (SCMScheduler's 1.5708 > pi/2) reads as pure noise
    times_in = torch.tensor(plan.times, dtype=torch.float64).clamp_max(plan.schedule.t_max)
    ratio = plan.schedule.ratio(times_in)
    times = schedule.time_at_ratio(ratio.clamp_max(1e30))  # pure noise (infinite ratio) maps to t_max
    times = times.clamp(schedule.t_min, schedule.t_max)
    times = torch.where((times - schedule.t_max).abs() < 1e-9, torch.full_like(times, schedule.t_max), times)
    return SamplingPlan(schedule, tuple(float(t) for t in times), plan.gamma)


Denoise = Callable[[Tensor, Tensor], Tensor]  # (x_t, t (B,)) -> x0


def initial_noise(schedule: NoiseSchedule, t_max: float, noise: Tensor) -> Tensor:
    """x at the first time: pure noise at the prior's scale (alpha(t_max) x0 is neglected, as pipelines do)."""
    return schedule.prior_std(torch.tensor(t_max, dtype=noise.dtype)) * noise


def sample_plan(
    denoise: Denoise, plan: SamplingPlan, noise: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Run ``plan`` from pure noise (B, ...) and return the final x0 estimate (under TCD's rule, that x0 carried by
    DDIM to t_min, as TCDScheduler's last step returns it)."""
    x = plan_state(denoise, plan, noise, plan.steps - 1, generator)
    t_b = torch.full((x.shape[0],), plan.times[-1], dtype=x.dtype, device=x.device)
    x0 = denoise(x, t_b)
    if plan.rule != "tcd":
        return x0
    c_t = plan.schedule.coeffs(append_dims(t_b, x.ndim))
    return ddim_step(x0, x, c_t, plan.schedule.coeffs(append_dims(torch.full_like(t_b, plan.schedule.t_min), x.ndim)))


def plan_state(
    denoise: Denoise, plan: SamplingPlan, noise: Tensor, k: int, generator: torch.Generator | None = None
) -> Tensor:
    """x at ``plan.times[k]`` after the first k steps of ``plan`` from pure noise: the student's own intermediate
    input, as backward simulation feeds it (DMD2, Yin et al. 2024, Sec. 4.5); k = 0 is the initial noise."""
    if not 0 <= k < plan.steps:
        raise ValueError(f"step index {k} outside the {plan.steps}-step plan")
    x = initial_noise(plan.schedule, plan.times[0], noise)
    return advance(denoise, plan.schedule, x, plan.times[: k + 1], plan.gamma, generator, plan.rule)


def advance(
    denoise: Denoise,
    schedule: NoiseSchedule,
    x: Tensor,
    times: Sequence[float],
    gamma: float,
    generator: torch.Generator | None = None,
    rule: str = "ratio",
) -> Tensor:
    """x carried from ``times[0]`` to ``times[-1]`` through each time in between: predict x0, then ``renoise`` to the
    next time (a plan's steps, or part of them from any state) under ``rule`` (``RULES``)."""
    for t, t_next in pairwise(times):
        x0 = denoise(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
        x = step_to(schedule, x0, x, t, t_next, gamma, generator, rule)
    return x


def step_to(
    schedule: NoiseSchedule,
    x0: Tensor,
    x: Tensor,
    t: float,
    t_next: float,
    gamma: float,
    generator: torch.Generator | None = None,
    rule: str = "ratio",
) -> Tensor:
    """One step of ``advance``: x at ``t`` with its x0 estimate carried to ``t_next`` by ``renoise`` under ``rule``."""
    t_b = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    c_t = schedule.coeffs(append_dims(t_b, x.ndim))
    c_next = schedule.coeffs(append_dims(torch.full_like(t_b, t_next), x.ndim))
    c_s = None
    if rule == "tcd":
        s = tcd_intermediate(schedule, t_next, gamma)
        c_s = schedule.coeffs(append_dims(torch.full_like(t_b, s), x.ndim))
    z = None if gamma == 0 else _noise(x, generator)
    return renoise(x0, x, c_t, c_next, gamma, z, c_s)


# (states, their times, the indices of their plans) -> x0 estimates: one network call for the states of several plans
DenoiseParts = Callable[[Sequence[Tensor], Sequence[float], Sequence[int]], list[Tensor]]


def plan_states(
    denoise: DenoiseParts,
    plans: Sequence[SamplingPlan],
    noises: Sequence[Tensor],
    ks: Sequence[int],
    generators: Sequence[torch.Generator | None] | None = None,
) -> list[Tensor]:
    """``plan_state`` of several plans at once, each on its own rows (``noises[j]``, to its step ``ks[j]``): at step i
    one ``denoise`` call holds the states of every plan still running, so m plans of up to K steps take K network
    calls rather than the sum of their steps (backward simulation of several samplers, as Hyper-SD's score
    distillation stage draws them). Each plan's re-noising draws its own rows' noise (from ``generators[j]`` where
    given), so plan j's state is ``plan_state(denoise_j, plans[j], noises[j], ks[j], generators[j])``."""
    if not len(plans) == len(noises) == len(ks):
        raise ValueError(f"one noise and one step index per plan, got {len(plans)} plans, {len(noises)}, {len(ks)}")
    for plan, k in zip(plans, ks, strict=True):
        if not 0 <= k < plan.steps:
            raise ValueError(f"step index {k} outside the {plan.steps}-step plan")
    gens = list(generators) if generators is not None else [None] * len(plans)
    xs = [initial_noise(p.schedule, p.times[0], z) for p, z in zip(plans, noises, strict=True)]
    for i in range(max(ks, default=0)):
        running = [j for j, k in enumerate(ks) if i < k]
        x0s = denoise([xs[j] for j in running], [plans[j].times[i] for j in running], running)
        for j, x0 in zip(running, x0s, strict=True):
            p = plans[j]
            xs[j] = step_to(p.schedule, x0, xs[j], p.times[i], p.times[i + 1], p.gamma, gens[j], p.rule)
    return xs


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, 1) like x: from ``generator`` (on the CPU), else a per-sample draw of the training batch (batch_random)."""
    if generator is None:
        return batch_random.randn(x.shape, dtype=x.dtype).to(x.device)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def euler_times(
    schedule: NoiseSchedule, steps: int, t_min: float | None = None, t_max: float | None = None
) -> list[float]:
    """steps + 1 times evenly spaced from t_max down to t_min (default: the schedule's ends). For ``Flow`` the grid
    u in [0, 1] is warped by ``shift_time`` first, as FlowMatchEulerDiscreteScheduler shifts its sigmas."""
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return grid_time(schedule, u, t_min, t_max).tolist()


def grid_time(schedule: NoiseSchedule, u: Any, t_min: float | None = None, t_max: float | None = None) -> Any:
    """The time at the fraction u in [0, 1] of the scheduler's unshifted grid: t_min + (t_max - t_min) u, with u first
    warped by ``shift_time`` for ``Flow`` (SD3, Eq. 23), as FlowMatchEulerDiscreteScheduler shifts its sigmas. u is a
    float or a tensor; shift 1 is the identity."""
    lo = schedule.t_min if t_min is None else t_min
    hi = schedule.t_max if t_max is None else t_max
    if isinstance(schedule, Flow):
        u = schedule.shift_time(u)
    return lo + (hi - lo) * u


def euler_sample(
    denoise: Denoise, schedule: NoiseSchedule, noise: Tensor, times: Sequence[float], return_trajectory: bool = False
) -> Tensor | list[Tensor]:
    """The probability-flow ODE dx/dt = alpha' x0 + sigma' eps_hat integrated by Euler over ``times`` (descending);
    Returns x at the end, or every x along the way (len(times) tensors)."""
    x = initial_noise(schedule, times[0], noise)
    path = [x]
    for t, t_next in pairwise(times):
        t_b = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        c_t = schedule.coeffs(append_dims(t_b, x.ndim))
        x = x + (t_next - t) * velocity(denoise(x, t_b), x, c_t)  # for flow, the step onto t = 0 is x0 exactly
        path.append(x)
    return path if return_trajectory else x
