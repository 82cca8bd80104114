"""fewstep's attention route (jvp_attention / sdpa_with_jvp on fewstep_kernels): gradcheck in float64, SDPA parity
for every mask and layout diffusers passes, and torch.func.jvp and .backward() through every tiny backbone."""

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


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"scale": 0.2}, {"is_causal": True}, {"attn_mask": "bool"}, {"attn_mask": "float"}, {"enable_gqa": True}],
    ids=["plain", "scale", "causal", "bool-mask", "additive-mask", "gqa"],
)
def test_matches_pytorch_sdpa(kwargs: dict, backend: str) -> None:
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
    with jvp_attention(backend=backend):  # type: ignore[arg-type]
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


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def denoiser_of(tiny: TinyModel) -> tuple[Denoiser, torch.Tensor, dict, torch.Tensor]:
    torch.manual_seed(0)
    native, prediction = schedule_from_diffusers_config(tiny.scheduler())
    denoiser = Denoiser(tiny.build().eval(), native, prediction)
    return denoiser, torch.randn(1, *tiny.shape), tiny.cond(1), torch.tensor([0.4 * native.t_max])


@torch.no_grad()
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_jvp_through_every_backbone(tiny: TinyModel, backend: str) -> None:
    """d x0/dt by torch.func.jvp under jvp_attention equals PyTorch's own math-attention JVP (fp32, rel err 1e-4);
    "auto" is the chunked one-pass path on CPU."""
    denoiser, x, cond, t0 = denoiser_of(tiny)

    def f(t: torch.Tensor) -> torch.Tensor:
        return denoiser(x, t, cond)

    with jvp_attention(backend=backend):  # type: ignore[arg-type]
        out, dot = torch.func.jvp(f, (t0,), (torch.ones_like(t0),))
    with sdpa_kernel(SDPBackend.MATH):
        out_ref, dot_ref = torch.func.jvp(f, (t0,), (torch.ones_like(t0),))
    assert rel_err(out, out_ref) <= 1e-4 and rel_err(dot, dot_ref) <= 1e-4
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dot, dot_ref, rtol=1e-4, atol=1e-5 * float(dot_ref.abs().max()))


def test_primal_backward_through_every_backbone(tiny: TinyModel) -> None:
    """.backward() through the route (the LSE backward of the chunked path) equals autograd of math attention: the
    gradient of every parameter and of the input, fp32."""
    denoiser, x, cond, t0 = denoiser_of(tiny)
    weight = torch.randn(1, *tiny.shape, generator=torch.Generator().manual_seed(3))
    leaves = dict(denoiser.named_parameters())

    def grads(context: object) -> dict[str, torch.Tensor]:
        x_leaf = x.clone().requires_grad_()
        with context:  # type: ignore[attr-defined]
            loss = (denoiser(x_leaf, t0, cond) * weight).sum()
        values = torch.autograd.grad(loss, [x_leaf, *leaves.values()], allow_unused=True)
        return {name: g for name, g in zip(["x", *leaves], values, strict=True) if g is not None}

    ours, ref = grads(jvp_attention()), grads(sdpa_kernel(SDPBackend.MATH))
    assert ours.keys() == ref.keys() and len(ref) > 1
    flat = [torch.cat([g.flatten() for g in d.values()]) for d in (ours, ref)]
    assert rel_err(*flat) <= 1e-4
    scale = max(float(g.norm()) for g in ref.values())
    for name in ref:  # the floor covers gradients that are zero up to rounding (a key bias shifts a softmax row)
        assert float((ours[name] - ref[name]).norm()) <= 1e-4 * float(ref[name].norm()) + 1e-6 * scale, name


def test_route_takes_any_sdpa_layout() -> None:
    """3-d (heads, N, D) and 5-d inputs, bool and float masks, MQA without enable_gqa, all as math SDPA gives them."""
    g = torch.Generator().manual_seed(0)
    q5, k5 = torch.randn(2, 3, 4, 7, 8, generator=g), torch.randn(2, 3, 4, 9, 8, generator=g)
    mask = torch.rand(3, 1, 7, 9, generator=g) > 0.4
    mask[..., 0] = True
    for q, k, kwargs in [
        (q5[0, 0], k5[0, 0], {}),
        (q5, k5, {"attn_mask": mask}),
        (q5, k5, {"attn_mask": torch.randn(4, 7, 9, generator=g)}),
        (q5, k5[:, :, :1], {}),
    ]:
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q, k, k, **kwargs)
        torch.testing.assert_close(sdpa_with_jvp(q, k, k, **kwargs), ref)


def test_context_backend_choice() -> None:
    q, k, v = qkv(1, 2, 5, 4)
    with pytest.raises(ValueError, match="unknown attention backend"), jvp_attention(backend="flash"):  # type: ignore[arg-type]
        pass
    with jvp_attention(backend="reference"):
        with jvp_attention(backend="chunked"):
            chunked = F.scaled_dot_product_attention(q, k, v)
        reference = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(chunked, reference, rtol=1e-12, atol=1e-12)
