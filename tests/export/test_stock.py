"""The stock samplers of a teacher pipeline (export/stock.py): the times they visit are the stock scheduler's own, set
as each pipeline's loop sets them, and the recipes' default plans are those times."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.export.pipeline import scheduler_for_plan
from fewstep.export.stock import StockPlans, plans_for, shifted_betas
from fewstep.sampling import SamplingPlan, euler_times, plan_in
from fewstep.schedules import VP, Flow, TrigFlow
from fewstep.teacher import Denoiser

FLOW_MATCH = {"_class_name": "FlowMatchEulerDiscreteScheduler"}


def test_sd3_style_pipelines_visit_flow_match_eulers_own_sigmas() -> None:
    """SD3, Sana and Wan pass only n: the plan is whatever FlowMatchEulerDiscreteScheduler(shift) spaces itself,
    including its last sigma near 0 (the grid SD3.5 Large Turbo samples at)."""
    sampler = StockPlans("StableDiffusion3Pipeline", Flow(shift=3.0), "flow", FLOW_MATCH).sampler(1.0)
    assert sampler is not None and sampler.config["stochastic_sampling"]
    for n in (1, 2, 4):
        own = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        own.set_timesteps(n)
        assert sampler.times(n) == tuple(float(s) for s in own.sigmas[:n])
    assert sampler.times(2)[1] < 0.01


def test_flux_style_pipelines_visit_uniform_sigmas_through_the_shift() -> None:
    """FluxPipeline passes sigmas = linspace(1, 1/n, n) and the resolution's mu: with dynamic shifting at the training
    size the stock plan is the teacher's n-step Euler grid at that shift, i.e. the uniform plan on its schedule."""
    shift = math.exp(0.46)
    own = {**FLOW_MATCH, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    sampler = StockPlans("FluxPipeline", Flow(shift=shift), "flow", own).sampler(0.0)
    assert sampler is not None and sampler.mu == pytest.approx(0.46) and not sampler.config["stochastic_sampling"]
    for n in (1, 2, 3, 4):
        np.testing.assert_allclose(sampler.times(n), euler_times(Flow(shift=shift), n)[:-1], rtol=1e-6)


def test_vp_pipelines_get_lcm_for_fresh_noise_and_trailing_ddim_for_deterministic_plans() -> None:
    stock = StockPlans("StableDiffusionPipeline", VP(), "epsilon", {})
    lcm, ddim = stock.sampler(1.0), stock.sampler(0.0)
    assert lcm is not None and lcm.scheduler == "LCMScheduler" and lcm.times(4) == (999.0, 759.0, 499.0, 259.0)
    assert ddim is not None and ddim.scheduler == "DDIMScheduler" and ddim.times(4) == (999.0, 749.0, 499.0, 249.0)
    assert stock.sampler(0.5) is None  # under fewstep's own re-noise rule no stock VP scheduler takes gamma 0.5
    tcd = stock.sampler(0.5, "tcd")  # TCD's own rule: TCDScheduler, its gamma passed as eta at call time
    assert tcd is not None and tcd.scheduler == "TCDScheduler" and tcd.times(4) == (999.0, 759.0, 499.0, 259.0)


def test_cogvideox_snr_shift_is_folded_into_betas_the_stock_scheduler_reads() -> None:
    """LCMScheduler has no snr_shift_scale: betas of the shifted table, with its own zero-SNR rescale, give
    CogVideoX's alphas_cumprod."""
    vp = VP(snr_shift_scale=3.0, rescale_betas_zero_snr=True, beta_start=0.00085, beta_end=0.012)
    sampler = StockPlans("CogVideoXPipeline", vp, "v_prediction", {}).sampler(1.0)
    assert sampler is not None and "snr_shift_scale" not in sampler.config
    lcm = sampler.build()
    torch.testing.assert_close(lcm.alphas_cumprod.double(), vp.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert len(shifted_betas(vp)) == 1000 and lcm.alphas_cumprod[-1] == 0.0


def test_sana_sprint_gets_scm_with_its_pipelines_call_defaults() -> None:
    stock = StockPlans("SanaSprintPipeline", TrigFlow(sigma_data=0.5), "trigflow", {})
    sampler = stock.sampler(1.0)
    assert sampler is not None and sampler.scheduler == "SCMScheduler"
    assert sampler.times(1) == pytest.approx((1.5708,)) and sampler.times(2) == pytest.approx((1.5708, 1.3))
    assert sampler.times(4) == pytest.approx(tuple(1.5708 * (1 - i / 4) for i in range(4)))
    assert stock.sampler(0.0) is None  # SCMScheduler always re-noises with fresh noise


@pytest.mark.parametrize(
    ("pipeline", "native", "prediction", "gamma"),
    [
        ("StableDiffusion3Pipeline", Flow(shift=3.0), "flow", 1.0),
        ("FluxPipeline", Flow(shift=1.5), "flow", 0.0),
        ("StableDiffusionPipeline", VP(), "epsilon", 1.0),
        ("StableDiffusionPipeline", VP(), "v_prediction", 0.0),
        ("SanaSprintPipeline", TrigFlow(sigma_data=0.5), "trigflow", 1.0),
    ],
)
def test_plans_at_stock_times_export_the_stock_scheduler(
    pipeline: str, native: Any, prediction: str, gamma: float
) -> None:
    """The identity the export relies on: the stock scheduler, run as the pipeline runs it, ends where FewStepScheduler
    running the same plans ends (random model, same noise); a plan off its times exports FewStepScheduler."""
    stock = StockPlans(pipeline, native, prediction, FLOW_MATCH)
    sampler = stock.sampler(gamma)
    assert sampler is not None
    plans = {n: SamplingPlan(native, sampler.times(n), gamma) for n in (1, 2, 4)}
    assert type(scheduler_for_plan(plans, prediction, stock)).__name__ == sampler.scheduler
    moved = {**plans, 2: SamplingPlan(native, (plans[2].times[0], plans[2].times[1] * 0.9), gamma)}
    assert type(scheduler_for_plan(moved, prediction, stock)).__name__ == "FewStepScheduler"


@pytest.mark.parametrize(
    ("native", "prediction"), [(VP(), "epsilon"), (VP(rescale_betas_zero_snr=True), "v_prediction")]
)
def test_tcd_rule_plans_export_stock_tcd_scheduler_with_a_gamma_per_step_count(native: VP, prediction: str) -> None:
    """Plans at TCDScheduler's times under TCD's rule, each step count with its own gamma (Hyper-SD's card), end where
    TCDScheduler ends when each loop passes that gamma as eta; the same plans under fewstep's ratio rule do not (so
    the check tells the rules apart), nor do plans off its times."""
    stock = StockPlans("StableDiffusionPipeline", native, prediction, {})
    sampler = stock.sampler(0.3, "tcd")
    assert sampler is not None
    gammas = {1: 1.0, 2: 0.3, 4: 0.5, 8: 0.7}
    plans = {n: SamplingPlan(native, sampler.times(n), g, "tcd") for n, g in gammas.items()}
    assert type(scheduler_for_plan(plans, prediction, stock)).__name__ == "TCDScheduler"
    assert type(scheduler_for_plan(plans, prediction)).__name__ == "TCDScheduler"  # the candidates without a stock
    ratio = {n: dataclasses.replace(p, rule="ratio") for n, p in plans.items()}
    assert type(scheduler_for_plan(ratio, prediction, stock)).__name__ == "FewStepScheduler"
    moved = {**plans, 4: SamplingPlan(native, (*plans[4].times[:3], plans[4].times[3] - 20), 0.5, "tcd")}
    assert type(scheduler_for_plan(moved, prediction, stock)).__name__ == "FewStepScheduler"


def test_plans_for_follows_plan_times() -> None:
    teacher = Denoiser(torch.nn.Identity(), Flow(shift=3.0), "flow", backbone=object())  # type: ignore[arg-type]
    teacher.stock = StockPlans("StableDiffusion3Pipeline", teacher.native, "flow", FLOW_MATCH)
    uniform = lambda n: euler_times(teacher.native, n)[:-1]  # noqa: E731
    stock = plans_for(teacher, (1, 2), 1.0, "stock", uniform)
    own = plans_for(teacher, (1, 2), 1.0, "recipe", uniform)
    assert stock[2].times == teacher.stock.sampler(1.0).times(2) and own[2].times == (1.0, 0.75)
    teacher.stock = None  # a network without a pipeline: the recipe's own rule
    assert plans_for(teacher, (2,), 1.0, "stock", uniform)[2].times == (1.0, 0.75)
    with pytest.raises(FewstepError, match="plan_times"):
        plans_for(teacher, (2,), 1.0, "paper", uniform)


def test_a_time_past_pure_noise_maps_to_pure_noise() -> None:
    """SCMScheduler starts at 1.5708 > pi/2: on another schedule that is its pure-noise end, not a negative SNR."""
    plan = plan_in(SamplingPlan(TrigFlow(sigma_data=0.5), (1.5708, 1.3), 1.0), TrigFlow(sigma_data=1.0))
    assert plan.times[0] == pytest.approx(math.pi / 2) and 0 < plan.times[1] < math.pi / 2
