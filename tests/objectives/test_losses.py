"""Loss pieces by identity: limits, boundary conditions, the sCM tangent as a derivative, optima."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.objectives.losses import (
    adaptive_weighted_loss,
    lcm_boundary,
    log_normal_density,
    normalize_tangent,
    pseudo_huber,
    rcm_tangent,
    scm_tangent,
    tangent_warmup,
    trigflow_time_proposal,
)
from fewstep.schedules import TrigFlow


def test_pseudo_huber_limits() -> None:
    c = 1e-3
    small, large = torch.full((1, 4), 1e-6), torch.full((1, 4), 10.0)
    zero = torch.zeros(1, 4)
    assert pseudo_huber(zero, zero, c).item() == 0
    assert pseudo_huber(small, zero, c).item() == pytest.approx(1e-12 / (2 * c), rel=1e-3)  # quadratic
    assert pseudo_huber(large, zero, c).item() == pytest.approx(10.0 - c, rel=1e-6)  # linear
    pred = torch.tensor([[100.0]], requires_grad=True)
    pseudo_huber(pred, torch.zeros(1, 1), c).sum().backward()
    assert pred.grad.abs().item() <= 1.0  # bounded pull from outliers


def test_lcm_boundary() -> None:
    t = torch.tensor([0.0, 1.0, 20.0, 999.0])
    c_skip, c_out = lcm_boundary(t)
    assert c_skip[0] == 1 and c_out[0] == 0
    torch.testing.assert_close(c_out**2 + c_skip, torch.ones(4))  # c_out^2 = 1 - c_skip
    assert (c_skip[1:] < 0.01).all()


def test_time_proposal_is_log_normal_in_the_ratio() -> None:
    t = trigflow_time_proposal(200_000, p_mean=-0.8, p_std=1.6, sigma_data=0.5, p_sigma_data=1.0,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert 0 < t.min() and t.max() < math.pi / 2
    log_ratio = torch.log(0.5 * torch.tan(t.double()))
    assert log_ratio.mean().item() == pytest.approx(-0.8, abs=0.02)
    assert log_ratio.std().item() == pytest.approx(1.6, abs=0.02)
    grid = torch.linspace(1e-4, math.pi / 2 - 1e-4, 200_001, dtype=torch.float64)
    for sd, p_sd in ((0.5, 1.0), (1.0, 0.5), (1.0, 1.0)):
        density = log_normal_density(grid, -0.8, 1.6, sd, p_sd)
        assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("sigma_data,p_sigma_data", [(1.0, 0.5), (0.5, 1.0), (1.0, 1.0), (0.5, 0.5)])
def test_time_proposal_states_sigma_for_data_of_the_reference_std(sigma_data: float, p_sigma_data: float) -> None:
    """exp(N) is sigma for data of std p_sigma_data (SANA-Sprint: 0.5), so on unit-variance data the
    noise-to-signal ratio is exp(N) / p_sigma_data, whatever the schedule's own sigma_data:
    sd tan t = exp(N) / p_sd, i.e. t = atan(exp(N) / (p_sd sd)) in closed form."""
    t = trigflow_time_proposal(1000, 0.2, 1.6, sigma_data, p_sigma_data, generator=torch.Generator().manual_seed(3))
    log_ratio = 0.2 + 1.6 * torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = torch.atan(torch.exp(log_ratio) / (p_sigma_data * sigma_data)).float()
    assert torch.equal(t, expected)
    ratio = TrigFlow(sigma_data=sigma_data).ratio(t.double())  # sigma / alpha on the data as given
    torch.testing.assert_close(ratio * p_sigma_data, torch.exp(log_ratio), rtol=1e-3, atol=0)  # t in float32


def test_scm_tangent_is_cos_t_times_consistency_derivative() -> None:
    """g (r = 1) equals cos t * d/dt [cos t x_t - sd sin t F(x_t, t)] along dx_t/dt, with dF^-/dt from the JVP
    rearrangement (tangents scaled by cos t sin t)."""
    sd = 0.5
    g0 = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g0, dtype=torch.float64) / 3

    def F(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # any smooth network
        return torch.tanh(x @ A) * torch.cos(3 * t)[:, None] + t[:, None] ** 2

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # any smooth flow
        return torch.sin(x) * t[:, None] - x

    x = torch.randn(3, 6, generator=g0, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    v = velocity(x, t)
    cs = (t.cos() * t.sin())[:, None]
    F_minus, dF_dt = torch.func.jvp(F, (x, t), (cs * v, cs[:, 0]))
    g = scm_tangent(F_minus, dF_dt, v, x, t, sd, warmup=1.0)

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t.cos()[:, None] * x - sd * t.sin()[:, None] * F(x, t)

    _, df_dt = torch.func.jvp(f, (x, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(g, t.cos()[:, None] * df_dt)
    g_half = scm_tangent(F_minus, dF_dt, v, x, t, sd, warmup=0.0)  # r = 0 keeps only the first term
    torch.testing.assert_close(g_half, -(t.cos()[:, None] ** 2) * (sd * F_minus - v))


def test_normalize_tangent_and_warmup() -> None:
    g = torch.randn(4, 3, 5) * torch.tensor([1e-3, 1.0, 10.0, 1e3])[:, None, None]
    n = normalize_tangent(g, c=0.1)
    norms = n.flatten(1).norm(dim=1)
    assert (norms < 1).all() and norms[-1] > 0.99
    torch.testing.assert_close(
        n / n.flatten(1).norm(dim=1)[:, None, None], g / g.flatten(1).norm(dim=1)[:, None, None]
    )
    assert [tangent_warmup(s, 4) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0] and tangent_warmup(3, 0) == 1.0


def test_adaptive_weight_optimum() -> None:
    """d/dlogvar = 0 at e^logvar = w * mse, where the loss is 1 + log(w * mse)."""
    F_theta, target = torch.randn(2, 8), torch.randn(2, 8)
    w = torch.tensor([0.5, 2.0])
    mse = ((F_theta - target) ** 2).mean(1)
    logvar = torch.log(w * mse).requires_grad_(True)
    loss = adaptive_weighted_loss(F_theta, target, logvar, w)
    loss.sum().backward()
    torch.testing.assert_close(logvar.grad, torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(loss.detach(), 1 + torch.log(w * mse))


def test_rcm_tangent_warmup_form() -> None:
    """rCM's tangent (NVlabs/rcm t2v_model_distill_rcm.py, _student_scm_step) with warm-up r:
    g = -cos t sqrt(1 - r^2 sin^2 t) (sd F^- - dx_t/dt) - (r cos t sin t x_t + sd dF^-/dt).
    At r = 1 it is SANA-Sprint's g (sqrt(1 - sin^2) = cos); at r = 0 the dF/dt term stays whole."""
    g0 = torch.Generator().manual_seed(1)
    F_minus, dF_dt, v, x = (torch.randn(3, 2, 4, generator=g0, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.2, 0.9, 1.5], dtype=torch.float64)
    cos, sin = t.cos()[:, None, None], t.sin()[:, None, None]
    for sd in (0.5, 1.0):
        torch.testing.assert_close(
            rcm_tangent(F_minus, dF_dt, v, x, t, sd, 1.0), scm_tangent(F_minus, dF_dt, v, x, t, sd)
        )
        torch.testing.assert_close(
            rcm_tangent(F_minus, dF_dt, v, x, t, sd, 0.0), -cos * (sd * F_minus - v) - sd * dF_dt
        )
        r = 0.5
        expected = -cos * torch.sqrt(1 - r**2 * sin**2) * (sd * F_minus - v) - (r * cos * sin * x + sd * dF_dt)
        torch.testing.assert_close(rcm_tangent(F_minus, dF_dt, v, x, t, sd, r), expected)
