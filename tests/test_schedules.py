"""Tests of fewstep/schedules.py by identity: autograd and forward-mode derivatives, diffusers' own tables, round
trips, exact solutions of the probability-flow ODE of a point mass, the exact Gaussian denoiser under a change of
variables, and marginal preservation. No recorded numbers: every expected value is computed another way.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    SCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from fewstep.schedules import (
    EDM,
    PREDICTIONS,
    VP,
    Coeffs,
    Flow,
    NoiseSchedule,
    Reparam,
    TrigFlow,
    append_dims,
    change_of_variables,
    ddim_step,
    diffusers_schedule_config,
    forward_transition,
    from_x0,
    schedule_from_config,
    schedule_from_diffusers_config,
    to_x0,
    velocity,
)

F64 = torch.float64

# diffusers' defaults for each beta schedule (DDPM's for linear, Stable Diffusion's for scaled_linear)
BETAS = {
    "linear": {"beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {},
}
VPS = {name: VP(beta_schedule=name, **kw) for name, kw in BETAS.items()}  # built once: the cosine table is a loop
# zero terminal SNR (Lin et al., 2024): alpha(t_max) = 0; CogVideoX-2b's table also divides the SNR by 3 first
ZERO_SNR = {
    "vp-zero-snr": VP(rescale_betas_zero_snr=True),
    "vp-cogvideox": VP(rescale_betas_zero_snr=True, snr_shift_scale=3.0),
}

ALL = {
    **{f"vp-{name}": s for name, s in VPS.items()},
    **ZERO_SNR,
    "flow": Flow(),
    "edm": EDM(),
    "trigflow-0.5": TrigFlow(sigma_data=0.5),
    "trigflow-1.0": TrigFlow(sigma_data=1.0),
}
SCHEDULE_IDS = list(ALL)


def random_times(s: NoiseSchedule, n: int, seed: int, lo: float = 0.001, hi: float = 0.999) -> torch.Tensor:
    """n float64 times strictly inside the schedule's domain; for VP also inside the first and last intervals,
    where the Hermite tangents are one-sided, and never at an integer."""
    gen = torch.Generator().manual_seed(seed)
    u = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=F64)
    t = s.t_min + (s.t_max - s.t_min) * u
    if isinstance(s, VP):
        t = torch.cat([t, torch.tensor([0.25, 0.5, 1.37, s.t_max - 1.63, s.t_max - 0.5, s.t_max - 0.01], dtype=F64)])
    return t


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def broadcast(c: Coeffs, ndim: int) -> Coeffs:
    return Coeffs(*(append_dims(v, ndim) for v in c))


# ---------------------------------------------------------------------------------------------------------------
# 1. d_alpha and d_sigma are the derivatives of alpha and sigma


def elementwise_grad(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dy_i/dt_i for y computed elementwise from t (a y built without t, like EDM's alpha = 1, has derivative 0)."""
    if not y.requires_grad:
        return torch.zeros_like(t)
    return torch.autograd.grad(y.sum(), t, retain_graph=True)[0]


@pytest.mark.parametrize("name", SCHEDULE_IDS)
def test_coeff_derivatives_match_autograd(name):
    s = ALL[name]
    t = random_times(s, 64, seed=1).requires_grad_(True)
    c = s.coeffs(t)
    d_alpha, d_sigma = elementwise_grad(c.alpha, t), elementwise_grad(c.sigma, t)
    torch.testing.assert_close(c.d_alpha.detach(), d_alpha, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c.d_sigma.detach(), d_sigma, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULE_IDS)
def test_coeff_derivatives_match_forward_mode(name):
    s = ALL[name]
    t = random_times(s, 64, seed=2)
    (alpha, sigma), (alpha_dot, sigma_dot) = torch.func.jvp(
        lambda t: tuple(s.coeffs(t)[:2]), (t,), (torch.ones_like(t),)
    )
    c = s.coeffs(t)
    torch.testing.assert_close(alpha, c.alpha)
    torch.testing.assert_close(sigma, c.sigma)
    torch.testing.assert_close(c.d_alpha, alpha_dot, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c.d_sigma, sigma_dot, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULE_IDS)
def test_coeff_derivatives_match_finite_differences(name):
    """Guards against a consistent error in both the closed form and its autograd (e.g. a wrong interpolant slope)."""
    s = ALL[name]
    t, h = random_times(s, 32, seed=3, lo=0.01, hi=0.99), 1e-6 * (s.t_max - s.t_min)
    c, hi, lo = s.coeffs(t), s.coeffs(t + h), s.coeffs(t - h)
    torch.testing.assert_close(c.d_alpha, (hi.alpha - lo.alpha) / (2 * h), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(c.d_sigma, (hi.sigma - lo.sigma) / (2 * h), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("beta_schedule", list(BETAS))
def test_vp_interpolant_is_c1_at_the_knots(beta_schedule):
    """The Hermite pieces meet with equal value and slope at every interior integer timestep."""
    s = VPS[beta_schedule]
    k, delta = torch.arange(1, s.num_train_timesteps - 1, dtype=F64), 1e-9
    left, right = s.coeffs(k - delta), s.coeffs(k + delta)
    torch.testing.assert_close(left.alpha, right.alpha, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(left.d_alpha, right.d_alpha, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(left.d_sigma, right.d_sigma, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 2. VP reproduces diffusers' DDPM tables


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta_schedule", list(BETAS))
def test_vp_matches_diffusers_alphas_cumprod(beta_schedule, dtype):
    s = VPS[beta_schedule]
    ref = DDPMScheduler(beta_schedule=beta_schedule, **BETAS[beta_schedule]).alphas_cumprod.double()
    c = s.coeffs(torch.arange(s.num_train_timesteps, dtype=dtype))
    # diffusers builds its table in float32: 1 - ref carries an absolute rounding error of float32's eps near 1
    torch.testing.assert_close(c.alpha.double() ** 2, ref, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(c.sigma.double() ** 2, 1 - ref, rtol=1e-4, atol=2e-7)
    torch.testing.assert_close(s.alphas_cumprod, ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("beta_schedule", list(BETAS))
def test_vp_accepts_diffusers_integer_timesteps(beta_schedule):
    """diffusers' timesteps are int64 (``scheduler.timesteps``, ``torch.randint`` in training scripts); an integer
    t must give the same coefficients and noisy sample as the same t in floating point."""
    s = VPS[beta_schedule]
    scheduler = DDPMScheduler(beta_schedule=beta_schedule, **BETAS[beta_schedule])
    scheduler.set_timesteps(10)
    t = scheduler.timesteps
    assert t.dtype == torch.int64
    torch.testing.assert_close(
        s.coeffs(t).alpha.double() ** 2, scheduler.alphas_cumprod[t].double(), rtol=1e-4, atol=0
    )
    x0, eps = randn(len(t), 4, seed=35), randn(len(t), 4, seed=36)
    torch.testing.assert_close(s.add_noise(x0, eps, t), s.add_noise(x0, eps, t.double()))


@pytest.mark.parametrize("beta_schedule", list(BETAS))
def test_vp_ratio_strictly_increasing(beta_schedule):
    s = VPS[beta_schedule]
    t = torch.linspace(0, s.t_max, 32 * int(s.t_max) + 1, dtype=F64)  # 32 points per interval, knots included
    assert (s.ratio(t).diff() > 0).all()
    assert (s.coeffs(t).d_alpha < 0).all() and (s.coeffs(t).d_sigma > 0).all()


@pytest.mark.parametrize("name", SCHEDULE_IDS)
def test_time_at_ratio_inverts_ratio(name):
    s = ALL[name]
    t = random_times(s, 64, seed=4)
    torch.testing.assert_close(s.time_at_ratio(s.ratio(t)), t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULE_IDS)
def test_time_at_ratio_derivative_is_inverse_of_ratio_derivative(name):
    """Implicit function theorem: dt/dr = 1 / (d ratio/dt), in reverse and forward mode."""
    s = ALL[name]
    t = random_times(s, 32, seed=5, lo=0.01, hi=0.99)
    c = s.coeffs(t)
    d_ratio = (c.d_sigma * c.alpha - c.sigma * c.d_alpha) / c.alpha**2
    r = s.ratio(t).requires_grad_(True)
    (dt_dr,) = torch.autograd.grad(s.time_at_ratio(r).sum(), r)
    torch.testing.assert_close(dt_dr, 1 / d_ratio, rtol=1e-8, atol=1e-12)
    _, t_dot = torch.func.jvp(s.time_at_ratio, (r.detach(),), (torch.ones_like(r),))
    torch.testing.assert_close(t_dot, 1 / d_ratio, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULE_IDS)
def test_model_timestep_round_trip(name):
    s = ALL[name]
    t = random_times(s, 16, seed=37)
    torch.testing.assert_close(s.from_model_timestep(s.to_model_timestep(t)), t)


# ---------------------------------------------------------------------------------------------------------------
# 3. Prediction types


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", SCHEDULE_IDS)
def test_prediction_round_trips(name, prediction):
    s = ALL[name]
    t = random_times(s, 16, seed=6, lo=0.01, hi=0.99)
    x0, eps, out = randn(len(t), 3, 4, seed=7), randn(len(t), 3, 4, seed=8), randn(len(t), 3, 4, seed=9)
    x_t = s.add_noise(x0, eps, t)
    c = broadcast(s.coeffs(t), x0.ndim)
    torch.testing.assert_close(to_x0(from_x0(x0, x_t, c, prediction), x_t, c, prediction), x0)
    torch.testing.assert_close(from_x0(to_x0(out, x_t, c, prediction), x_t, c, prediction), out)


def expected_outputs(s: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, c: Coeffs) -> dict[str, torch.Tensor]:
    """What a perfect model of each prediction type outputs at x_t = alpha x0 + sigma eps, from its definition."""
    out = {"epsilon": eps, "sample": x0, "flow": c.d_alpha * x0 + c.d_sigma * eps}
    if isinstance(s, VP):
        out["v_prediction"] = c.alpha * eps - c.sigma * x0  # Salimans & Ho (2022), Eq. 6 with alpha^2 + sigma^2 = 1
    if isinstance(s, TrigFlow):  # sCM's target F = cos t eps - sin t x0 / sigma_d (Lu & Song, 2024, Eq. 6)
        t = torch.atan2(c.sigma / s.sigma_data, c.alpha)
        out["trigflow"] = t.cos() * eps - t.sin() * x0 / s.sigma_data
    return out


@pytest.mark.parametrize("name", SCHEDULE_IDS)
def test_prediction_types_match_definitions(name):
    s = ALL[name]
    t = random_times(s, 16, seed=10, lo=0.01, hi=0.99)
    x0, eps = randn(len(t), 5, seed=11), randn(len(t), 5, seed=12)
    x_t = s.add_noise(x0, eps, t)
    c = broadcast(s.coeffs(t), x0.ndim)
    torch.testing.assert_close(x_t, c.alpha * x0 + c.sigma * eps)
    for prediction, expected in expected_outputs(s, x0, eps, c).items():
        torch.testing.assert_close(from_x0(x0, x_t, c, prediction), expected, msg=prediction)
        torch.testing.assert_close(to_x0(expected, x_t, c, prediction), x0, msg=prediction)


def test_trigflow_velocity_is_sigma_data_times_F():
    """On TrigFlow the flow target dx_t/dt equals sigma_d F (the sCM parametrisation)."""
    s = TrigFlow(sigma_data=0.5)
    t = random_times(s, 16, seed=13)
    x0, eps = randn(len(t), 5, seed=14), randn(len(t), 5, seed=15)
    x_t = s.add_noise(x0, eps, t)
    c = broadcast(s.coeffs(t), 2)
    torch.testing.assert_close(from_x0(x0, x_t, c, "flow"), s.sigma_data * from_x0(x0, x_t, c, "trigflow"))


def test_unknown_prediction_raises():
    c = Flow().coeffs(torch.tensor(0.5))
    with pytest.raises(ValueError):
        to_x0(torch.zeros(2), torch.zeros(2), c, "x0")
    with pytest.raises(ValueError):
        from_x0(torch.zeros(2), torch.zeros(2), c, "x0")


# ---------------------------------------------------------------------------------------------------------------
# 4. The probability-flow ODE of a point mass, solved exactly


@pytest.mark.parametrize("name", SCHEDULE_IDS)
def test_point_mass_velocity_is_trajectory_derivative(name):
    s = ALL[name]
    t = random_times(s, 16, seed=16)
    x_star, eps0 = randn(len(t), 3, seed=17), randn(len(t), 3, seed=18)
    x_t, x_t_dot = torch.func.jvp(lambda t: s.add_noise(x_star, eps0, t), (t,), (torch.ones_like(t),))
    v = velocity(x_star, x_t, broadcast(s.coeffs(t), 2))
    torch.testing.assert_close(v, x_t_dot, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULE_IDS)
def test_ddim_step_lands_on_trajectory(name):
    s = ALL[name]
    t, u = random_times(s, 16, seed=19), random_times(s, 16, seed=20)
    t, u = torch.maximum(t, u), torch.minimum(t, u)  # step from the noisier time t to u
    x_star, eps0 = randn(len(t), 3, seed=21), randn(len(t), 3, seed=22)
    x_u = ddim_step(x_star, s.add_noise(x_star, eps0, t), broadcast(s.coeffs(t), 2), broadcast(s.coeffs(u), 2))
    torch.testing.assert_close(x_u, s.add_noise(x_star, eps0, u))


def euler_error(s: NoiseSchedule, steps: int, t_start: float, t_end: float = 0.0) -> float:
    """Euler on dx/dt = velocity(x*, x, t) from the exact x(t_start) to t_end; max error against the exact x(t_end)."""
    x_star, eps0 = randn(8, seed=23), randn(8, seed=24)
    ts = torch.linspace(t_start, t_end, steps + 1, dtype=F64)
    x = s.add_noise(x_star, eps0, ts[0])
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        x = x + (t_next - t) * velocity(x_star, x, s.coeffs(t))
    return (x - s.add_noise(x_star, eps0, ts[-1])).abs().max().item()


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_euler_is_exact_on_straight_trajectories(name):
    """Flow and EDM trajectories are straight in t: one Euler step from the noisiest time lands on x*."""
    s = ALL[name]
    x_star, eps0 = randn(8, seed=25), randn(8, seed=26)
    t = torch.tensor(s.t_max, dtype=F64)
    x1 = s.add_noise(x_star, eps0, t) - t * velocity(x_star, s.add_noise(x_star, eps0, t), s.coeffs(t))
    torch.testing.assert_close(x1, x_star)
    assert euler_error(s, 3, s.t_max) < 1e-10


CURVED = [n for n in SCHEDULE_IDS if n.startswith(("vp", "trigflow"))]


@pytest.mark.parametrize("name", CURVED)
def test_euler_converges_at_first_order(name):
    """On [0.1, 0.9] t_max, away from t = 0 where TrigFlow's drift is singular, Euler's global error is O(h)."""
    s = ALL[name]
    errors = [euler_error(s, n, 0.9 * s.t_max, 0.1 * s.t_max) for n in (50, 100, 200)]
    assert errors[0] > 1e-4, errors  # curved trajectory: Euler is not exact here, so the test has something to see
    for coarse, fine in zip(errors[:-1], errors[1:], strict=True):
        assert 1.8 < coarse / fine < 2.2, errors  # first order: halving the step halves the error


@pytest.mark.parametrize("name", CURVED)
def test_euler_converges_to_point_mass(name):
    """Integrated down to t = 0 the error shrinks with the step count; on TrigFlow, where sigma(0) = 0, the end point
    is x* itself (the last step from t = h multiplies the accumulated error by 1 - h cot h, so it converges faster)."""
    s = ALL[name]
    errors = [euler_error(s, n, 0.9 * s.t_max) for n in (50, 100, 200, 400)]
    assert all(fine < 0.8 * coarse for coarse, fine in zip(errors[:-1], errors[1:], strict=True)), errors
    if isinstance(s, TrigFlow):
        assert s.coeffs(torch.zeros((), dtype=F64)).sigma == 0
        assert errors[-1] < 1e-4, errors


# ---------------------------------------------------------------------------------------------------------------
# 5. Change of variables between schedules


def gaussian_x0(x_t: torch.Tensor, c: Coeffs, m: torch.Tensor, v: float) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(m, v I): m + alpha v / (alpha^2 v + sigma^2) (x_t - alpha m)."""
    return m + c.alpha * v / (c.alpha**2 * v + c.sigma**2) * (x_t - c.alpha * m)


PAIRS = [
    ("trigflow-1.0", "flow"),
    ("trigflow-0.5", "flow"),
    ("trigflow-0.5", "vp-scaled_linear"),
    ("trigflow-1.0", "vp-squaredcos_cap_v2"),
    ("trigflow-0.5", "edm"),
    ("flow", "vp-linear"),
    ("flow", "trigflow-0.5"),
    ("flow", "edm"),
    ("vp-scaled_linear", "flow"),
    ("vp-linear", "trigflow-0.5"),
    ("vp-squaredcos_cap_v2", "edm"),
    ("vp-linear", "vp-scaled_linear"),
    ("edm", "trigflow-1.0"),
    ("edm", "flow"),
    ("edm", "vp-scaled_linear"),
    ("trigflow-0.5", "vp-zero-snr"),
    ("trigflow-1.0", "vp-cogvideox"),
    ("vp-cogvideox", "trigflow-0.5"),
    ("vp-zero-snr", "flow"),
    ("flow", "vp-cogvideox"),
    ("vp-cogvideox", "vp-linear"),
]


def shared_times(dst: NoiseSchedule, src: NoiseSchedule, n: int, seed: int) -> torch.Tensor:
    """dst-times whose noise-to-signal ratio src also reaches (VP's ratio is bounded at both ends)."""
    gen = torch.Generator().manual_seed(seed)
    lo = math.log(max(0.02, *(a.ratio(torch.tensor(a.t_min, dtype=F64)).item() for a in (dst, src))))
    log_r = lo + (math.log(6.0) - lo) * torch.rand(n, generator=gen, dtype=F64)
    t = dst.time_at_ratio(log_r.exp())
    assert torch.allclose(dst.ratio(t), log_r.exp())
    return t


@pytest.mark.parametrize("dst_name,src_name", PAIRS)
def test_change_of_variables_preserves_gaussian_denoiser(dst_name, src_name):
    dst, src = ALL[dst_name], ALL[src_name]
    t = shared_times(dst, src, 16, seed=27)
    m, v = randn(6, seed=28), 0.3
    x_t = dst.add_noise(m + v**0.5 * randn(len(t), 6, seed=29), randn(len(t), 6, seed=30), t)
    rep = change_of_variables(t, dst, src)
    assert isinstance(rep, Reparam)
    assert ((rep.t_src >= src.t_min) & (rep.t_src <= src.t_max)).all()
    x0_src = gaussian_x0(append_dims(rep.scale, 2) * x_t, broadcast(src.coeffs(rep.t_src), 2), m, v)
    x0_dst = gaussian_x0(x_t, broadcast(dst.coeffs(t), 2), m, v)
    torch.testing.assert_close(x0_src, x0_dst, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(src.ratio(rep.t_src), dst.ratio(t), rtol=1e-9, atol=1e-12)


def test_flow_in_trigflow_time_closed_form():
    dst, src = TrigFlow(sigma_data=1.0), Flow()
    t = random_times(dst, 32, seed=31)
    rep = change_of_variables(t, dst, src)
    torch.testing.assert_close(rep.t_src, t.sin() / (t.sin() + t.cos()))
    torch.testing.assert_close(rep.scale, 1 / (t.sin() + t.cos()))


@pytest.mark.parametrize("dst_name,src_name", PAIRS)
def test_change_of_variables_derivative_matches_finite_differences(dst_name, src_name):
    """d t_src/dt and d scale/dt from autograd and forward mode against central differences (for a VP source this
    checks that the Newton step after the bisection carries the derivative)."""
    dst, src = ALL[dst_name], ALL[src_name]
    t = shared_times(dst, src, 8, seed=32)
    h = 1e-6 * t

    t_req = t.clone().requires_grad_(True)
    rep = change_of_variables(t_req, dst, src)
    (dt_src,) = torch.autograd.grad(rep.t_src.sum(), t_req, retain_graph=True)
    (dscale,) = torch.autograd.grad(rep.scale.sum(), t_req)
    _, (t_src_dot, scale_dot) = torch.func.jvp(
        lambda t: tuple(change_of_variables(t, dst, src)), (t,), (torch.ones_like(t),)
    )

    hi, lo = change_of_variables(t + h, dst, src), change_of_variables(t - h, dst, src)
    fd_t_src, fd_scale = (hi.t_src - lo.t_src) / (2 * h), (hi.scale - lo.scale) / (2 * h)
    for ad in (dt_src, t_src_dot):
        torch.testing.assert_close(ad, fd_t_src, rtol=1e-5, atol=1e-8)
    for ad in (dscale, scale_dot):
        torch.testing.assert_close(ad, fd_scale, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# 6. The forward transition keeps the marginals


@pytest.mark.parametrize("name", SCHEDULE_IDS)
def test_forward_transition_preserves_marginals(name):
    """x_t is linear in (x0, eps1, z): feeding the unit vectors reads off its three coefficients exactly."""
    s = ALL[name]
    a, b = random_times(s, 32, seed=33), random_times(s, 32, seed=34)
    t_s, t_t = torch.minimum(a, b), torch.maximum(a, b)
    n = len(t_s)
    x0, eps1, z = (torch.eye(3, dtype=F64)[i].expand(n, 3) for i in range(3))
    c_s, c_t = broadcast(s.coeffs(t_s), 2), broadcast(s.coeffs(t_t), 2)
    x_t = forward_transition(s.add_noise(x0, eps1, t_s), c_s, c_t, z)
    alpha, noise_var = x_t[:, 0], x_t[:, 1] ** 2 + x_t[:, 2] ** 2
    c = s.coeffs(t_t)
    torch.testing.assert_close(alpha, c.alpha)
    torch.testing.assert_close(noise_var, c.sigma**2)
    # the step to the same time adds no noise
    same = forward_transition(s.add_noise(x0, eps1, t_s), c_s, c_s, z)
    torch.testing.assert_close(same, s.add_noise(x0, eps1, t_s))


# ---------------------------------------------------------------------------------------------------------------
# 7. Configs


@pytest.mark.parametrize(
    "s",
    [
        *ALL.values(),
        VP(beta_start=0.0001, beta_end=0.03, num_train_timesteps=500),
        VP(trained_betas=(0.01,) * 20, num_train_timesteps=20, rescale_betas_zero_snr=True),
        Flow(shift=3.0),
        EDM(sigma_max=160),
    ],
    ids=[*ALL, "vp-500", "vp-trained", "flow-shift3", "edm-160"],
)
def test_schedule_config_round_trip(s):
    cfg = s.config()
    assert json.loads(json.dumps(cfg)) == cfg  # JSON-able
    back = schedule_from_config(cfg)
    assert type(back) is type(s) and back == s
    torch.testing.assert_close(back.coeffs(torch.tensor(0.3, dtype=F64)), s.coeffs(torch.tensor(0.3, dtype=F64)))


def test_schedule_from_config_rejects_unknown_kind():
    with pytest.raises(ValueError):
        schedule_from_config({"kind": "ve"})


def saved_config(scheduler) -> dict:
    """The scheduler_config.json a pipeline folder holds (it names the class, unlike ``scheduler.config``)."""
    return json.loads(scheduler.to_json_string())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_config(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    s, prediction = schedule_from_diffusers_config(saved_config(scheduler))
    assert s == Flow(shift=shift) and prediction == "flow"
    n = s.num_train_timesteps  # diffusers' training sigmas are the shifted uniform grid (SD3, Eq. 23)
    u = torch.linspace(1, n, n, dtype=F64).flip(0) / n
    torch.testing.assert_close(s.shift_time(u), scheduler.sigmas.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_scm_config(sigma_data):
    s, prediction = schedule_from_diffusers_config(saved_config(SCMScheduler(sigma_data=sigma_data)))
    assert s == TrigFlow(sigma_data=sigma_data) and prediction == "trigflow"


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (DDPMScheduler, {}),
        (DDPMScheduler, {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}),
        (DDIMScheduler, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
        (DDIMScheduler, {"prediction_type": "sample", "num_train_timesteps": 500}),
        (LCMScheduler, {}),
        (LCMScheduler, {"prediction_type": "v_prediction"}),
    ],
)
def test_ddpm_beta_configs(cls, kwargs):
    scheduler = cls(**kwargs)
    s, prediction = schedule_from_diffusers_config(saved_config(scheduler))
    cfg = scheduler.config
    assert isinstance(s, VP) and prediction == cfg.prediction_type
    assert (s.beta_schedule, s.num_train_timesteps) == (cfg.beta_schedule, cfg.num_train_timesteps)
    ref = scheduler.alphas_cumprod.double()
    torch.testing.assert_close(s.coeffs(torch.arange(len(ref), dtype=F64)).alpha ** 2, ref, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# 8. Every VP table diffusers builds: explicit betas, zero terminal SNR, CogVideoX's SNR shift


def rippled_betas(n: int = 1000) -> list[float]:
    """An explicit beta list that no beta_schedule gives: DDPM's linear betas with a slow ripple."""
    ripple = 1 + 0.1 * torch.sin(torch.arange(n, dtype=F64) / 50)
    return (torch.linspace(1e-4, 0.02, n, dtype=F64) * ripple).tolist()


TRAINED = rippled_betas()
ZSNR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True}
V = {"prediction_type": "v_prediction"}

# scheduler/scheduler_config.json of THUDM/CogVideoX-2b and THUDM/CogVideoX-5b as they ship (the 2b one is what
# diffusers' scripts/convert_cogvideox_to_diffusers.py writes; the 5b one differs only in snr_shift_scale). The 5b
# model card swaps in CogVideoXDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing").
COGVIDEOX = {
    name: {
        "_class_name": "CogVideoXDDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "sample_max_value": 1.0,
        "set_alpha_to_one": True,
        "snr_shift_scale": shift,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
        "trained_betas": None,
    }
    for name, shift in (("2b", 3.0), ("5b", 1.0))
}

TABLE_CASES = {
    "ddpm-trained": (DDPMScheduler, {"trained_betas": TRAINED}),
    "ddim-trained": (DDIMScheduler, {"trained_betas": TRAINED, **V}),
    "lcm-trained": (LCMScheduler, {"trained_betas": TRAINED}),
    "pndm-trained": (PNDMScheduler, {"trained_betas": TRAINED}),
    "ddpm-trained-zero-snr": (DDPMScheduler, {"trained_betas": TRAINED, "rescale_betas_zero_snr": True, **V}),
    "ddpm-zero-snr": (DDPMScheduler, {**ZSNR, **V}),
    "ddim-zero-snr": (DDIMScheduler, {**ZSNR, **V}),
    "lcm-zero-snr": (LCMScheduler, {**ZSNR, **V}),
    "tcd-zero-snr": (TCDScheduler, {**ZSNR, **V}),
    "ddim-cosine-zero-snr": (DDIMScheduler, {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True}),
    "ddpm-sigmoid": (DDPMScheduler, {"beta_schedule": "sigmoid"}),
    "ddpm-laplace": (DDPMScheduler, {"beta_schedule": "laplace"}),
    "heun-exp": (HeunDiscreteScheduler, {"beta_schedule": "exp"}),
}


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_vp_matches_diffusers_tables(case):
    cls, kwargs = TABLE_CASES[case]
    scheduler = cls(**kwargs)
    s, prediction = schedule_from_diffusers_config(saved_config(scheduler))
    assert isinstance(s, VP) and prediction == scheduler.config.prediction_type
    assert s.rescale_betas_zero_snr == bool(kwargs.get("rescale_betas_zero_snr"))
    ref = scheduler.alphas_cumprod.double()
    t = torch.arange(len(ref), dtype=F64)
    # diffusers builds these tables in float32, the zero-SNR rescale included: they agree to its rounding
    torch.testing.assert_close(s.alphas_cumprod, ref, rtol=1e-4, atol=1e-9)
    for dtype in (torch.float64, torch.float32):
        torch.testing.assert_close(s.coeffs(t.to(dtype)).alpha.double() ** 2, ref, rtol=1e-4, atol=1e-9)
    if s.rescale_betas_zero_snr:
        assert ref[-1] == 0 and s.alphas_cumprod[-1] == 0 and s.coeffs(t[-1]).alpha == 0


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_zero_snr_samplers_clamp_only_their_last_entry(cls):
    """Euler, DPM-Solver and UniPC overwrite alpha_bar = 0 at the last step with 2**-24 so that their sigma =
    sqrt((1 - alpha_bar) / alpha_bar) stays finite. The rest of the table is DDPMScheduler's, and VP keeps the exact 0
    of the process the model was trained on (DDPMScheduler.add_noise)."""
    scheduler = cls(**ZSNR, **V)
    s, _ = schedule_from_diffusers_config(saved_config(scheduler))
    ref, trained_on = scheduler.alphas_cumprod.double(), DDPMScheduler(**ZSNR).alphas_cumprod.double()
    assert ref[-1] == 2**-24 and trained_on[-1] == 0 == s.alphas_cumprod[-1]
    torch.testing.assert_close(ref[:-1], trained_on[:-1], rtol=0, atol=0)
    torch.testing.assert_close(s.alphas_cumprod[:-1], ref[:-1], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("cls", [CogVideoXDDIMScheduler, CogVideoXDPMScheduler])
@pytest.mark.parametrize("model", list(COGVIDEOX))
def test_cogvideox_tables(cls, model):
    """CogVideoX's schedulers build the table in float64, in this order: cumprod of the scaled-linear betas, then the
    SNR shift alpha_bar / (s + (1 - s) alpha_bar), then the zero-SNR rescale of sqrt(alpha_bar). VP follows the same
    order, so the tables agree to float64 rounding; the other order gives another table wherever s != 1."""
    shipped = COGVIDEOX[model]
    scheduler = cls.from_config(shipped, timestep_spacing="trailing")
    s, prediction = schedule_from_diffusers_config(saved_config(scheduler))
    assert prediction == "v_prediction" and s.rescale_betas_zero_snr
    assert s.snr_shift_scale == shipped["snr_shift_scale"]
    assert schedule_from_diffusers_config(shipped)[0] == s  # the JSON itself, as the pipeline folder holds it
    ref = scheduler.alphas_cumprod
    assert ref.dtype == F64 and ref[-1] == 0
    torch.testing.assert_close(s.alphas_cumprod, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(s.coeffs(torch.arange(len(ref), dtype=F64)).alpha ** 2, ref, rtol=1e-12, atol=1e-15)

    if s.snr_shift_scale != 1.0:  # rescale first, then shift
        shift = s.snr_shift_scale
        alpha = VP(beta_schedule="scaled_linear", rescale_betas_zero_snr=True).alphas_cumprod
        swapped = alpha / (shift + (1 - shift) * alpha)
        assert not torch.allclose(swapped, ref, rtol=1e-3, atol=0)


def test_missing_keys_take_the_class_defaults():
    """A config that leaves a key out gets the named class's default, as diffusers' from_config gives it (CogVideoX's
    snr_shift_scale defaults to 3, a key other VP schedulers do not have)."""
    config = {k: v for k, v in COGVIDEOX["2b"].items() if k != "snr_shift_scale"}
    s, _ = schedule_from_diffusers_config(config)
    ref = CogVideoXDDIMScheduler.from_config(config).alphas_cumprod
    torch.testing.assert_close(s.alphas_cumprod, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(ZERO_SNR))
def test_zero_terminal_snr_ends(name, dtype):
    """alpha(t_max) = 0 and sigma(t_max) = 1 exactly; all four coefficients are finite at both ends, with d_alpha at
    t_max the one-sided difference quotient and d_sigma(t_max) = 0 (sigma peaks there); the ratio is inf there, which
    time_at_ratio maps back to t_max, and the pure-noise prior has unit scale."""
    s = ALL[name]
    ends = torch.tensor([0.0, s.t_max], dtype=dtype)
    c = s.coeffs(ends)
    assert all(torch.isfinite(v).all() for v in c)
    assert c.alpha[1] == 0 and c.sigma[1] == 1 and c.d_sigma[1] == 0 and c.d_alpha[1] < 0
    torch.testing.assert_close(c.alpha**2 + c.sigma**2, torch.ones_like(c.alpha))
    h = 1e-6
    below = s.coeffs(torch.tensor(s.t_max - h, dtype=F64))
    torch.testing.assert_close(c.d_alpha[1].double(), (0 - below.alpha) / h, rtol=1e-4, atol=0)
    assert s.ratio(ends)[1] == math.inf and s.prior_std(ends)[1] == 1
    assert s.time_at_ratio(torch.tensor(math.inf, dtype=dtype)) == s.t_max


@pytest.mark.parametrize("name", list(ZERO_SNR))
def test_zero_terminal_snr_predictions_at_pure_noise(name):
    """At t_max, x_t = eps holds nothing of x0. v_prediction (v = alpha eps - sigma x0 = -x0 there), flow and sample
    outputs still give x0; epsilon cannot (x0 = (x_t - sigma eps) / alpha divides by 0), nor can diffusers'
    DDIMScheduler from an epsilon output: zero terminal SNR goes with v_prediction (Lin et al., 2024, Sec. 3.2)."""
    s = ALL[name]
    t = torch.tensor([s.t_max], dtype=F64)
    x0, eps = randn(1, 5, seed=40), randn(1, 5, seed=41)
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, eps)
    c = broadcast(s.coeffs(t), 2)
    outputs = expected_outputs(s, x0, eps, c)
    for prediction in ("v_prediction", "flow", "sample"):
        torch.testing.assert_close(to_x0(outputs[prediction], x_t, c, prediction), x0, msg=prediction)
    assert not torch.isfinite(to_x0(outputs["epsilon"], x_t, c, "epsilon")).any()
    ddim = DDIMScheduler(**ZSNR, timestep_spacing="trailing", clip_sample=False)
    ddim.set_timesteps(1)
    assert int(ddim.timesteps[0]) == s.t_max
    out = ddim.step(eps.float(), ddim.timesteps[0], x_t.float() + 1).pred_original_sample
    assert not torch.isfinite(out).any()


@pytest.mark.parametrize("other_name", ["trigflow-0.5", "trigflow-1.0", "flow"])
@pytest.mark.parametrize("name", list(ZERO_SNR))
def test_change_of_variables_reaches_pure_noise(name, other_name):
    """Zero terminal SNR makes VP's t_max pure noise, as TrigFlow's pi/2 and Flow's 1 are: the maps between them are
    finite on both closed domains, send one end to the other's same end, and invert each other (times and scales)."""
    vp, other = ALL[name], ALL[other_name]
    t = torch.cat([torch.tensor([0.0, vp.t_max], dtype=F64), random_times(vp, 16, seed=42)])
    to_other = change_of_variables(t, vp, other)
    assert torch.isfinite(to_other.t_src).all() and torch.isfinite(to_other.scale).all()
    assert to_other.t_src[1] == other.t_max  # ratio inf -> pi/2 or 1 exactly
    torch.testing.assert_close(to_other.scale[1], other.prior_std(torch.tensor(other.t_max, dtype=F64)))
    back = change_of_variables(to_other.t_src, other, vp)
    assert torch.isfinite(back.t_src).all() and torch.isfinite(back.scale).all()
    torch.testing.assert_close(back.t_src, t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back.scale * to_other.scale, torch.ones_like(t))
    end = change_of_variables(torch.tensor([other.t_min, other.t_max], dtype=F64), other, vp)
    assert torch.isfinite(end.t_src).all() and torch.isfinite(end.scale).all()
    torch.testing.assert_close(end.t_src[1], torch.tensor(vp.t_max, dtype=F64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in SCHEDULE_IDS if n != "edm"] + ["vp-trained"])
def test_diffusers_schedule_config_builds_the_stock_scheduler(name):
    """``diffusers_schedule_config`` gives keys a stock scheduler takes, and that scheduler reads back as the same
    schedule (EDM has no stock counterpart among the schedulers fewstep reads)."""
    s = VP(trained_betas=tuple(TRAINED)) if name == "vp-trained" else ALL[name]
    keys = diffusers_schedule_config(s)
    if isinstance(s, VP):
        cls = CogVideoXDDIMScheduler if s.snr_shift_scale != 1.0 else DDPMScheduler
    else:
        cls = FlowMatchEulerDiscreteScheduler if isinstance(s, Flow) else SCMScheduler
    assert schedule_from_diffusers_config(saved_config(cls(**keys)))[0] == s


def test_vp_configs_stay_compact():
    """The step 1-3 keys appear in a VP config only where set, so configs written before they existed (every
    FewStepScheduler folder exported so far) read back equal; explicit betas are stored as a JSON list."""
    assert set(VP().config()) == {"kind", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps"}
    cfg = VP(trained_betas=TRAINED).config()
    assert cfg["trained_betas"] == TRAINED and json.loads(json.dumps(cfg)) == cfg
    assert schedule_from_config(cfg) == VP(trained_betas=tuple(TRAINED))


def test_inconsistent_configs_are_rejected():
    with pytest.raises(ValueError):
        VP(trained_betas=TRAINED[:10])  # 10 betas for num_train_timesteps=1000
    with pytest.raises(ValueError):
        VP(trained_betas=[*TRAINED[:-1], 1.0])  # alpha_bar = 0 by a beta of 1: that is rescale_betas_zero_snr's job
    with pytest.raises(ValueError):
        VP(snr_shift_scale=0.0)
    with pytest.raises(ValueError):  # Euler's continuous timesteps feed the model log(sigma) / 4, not the timestep
        schedule_from_diffusers_config(EulerDiscreteScheduler(timestep_type="continuous", **V))
