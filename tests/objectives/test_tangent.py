"""dF/dt for sCM: the forward-mode JVP (fewstep's attention rule) against a central finite difference in fp64 on every
supported backbone, along sCM's own tangent (x_dot = cos t sin t dx_t/dt, t_dot = cos t sin t), and the fallback."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import TinyModel

from fewstep.objectives.tangent import directional_derivative, finite_difference
from fewstep.schedules import TrigFlow, schedule_from_diffusers_config
from fewstep.teacher import Denoiser


@torch.no_grad()
def test_jvp_matches_central_difference_on_every_backbone(tiny: TinyModel) -> None:
    torch.manual_seed(0)
    model = tiny.build().eval().double()
    native, prediction = schedule_from_diffusers_config(tiny.scheduler())
    student = Denoiser(model, native, prediction, TrigFlow())
    x = torch.randn(2, *tiny.shape, dtype=torch.float64)
    cond = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in tiny.cond(2).items()}
    if "added_cond_kwargs" in cond:
        cond["added_cond_kwargs"] = {k: v.double() for k, v in cond["added_cond_kwargs"].items()}
    t = torch.tensor([0.5, 1.1], dtype=torch.float64)
    cos_sin = t.cos() * t.sin()
    tangents = (cos_sin.view(-1, *[1] * len(tiny.shape)) * torch.randn_like(x), cos_sin)

    def F(x_t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return student.predict(x_t, s, cond, prediction="trigflow")

    out, dot, method = directional_derivative(F, (x, t), tangents, "jvp")
    # diffusers embeds timesteps in float32 whatever the model's dtype, which caps how small a step can be; the
    # time path is also strongly curved (sinusoids of 1000 t), so cancel the O(h^2) error by Richardson extrapolation
    out_fd, coarse = finite_difference(F, (x, t), tangents, step=1e-3)
    fine = finite_difference(F, (x, t), tangents, step=5e-4)[1]
    dot_fd = (4 * fine - coarse) / 3
    assert method == "jvp"
    torch.testing.assert_close(out, out_fd)
    assert float((dot - dot_fd).norm() / dot_fd.norm()) < 1e-3
    # the x part alone stays in fp64 on backbones without float32 casts on the way: there it agrees to ~1e-9
    x_only = (tangents[0], torch.zeros_like(t))
    dot_x = directional_derivative(F, (x, t), x_only, "jvp")[1]
    assert float((dot_x - finite_difference(F, (x, t), x_only, step=1e-4)[1]).norm() / dot_x.norm()) < 2e-3


def test_auto_falls_back_to_finite_difference_without_a_forward_rule() -> None:
    class NoForwardRule(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return x.sin()

        @staticmethod
        def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
            return None

    def fn(x: torch.Tensor) -> torch.Tensor:
        return NoForwardRule.apply(x)

    x = torch.linspace(0, 1, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        directional_derivative(fn, (x,), (torch.ones_like(x),), "jvp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, dot, method = directional_derivative(fn, (x,), (torch.ones_like(x),), "auto", fd_step=1e-6)
    assert method == "fd" and any("finite difference" in str(w.message) for w in caught)
    torch.testing.assert_close(dot, x.cos(), rtol=1e-8, atol=1e-8)
    assert math.isclose(float(out[2]), math.sin(0.5))
