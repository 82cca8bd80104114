"""Attention with a forward-mode rule: gradcheck in float64, SDPA parity, and jvp through every backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.attention import attention_jvp, jvp_attention, sdpa_with_jvp
from fewstep.schedules import schedule_from_diffusers_config
from fewstep.teacher import Denoiser


def qkv(*shape: int, dtype: torch.dtype = torch.float64, heads_kv: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    b, h, n, d = shape
    kv = (b, heads_kv or h, n + 3, d)  # more keys than queries on purpose
    return (torch.randn(shape, generator=g, dtype=dtype, requires_grad=True),
            torch.randn(kv, generator=g, dtype=dtype, requires_grad=True),
            torch.randn(kv, generator=g, dtype=dtype, requires_grad=True))  # fmt: skip


def test_gradcheck_forward_and_backward() -> None:
    q, k, v = qkv(2, 3, 5, 4)
    bias = torch.randn(5, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention_jvp(q, k, v, bias, 0.37), (q, k, v), check_forward_ad=True, check_backward_ad=True
    )


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"scale": 0.2}, {"is_causal": True}, {"attn_mask": "bool"}, {"attn_mask": "float"}, {"enable_gqa": True}],
    ids=["plain", "scale", "causal", "bool-mask", "additive-mask", "gqa"],
)
def test_matches_pytorch_sdpa(kwargs: dict) -> None:
    q, k, v = qkv(2, 4, 6, 8, heads_kv=2 if kwargs.get("enable_gqa") else None)
    if kwargs.get("is_causal"):
        k, v = k[..., :6, :], v[..., :6, :]
    if kwargs.get("attn_mask") == "bool":
        kwargs = {"attn_mask": torch.rand(6, 9, generator=torch.Generator().manual_seed(1)) > 0.3}
        kwargs["attn_mask"][:, 0] = True  # every query attends somewhere
    elif kwargs.get("attn_mask") == "float":
        kwargs = {"attn_mask": torch.randn(2, 1, 6, 9, dtype=torch.float64)}
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(sdpa_with_jvp(q, k, v, **kwargs), ref)
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    _, dot = torch.func.jvp(lambda q, k, v: sdpa_with_jvp(q, k, v, **kwargs), (q, k, v), tangents)
    with sdpa_kernel(SDPBackend.MATH):
        _, dot_ref = torch.func.jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs), (q, k, v),
                                    tangents)  # fmt: skip
    torch.testing.assert_close(dot, dot_ref)


def test_context_restores_pytorch_attention() -> None:
    original = F.scaled_dot_product_attention
    with pytest.raises(RuntimeError), jvp_attention():
        assert F.scaled_dot_product_attention is sdpa_with_jvp
        raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is original


@torch.no_grad()
def test_jvp_through_every_backbone(tiny: TinyModel) -> None:
    """d x0/dt by torch.func.jvp under jvp_attention equals PyTorch's own math-attention JVP."""
    torch.manual_seed(0)
    model = tiny.build().eval()
    native, prediction = schedule_from_diffusers_config(tiny.scheduler())
    denoiser = Denoiser(model, native, prediction)
    x, cond, t0 = torch.randn(1, *tiny.shape), tiny.cond(1), torch.tensor([0.4 * native.t_max])

    def f(t: torch.Tensor) -> torch.Tensor:
        return denoiser(x, t, cond)

    with jvp_attention():
        out, dot = torch.func.jvp(f, (t0,), (torch.ones_like(t0),))
    with sdpa_kernel(SDPBackend.MATH):
        out_ref, dot_ref = torch.func.jvp(f, (t0,), (torch.ones_like(t0),))
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dot, dot_ref, rtol=1e-4, atol=1e-5 * float(dot_ref.abs().max()))
