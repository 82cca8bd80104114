"""Export picks a stock diffusers scheduler only when it reproduces the plan exactly."""

from __future__ import annotations

import diffusers
import pytest
import torch

from fewstep.export.pipeline import _RandomModel, reproduces, run_loop, scheduler_for_plan
from fewstep.export.scheduling_fewstep import FewStepScheduler
from fewstep.sampling import SamplingPlan, euler_times
from fewstep.schedules import VP, Flow, TrigFlow


def stock_flow_times(n: int) -> tuple[float, ...]:
    s = diffusers.FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(n)
    return tuple(float(v) for v in s.sigmas[:-1])


def test_flow_euler_plan_on_stock_grid_exports_stock_scheduler() -> None:
    plans = {n: SamplingPlan(Flow(), stock_flow_times(n), gamma=0.0) for n in (1, 2, 4)}
    assert type(scheduler_for_plan(plans, "flow")).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_even_flow_grid_needs_fewstep_scheduler() -> None:
    """FlowMatchEuler's own 2-step grid ends 1/1000 -> 0, so an even 2-step plan is not stock."""
    plans = {n: SamplingPlan(Flow(), tuple(euler_times(Flow(), n)[:-1]), gamma=0.0) for n in (1, 2)}
    chosen = scheduler_for_plan(plans, "flow")
    assert isinstance(chosen, FewStepScheduler) and chosen.config["plan"]["2"] == [1.0, 0.5]


def test_trigflow_plans_export_fewstep_scheduler() -> None:
    """SCMScheduler's timesteps end with 0 and need SanaSprintPipeline's own loop: the plain loop rejects it."""
    plan = {2: SamplingPlan(TrigFlow(sigma_data=1.0), (1.5708, 1.3), gamma=1.0)}
    assert isinstance(scheduler_for_plan(plan, "trigflow"), FewStepScheduler)
    assert not reproduces(diffusers.SCMScheduler(sigma_data=1.0), scheduler_for_plan(plan, "trigflow"), [2])


def test_vp_ddim_plan_on_trailing_grid() -> None:
    vp = VP()
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")  # fmt: skip
    plans = {}
    for n in (1, 2, 4):
        ddim.set_timesteps(n)
        plans[n] = SamplingPlan(vp, tuple(float(t) for t in ddim.timesteps), gamma=0.0)
    assert type(scheduler_for_plan(plans, "epsilon")).__name__ == "DDIMScheduler"


def test_reproduces_detects_a_small_difference() -> None:
    a = FewStepScheduler(schedule=Flow().config(), plan={"2": [1.0, 0.5]}, gamma=0.0)
    b = FewStepScheduler(schedule=Flow().config(), plan={"2": [1.0, 0.501]}, gamma=0.0)
    assert reproduces(a, a, [2]) and not reproduces(a, b, [2])


def test_random_model_depends_on_time() -> None:
    model, x = _RandomModel((1, 1, 3, 3)), torch.randn(1, 1, 3, 3, dtype=torch.float64)
    assert not torch.allclose(model(x, torch.tensor(100.0)), model(x, torch.tensor(900.0)))
    s = FewStepScheduler(schedule=Flow().config(), gamma=1.0)
    noise = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(run_loop(s, 2, model, noise, seed=0), run_loop(s, 2, model, noise, seed=1))


def test_vp_consistency_plan_on_lcm_grid_is_lcm() -> None:
    """On LCMScheduler's own grid its boundary scalings are negligible (c_skip ~ 1e-8 at t >= 499), so it
    reproduces a plain x0 consistency plan; off its grid it does not."""
    on_grid = {2: SamplingPlan(VP(), (999.0, 499.0), gamma=1.0)}
    assert type(scheduler_for_plan(on_grid, "epsilon")).__name__ == "LCMScheduler"
    off_grid = {2: SamplingPlan(VP(), (999.0, 600.0), gamma=1.0)}
    assert isinstance(scheduler_for_plan(off_grid, "epsilon"), FewStepScheduler)


def test_export_pipeline_round_trip(tmp_path) -> None:
    """A student folder (here the teacher's weights with an even 2-step Euler plan) reloads with the stock loader and
    samples exactly as the in-memory pipeline does."""
    from diffusers import DiffusionPipeline

    from fewstep.export.pipeline import export_pipeline
    from fewstep.loading import load_pipeline

    teacher = load_pipeline("digits")
    plans = {n: SamplingPlan(Flow(), tuple(euler_times(Flow(), n)[:-1]), gamma=0.0) for n in (1, 2)}
    scheduler = scheduler_for_plan(plans, "flow")
    out = export_pipeline(teacher, teacher.transformer, scheduler, tmp_path / "student")
    student = DiffusionPipeline.from_pretrained(out)
    student.set_progress_bar_config(disable=True)
    assert type(student.scheduler).__name__ == "FewStepScheduler" and student.scheduler.config["gamma"] == 0.0
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for n in (1, 2):
        a = teacher(class_labels=[0, 1, 2, 3], num_inference_steps=n, latents=noise).images
        b = student(class_labels=[0, 1, 2, 3], num_inference_steps=n, latents=noise).images
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # even-grid Euler either way


def test_exported_folder_loads_in_a_fresh_process(tmp_path) -> None:
    """diffusers imports component libraries only when they are already imported; load_pipeline sees to that."""
    import os
    import subprocess
    import sys

    from fewstep.export.pipeline import export_pipeline
    from fewstep.loading import load_pipeline

    teacher = load_pipeline("digits")
    plans = {1: SamplingPlan(Flow(), (1.0,), gamma=1.0)}
    out = export_pipeline(teacher, teacher.transformer, scheduler_for_plan(plans, "flow"), tmp_path / "s")
    code = f"from fewstep.loading import load_pipeline; print(type(load_pipeline({str(out)!r}).scheduler).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.strip() == "FewStepScheduler"
