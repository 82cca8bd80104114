"""The distribution-matching core on Gaussians, where every score is known in closed form.

Data x0 ~ N(mu, s^2 I) re-noised as x_t = a x0 + b eps has the posterior mean E[x0 | x_t] = mu + a s^2 / v (x_t - a mu)
with v = a^2 s^2 + b^2, and the reverse KL between two such laws at level t is a^2 |mu_g - mu_r|^2 / (2 v)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.objectives.dmd import (
    distribution_matching_loss,
    dmd_generator_loss,
    dmd_gradient,
    fake_score_loss,
    fake_score_network,
    ho_scale,
    sid_generator_loss,
    subinterval_mean,
    uniform_times,
)
from fewstep.sampling import SamplingPlan, plan_state, sample_plan
from fewstep.schedules import VP, Flow, TrigFlow, append_dims

S = 0.5  # the data's standard deviation


def posterior_mean(mu: torch.Tensor, schedule, s: float = S):
    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = schedule.coeffs(append_dims(t, x_t.ndim))
        v = c.alpha**2 * s**2 + c.sigma**2
        return mu + c.alpha * s**2 / v * (x_t - c.alpha * mu)

    return denoise


@pytest.mark.parametrize("schedule", [Flow(), VP(), TrigFlow()], ids=["flow", "vp", "trigflow"])
def test_dmd_direction_is_the_reverse_kl_gradient(schedule) -> None:
    """x0_fake - x0_real = (b^2 / a^2) d KL_t / d mu_g: the direction DMD pushes x0_G along lowers the reverse KL."""
    torch.manual_seed(0)
    dim = 6
    mu_r, mu_g = torch.randn(dim), torch.randn(dim).requires_grad_(True)
    t = uniform_times(schedule, 5, 0.1, 0.9)
    x0_gen = mu_g.detach() + S * torch.randn(5, dim)
    eps = torch.randn_like(x0_gen)
    real, fake = posterior_mean(mu_r, schedule), posterior_mean(mu_g.detach(), schedule)
    _, grad = distribution_matching_loss(x0_gen, t, schedule, real, fake, eps)
    c = schedule.coeffs(append_dims(t, 2))
    v = c.alpha**2 * S**2 + c.sigma**2
    kl = (c.alpha**2 * (mu_g - mu_r) ** 2 / (2 * v)).sum(1)
    (dkl,) = torch.autograd.grad(kl.sum(), mu_g)
    per_row = c.alpha**2 * (mu_g.detach() - mu_r) / v  # d KL_t / d mu_g of each row's own t
    torch.testing.assert_close(per_row.sum(0), dkl)
    scale = (x0_gen - real(schedule.add_noise(x0_gen, eps, t), t)).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad * scale, c.sigma**2 / c.alpha**2 * per_row, atol=1e-5, rtol=1e-4)


def test_generator_loss_hands_grad_to_x0() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    grad = torch.randn(3, 4)
    dmd_generator_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / x.numel())


def test_gradient_is_normalized_per_sample() -> None:
    x0_gen, x0_real, x0_fake = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    a = dmd_gradient(x0_gen, x0_real, x0_fake)
    b = dmd_gradient(10 * x0_gen, 10 * x0_real, 10 * x0_fake)  # scale-free: the same step at every data scale
    torch.testing.assert_close(a, b)
    assert torch.allclose((x0_gen - x0_real).abs().mean(1) * a.abs().mean(1), (x0_fake - x0_real).abs().mean(1))


def test_generator_trained_by_dmd_reaches_the_teacher() -> None:
    """A generator x = mu_g + s z trained by DMD against the exact fake score of its current law moves onto mu_r."""
    torch.manual_seed(0)
    schedule = Flow()
    mu_r = torch.tensor([1.5, -0.5, 0.25])
    mu_g = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([mu_g], lr=2.0)
    start = (mu_g.detach() - mu_r).norm()
    for _ in range(300):
        x0_gen = mu_g + S * torch.randn(64, 3)
        t = uniform_times(schedule, 64)
        loss, _ = distribution_matching_loss(
            x0_gen, t, schedule, posterior_mean(mu_r, schedule), posterior_mean(mu_g.detach(), schedule)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (mu_g.detach() - mu_r).norm() < 0.05 * start


@pytest.mark.parametrize("weighting", ["x0", "eps", "v"])
def test_fake_score_converges_to_the_posterior_mean_of_fixed_student_samples(weighting: str) -> None:
    """A per-time affine denoiser fit by fake_score_loss on a fixed student's samples reaches E[x0 | x_t]."""
    torch.manual_seed(0)
    schedule = VP()
    mu_g = torch.tensor([0.8, -1.2])
    t_fixed = torch.tensor(0.4 * schedule.t_max)

    class Affine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.slope, self.bias = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))

        def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.slope * x_t + self.bias

    fake = Affine()
    opt = torch.optim.Adam(fake.parameters(), lr=2e-2)
    for _ in range(1500):
        x0_gen = mu_g + S * torch.randn(256, 2)
        loss = fake_score_loss(x0_gen, t_fixed.expand(256), schedule, fake, weighting=weighting)  # type: ignore[arg-type]
        opt.zero_grad()
        loss.backward()
        opt.step()
    c = schedule.coeffs(t_fixed)
    slope = c.alpha * S**2 / (c.alpha**2 * S**2 + c.sigma**2)
    torch.testing.assert_close(fake.slope.detach(), slope.expand(2).float(), atol=0.03, rtol=0)
    torch.testing.assert_close(fake.bias.detach(), (mu_g * (1 - c.alpha * slope)).float(), atol=0.03, rtol=0)


def test_fake_score_weighting_and_clip() -> None:
    schedule = Flow()
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    plain = fake_score_loss(x0, t, schedule, zero, eps)
    snr = fake_score_loss(x0, t, schedule, zero, eps, weighting="eps")
    clipped = fake_score_loss(x0, t, schedule, zero, eps, weighting="eps", snr_clip=5.0)
    velocity = fake_score_loss(x0, t, schedule, zero, eps, weighting="v")
    err = x0.pow(2).mean(1)
    c = schedule.coeffs(t)
    # on flow, x0_hat - x0 = -t (v_hat - v): the "v" weight 1 / t^2 makes it the velocity loss itself
    v_err = ((eps - x0) - (schedule.add_noise(x0, eps, t) - zero(x0, t)) / t[:, None]).pow(2).mean(1)
    torch.testing.assert_close(velocity, v_err.mean())
    torch.testing.assert_close(plain, err.mean())
    torch.testing.assert_close(snr, ((c.alpha / c.sigma) ** 2 * err).mean())
    torch.testing.assert_close(clipped, ((c.alpha / c.sigma) ** 2).clamp_max(5.0).mul(err).mean())


def test_guidance_conventions_dmd2_is_ho_salimans_and_fastvideo_is_offset_by_one() -> None:
    """tianweiy/DMD2 main/sd_guidance.py guides as x_u + w (x_c - x_u) (Ho-Salimans), so its real_guidance_scale
    carries over unchanged; FastVideo's fastvideo/training/distillation_pipeline.py writes x_c + w (x_c - x_u), which
    is Ho-Salimans at w + 1 (its real_score_guidance_scale 3.5 is the usual 4.5)."""
    assert ho_scale(4.5, "ho") == 4.5
    assert ho_scale(4.5, "dmd2") == 4.5
    assert ho_scale(3.5, "fastvideo") == 4.5
    x_c, x_u = torch.randn(3), torch.randn(3)
    w = 2.0
    torch.testing.assert_close(x_u + ho_scale(w, "dmd2") * (x_c - x_u), x_u + w * (x_c - x_u))
    torch.testing.assert_close(x_u + ho_scale(w, "fastvideo") * (x_c - x_u), x_c + w * (x_c - x_u))
    with pytest.raises(ValueError):
        ho_scale(1.0, "cfg++")  # type: ignore[arg-type]


def test_fake_score_network_starts_as_the_teacher_and_trains_apart() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj_in, self.proj_out = nn.Linear(4, 8), nn.Linear(8, 4)  # layer names LoRA adapts

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj_out(torch.nn.functional.silu(self.proj_in(x)))

    teacher = Net().requires_grad_(False)
    fake = fake_score_network(teacher)
    x = torch.randn(2, 4)
    torch.testing.assert_close(fake(x), teacher(x))
    assert all(p.requires_grad for p in fake.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    lora = fake_score_network(teacher, lora_rank=2)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lora_" in n for n, _ in teacher.named_parameters())  # the teacher itself is untouched


def test_backward_simulation_state_is_the_plan_prefix() -> None:
    """plan_state(k) is x at times[k] after k student steps: for an exact point-mass student with gamma = 1 it is
    alpha x* + sigma z with the generator's k-th noise draw, and finishing the plan from it is sample_plan."""
    trig = TrigFlow()
    x_star = torch.randn(2, 3)
    plan = SamplingPlan(trig, (math.pi / 2, 1.1, 0.6), gamma=1.0)
    noise = torch.randn(2, 3)
    point = lambda x, t: x_star  # noqa: E731
    gen = torch.Generator().manual_seed(3)
    x2 = plan_state(point, plan, noise, 2, gen)
    zs = torch.Generator().manual_seed(3)
    torch.randn(2, 3, generator=zs)  # step 0 -> 1 draw
    z = torch.randn(2, 3, generator=zs)  # step 1 -> 2 draw
    c = trig.coeffs(torch.tensor(0.6))
    torch.testing.assert_close(x2, c.alpha * x_star + c.sigma * z)
    assert torch.equal(plan_state(point, plan, noise, 0), trig.prior_std(torch.tensor(math.pi / 2)) * noise)
    full = sample_plan(lambda x, t: x.mean() + x_star, plan, noise, torch.Generator().manual_seed(5))
    k = plan_state(lambda x, t: x.mean() + x_star, plan, noise, 2, torch.Generator().manual_seed(5))
    torch.testing.assert_close(full, k.mean() + x_star)
    with pytest.raises(ValueError):
        plan_state(point, plan, noise, 3)


def test_sid_loss_at_alpha_one_is_the_fake_to_sample_form() -> None:
    """SiD Eq. 20 with alpha = 1: (x0_real - x0_fake) . (x0_fake - x0_G), over the normalizer mean|x0_G - x0_real|."""
    x0_gen, x0_real, x0_fake = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    expected = ((x0_real - x0_fake) * (x0_fake - x0_gen)).mean(1) / (x0_gen - x0_real).abs().mean(1)
    torch.testing.assert_close(sid_generator_loss(x0_gen, x0_real, x0_fake, alpha=1.0), expected.mean())
    assert float(sid_generator_loss(x0_gen, x0_real, x0_real.clone())) == 0.0  # fake = real: nothing to learn


def test_generator_trained_by_sid_reaches_the_teacher() -> None:
    """SiD differentiates through both scores' inputs: a generator mu_g + s z against the exact fake score of its
    current law (rebuilt every step, as a converged critic) moves onto the teacher's mean."""
    torch.manual_seed(0)
    schedule = Flow()
    mu_r = torch.tensor([1.5, -0.5, 0.25])
    mu_g = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([mu_g], lr=0.5)
    start = (mu_g.detach() - mu_r).norm()
    for _ in range(300):
        x0_gen = mu_g + S * torch.randn(64, 3)
        t = uniform_times(schedule, 64)
        x_t = schedule.add_noise(x0_gen, torch.randn_like(x0_gen), t)  # the graph to mu_g is kept
        real, fake = posterior_mean(mu_r, schedule), posterior_mean(mu_g.detach(), schedule)
        loss = sid_generator_loss(x0_gen, real(x_t, t), fake(x_t, t), alpha=1.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (mu_g.detach() - mu_r).norm() < 0.05 * start


@pytest.mark.parametrize("schedule", [Flow(), VP(), TrigFlow()], ids=["flow", "vp", "trigflow"])
def test_subinterval_mean_is_the_gaussian_conditional(schedule) -> None:
    """For Gaussian data and the exact x0 posterior at x_t, E[x_s | x_t] from the subinterval forward equals the
    conditional mean of the jointly Gaussian (x_s, x_t); at s = t_min it is the x0 estimate itself."""
    torch.manual_seed(0)
    mu = torch.randn(5)
    lo, hi = schedule.t_min, schedule.t_max
    s = torch.full((7,), lo + 0.3 * (hi - lo), dtype=torch.float64)
    t = torch.full((7,), lo + 0.7 * (hi - lo), dtype=torch.float64)
    c_s, c_t = schedule.coeffs(append_dims(s, 2)), schedule.coeffs(append_dims(t, 2))
    x_t = torch.randn(7, 5, dtype=torch.float64)
    x0 = posterior_mean(mu.double(), schedule)(x_t, t)
    var_s = c_s.alpha**2 * S**2 + c_s.sigma**2
    a = c_t.alpha / c_s.alpha
    var_t = c_t.alpha**2 * S**2 + c_t.sigma**2
    expected = c_s.alpha * mu + a * var_s / var_t * (x_t - c_t.alpha * mu)  # Cov(x_s, x_t) = a Var(x_s)
    torch.testing.assert_close(subinterval_mean(x0, x_t, c_s, c_t), expected)
    if isinstance(schedule, Flow):
        c_0 = schedule.coeffs(torch.zeros(7, 1, dtype=torch.float64))
        torch.testing.assert_close(subinterval_mean(x0, x_t, c_0, c_t), x0)
