"""Sampling on a Denoiser against exact solutions and against the digits pipeline's own scheduler loop."""

from __future__ import annotations

import pytest
import torch

from fewstep.sampling import (
    SamplingPlan,
    euler_sample,
    euler_times,
    initial_noise,
    plan_state,
    plan_states,
    renoise,
    sample_plan,
)
from fewstep.schedules import VP, Flow, TrigFlow, append_dims
from fewstep.teacher import Denoiser
from fewstep.worlds.digits.pipeline import DigitsPipeline
from fewstep.worlds.digits.train import make_teacher_model, teacher_scheduler


def point_mass(x_star: torch.Tensor):
    return lambda x_t, t: x_star.expand_as(x_t)


@pytest.mark.parametrize("schedule", [Flow(), TrigFlow(), VP()])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_plan_recovers_point_mass(schedule, gamma: float) -> None:
    x_star = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    t_max = schedule.t_max
    plan = SamplingPlan(schedule, (t_max, 0.6 * t_max, 0.2 * t_max), gamma=gamma)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    out = sample_plan(point_mass(x_star), plan, noise, generator=gen)
    torch.testing.assert_close(out, x_star.expand_as(out))


def test_renoise_limits() -> None:
    s = Flow()
    x0, x_t, z = torch.randn(3, 2, dtype=torch.float64).unbind()
    c_t, c_n = s.coeffs(torch.tensor(0.8, dtype=torch.float64)), s.coeffs(torch.tensor(0.3, dtype=torch.float64))
    eps_hat = (x_t - c_t.alpha * x0) / c_t.sigma
    torch.testing.assert_close(renoise(x0, x_t, c_t, c_n, 0.0, None), c_n.alpha * x0 + c_n.sigma * eps_hat)
    torch.testing.assert_close(renoise(x0, x_t, c_t, c_n, 1.0, z), c_n.alpha * x0 + c_n.sigma * z)
    mixed = renoise(x0, x_t, c_t, c_n, 0.4, z)  # unit-variance mix of eps_hat and z
    torch.testing.assert_close(mixed, c_n.alpha * x0 + c_n.sigma * (0.6 * eps_hat + (1 - 0.36) ** 0.5 * z))


def test_plan_rejects_bad_times() -> None:
    with pytest.raises(ValueError):
        SamplingPlan(Flow(), (0.5, 0.7))
    with pytest.raises(ValueError):
        SamplingPlan(Flow(), ())


@pytest.mark.parametrize("steps", [1, 2, 4])
@torch.no_grad()
def test_euler_on_denoiser_equals_pipeline(steps: int) -> None:
    """The Denoiser path (float t, x0 conversion, Euler) reproduces the digits pipeline's scheduler loop."""
    torch.manual_seed(0)
    model = make_teacher_model()
    for p in model.parameters():  # ada_norm_zero starts at zero output: perturb so the test means something
        p.add_(0.02 * torch.randn_like(p))
    pipe = DigitsPipeline(transformer=model.eval(), scheduler=teacher_scheduler())
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([0, 3, 5, 9])
    images = pipe(class_labels=labels, num_inference_steps=steps, latents=noise).images
    denoiser = Denoiser.from_pipeline(pipe)
    x = euler_sample(
        lambda x_t, t: denoiser(x_t, t, {"class_labels": labels}),
        denoiser.schedule,
        noise,
        euler_times(denoiser.schedule, steps),
    )
    torch.testing.assert_close((x.clamp(-1, 1) + 1) / 2, images, rtol=1e-5, atol=1e-5)


def test_euler_converges_to_exact_flow_map() -> None:
    """For data N(m, v) the probability-flow ODE maps noise eps to m + sqrt(v) eps exactly; Euler is first order."""
    m, v = 0.5, 0.25
    s = Flow()

    def exact(x_t, t):
        c = s.coeffs(append_dims(t, x_t.ndim))
        return m + c.alpha * v / (c.alpha**2 * v + c.sigma**2) * (x_t - c.alpha * m)

    noise = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = m + v**0.5 * noise
    errs = [float((euler_sample(exact, s, noise, euler_times(s, n)) - target).abs().max()) for n in (8, 16, 32)]
    assert 1.6 < errs[0] / errs[1] < 2.5 and 1.6 < errs[1] / errs[2] < 2.5  # halves with each doubling


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_plan_in_another_schedule_gives_the_same_x0(gamma: float) -> None:
    """A TrigFlow plan and its equal-SNR image on Flow, each with the exact Gaussian denoiser of its schedule and the
    same noise, end on the same sample."""
    from fewstep.sampling import plan_in

    m, v = 0.2, 0.3

    def exact(schedule):
        def denoise(x_t, t):
            c = schedule.coeffs(append_dims(t, x_t.ndim))
            return m + c.alpha * v / (c.alpha**2 * v + c.sigma**2) * (x_t - c.alpha * m)

        return denoise

    trig = TrigFlow(sigma_data=0.5)
    plan = SamplingPlan(trig, (1.5, 1.1, 0.4), gamma=gamma)
    flow_plan = plan_in(plan, Flow())
    noise = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = sample_plan(exact(trig), plan, noise, generator=torch.Generator().manual_seed(1))
    b = sample_plan(exact(Flow()), flow_plan, noise, generator=torch.Generator().manual_seed(1))
    # both starts are prior_std(t0) * noise, which differ exactly by the change-of-variables scale
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_rule_plan_samples_as_tcd_scheduler_does(gamma: float) -> None:
    """A plan at TCDScheduler's timesteps under TCD's rule is TCDScheduler's sampler (Zheng et al. 2024, Alg. 4):
    same x0 model, same noise stream, same end, its last step's DDIM to timestep 0 included; fewstep's ratio rule at
    the same gamma ends elsewhere once gamma is strictly between 0 and 1 (the rules differ there only)."""
    import diffusers

    from fewstep.export.pipeline import _RandomModel

    schedule, shape = VP(), (2, 1, 3, 3)
    model = _RandomModel(shape)  # an epsilon predictor
    tcd = diffusers.TCDScheduler()
    tcd.set_timesteps(4)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = schedule.coeffs(append_dims(t.double(), x.ndim))
        return ((x.double() - c.sigma * model(x, t).double()) / c.alpha).to(x.dtype)

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x, gen = noise.clone(), torch.Generator().manual_seed(0)
    for t in tcd.timesteps:
        x = tcd.step(model(x, t), t, x, eta=gamma, generator=gen, return_dict=False)[0]
    plan = SamplingPlan(schedule, tuple(float(t) for t in tcd.timesteps), gamma, "tcd")
    ours = sample_plan(denoise, plan, noise, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)  # float32 state, as the pipeline holds it
    ratio = sample_plan(denoise, SamplingPlan(schedule, plan.times, gamma), noise, torch.Generator().manual_seed(0))
    assert (ratio - x).abs().max() > 1e-3 if 0 < gamma < 1 else True
    with pytest.raises(ValueError, match="VP"):
        SamplingPlan(Flow(), (1.0, 0.5), gamma, "tcd")


def test_plan_states_of_several_plans_are_each_plans_own_state_with_one_call_per_step() -> None:
    """``plan_states``: plans of 1, 2, 4 and 8 steps (gammas 1, 0.3, 0.5, 0, on rows of their own) run together give
    each plan's ``plan_state`` with the same noise and generator, in 7 network calls (the longest plan's) instead of
    11. The denoiser is a point mass's exact x0 blended with the state, so every step depends on the one before."""
    schedule = VP()
    point = torch.tensor([0.5, -1.0, 2.0])

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = append_dims(t / schedule.t_max, x.ndim)
        return (1 - w) * point + w * torch.tanh(x)

    calls: list[list[int]] = []

    def denoise_parts(xs: list[torch.Tensor], times: list[float], which: list[int]) -> list[torch.Tensor]:
        calls.append(list(which))
        t = torch.cat([torch.full((len(x),), tj) for x, tj in zip(xs, times, strict=True)])
        return list(denoise(torch.cat(xs), t).split([len(x) for x in xs]))

    plans = [
        SamplingPlan(schedule, tuple(euler_times(schedule, n)[:-1]), gamma)
        for n, gamma in zip((1, 2, 4, 8), (1.0, 0.3, 0.5, 0.0), strict=True)
    ]
    noises = [torch.randn(n, 3, generator=torch.Generator().manual_seed(n)) for n in (2, 3, 1, 2)]
    ks = [p.steps - 1 for p in plans]
    states = plan_states(denoise_parts, plans, noises, ks, [torch.Generator().manual_seed(10 + j) for j in range(4)])
    assert calls == [[1, 2, 3], [2, 3], [2, 3], [3], [3], [3], [3]]
    for j, (plan, noise, k) in enumerate(zip(plans, noises, ks, strict=True)):
        expected = plan_state(denoise, plan, noise, k, torch.Generator().manual_seed(10 + j))
        torch.testing.assert_close(states[j], expected, rtol=0, atol=0)
    assert not torch.equal(states[3], initial_noise(schedule, schedule.t_max, noises[3]))
    with pytest.raises(ValueError, match="outside the 2-step plan"):
        plan_states(denoise_parts, plans[:2], noises[:2], [0, 2])
