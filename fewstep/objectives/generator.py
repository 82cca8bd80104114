"""The few-step generator the distribution-matching recipes train (SiD, TDM, Phased DMD): a copy of the teacher (or a
LoRA on it) that predicts x0 in the teacher's own time and is sampled by a plan (predict x0, re-noise).

Training draws the generator's output the way its sampler makes it (backward simulation, DMD2 Sec. 4.5): k steps of
an n-step plan without gradient, then the k-th x0 with gradient. k uniform over the plan's steps is SiD's uniform
mixture over the generation steps (Zhou et al. 2025); TDM trains every segment the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..sampling import Denoise, SamplingPlan, euler_times, plan_state
from ..schedules import NoiseSchedule
from ..teacher import Denoiser


def uniform_plans(schedule: NoiseSchedule, steps: Sequence[int], gamma: float) -> dict[int, SamplingPlan]:
    """n-step plans at the teacher's n-step Euler times without the final t_min (1, 0.75, 0.5, 0.25 for 4 steps on
    an unshifted flow; 999, 749.25, ... on a DDPM grid). TDM's demo uses another grid (``TDM.plan`` says how)."""
    return {n: SamplingPlan(schedule, tuple(euler_times(schedule, n)[:-1]), gamma) for n in steps}


def generator_plans(teacher: Denoiser, steps: Sequence[int], gamma: float, plan_times: str) -> dict[int, SamplingPlan]:
    """The generator's plans: its pipeline's stock times (``export.stock.plans_for``), or with ``plan_times`` =
    "recipe" the uniform plans above (which, on a pipeline that spaces its own flow sigmas, only FewStepScheduler
    carries)."""
    from ..export.stock import plans_for

    return plans_for(teacher, steps, gamma, plan_times, lambda n: euler_times(teacher.native, n)[:-1])


def weights_problem(weights: Sequence[float], n: int) -> str | None:
    """Why ``weights`` cannot weight a draw among n choices (a phrase to follow their name), or None."""
    if len(weights) != n:
        return f"must hold {n} weights, got {len(weights)}"
    if min(weights) < 0 or sum(weights) <= 0:
        return "must be non-negative with a positive sum"
    return None


def draw_index(n: int, weights: Sequence[float] | None = None) -> int:
    """An index in 0..n-1: uniform (``torch.randint``, the recipes' reference draw) or, given ``weights``, in
    proportion to them (``torch.multinomial``). Both read torch's global generator, which every process seeds alike."""
    if weights is None:
        return int(torch.randint(n, ()))
    if problem := weights_problem(weights, n):
        raise ValueError(f"draw weights {list(weights)} {problem}")
    return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1))


def student_network(teacher: nn.Module, lora_rank: int = 0) -> nn.Module:
    """The generator's network, initialized from the teacher's: a trainable full copy in eval mode (no dropout, no
    DiT label dropping), or (``lora_rank`` > 0) a frozen copy with a fresh LoRA adapter."""
    model = copy.deepcopy(teacher)
    if lora_rank > 0:
        from ..training.lora import add_lora

        model = add_lora(model, lora_rank)
    else:
        model.requires_grad_(True)
    return model.eval()


class FewStepGenerator:
    """A Denoiser of the teacher's kind around a trainable network, with its sampling plans."""

    def __init__(self, teacher: Denoiser, model: nn.Module, plans: dict[int, SamplingPlan]):
        self.model = model
        self.denoiser = teacher.with_model(model)
        self.plans = plans

    def bind(self, cond: dict[str, Any]) -> Denoise:
        return lambda x, t: self.denoiser(x, t, cond)

    def draw(
        self, n_choices: Sequence[int] | None = None, step_weights: Sequence[float] | None = None
    ) -> tuple[SamplingPlan, int]:
        """A plan (n uniform over ``n_choices``, default every plan) and a step k uniform over its n steps, or in
        proportion to ``step_weights`` (one per step of the drawn plan)."""
        choices = list(n_choices or self.plans)
        plan = self.plans[choices[draw_index(len(choices))]]
        return plan, draw_index(plan.steps, step_weights)

    def simulate(self, cond: dict[str, Any], noise: Tensor, plan: SamplingPlan, k: int) -> tuple[Tensor, Tensor]:
        """(x_{t_k}, t_k): the generator's own input at the plan's k-th time, run without gradient from ``noise``."""
        with torch.no_grad():
            x = plan_state(self.bind(cond), plan, noise, k)
        return x, torch.full((x.shape[0],), plan.times[k], dtype=x.dtype, device=x.device)

    def sample(self, cond: dict[str, Any], noise: Tensor, plan: SamplingPlan, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(x_{t_k}, t_k, x0_G): backward simulation to the k-th time, then the generator's x0 there (with gradient
        where the caller records one)."""
        x, t = self.simulate(cond, noise, plan, k)
        return x, t, self.denoiser(x, t, cond)
