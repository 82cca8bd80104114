"""The Triton kernels of fewstep_kernels (one-pass forward+JVP, LSE backward). Without a GPU they run on CPU under
the Triton interpreter, which tests/conftest.py switches on before anything imports triton (only the "triton" backend
imports fewstep_kernels' Triton modules, and nothing else in the suite selects it on CPU). bf16 is checked on GPU
only: the interpreter's bf16 arithmetic is wrong. Sizes keep the interpreter's ~ms per (program x key block) low."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS
from fewstep_kernels import attention, attention_backward_reference, attention_jvp, attention_jvp_reference
from test_attention_jvp import CASE_IDS, CASES, assert_flash_rule, attention_inputs, key_bias, math_sdpa_jvp, sdpa_mask
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it first; triton reads it when imported
triton = pytest.importorskip("triton")
from fewstep_kernels import triton_bwd, triton_jvp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = triton_jvp.interpreted() and type(triton.language.zeros).__name__ == "InterpretedFunction"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

# The chunked path's matrix (with 128 x 128 blocks the interpreter runs the 1000 x 1000 case in about a second).
TRITON_CASES, TRITON_IDS = CASES, CASE_IDS


def on_device(args: dict) -> dict:
    """Tensors of a (nested) dict moved to the test device."""
    return {k: v.to(DEVICE) if isinstance(v, Tensor) else on_device(v) if isinstance(v, dict) else v
            for k, v in args.items()}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=TRITON_IDS)
def test_triton_flash_rule(case: tuple, dtype: torch.dtype) -> None:
    """o and o_dot of the kernel against float64 torch.func.jvp(math SDPA): at most twice PyTorch's own error at the
    same dtype (plus a floor), and lse against the reference's."""
    args = attention_inputs(case, dtype)
    o_ref, o_dot_ref = math_sdpa_jvp(args, torch.float64)
    o_pt, o_dot_pt = math_sdpa_jvp(args)
    o, o_dot, lse = attention_jvp(**on_device(args), backend="triton")
    assert o.dtype == o_dot.dtype == dtype and lse.dtype == torch.float32
    assert_flash_rule(o.cpu(), o_pt, o_ref)
    assert_flash_rule(o_dot.cpu(), o_dot_pt, o_dot_ref)
    primal64 = {n: args[n].double() for n in ("q", "k", "v")}
    lse_ref = attention_jvp(**primal64, key_padding_mask=args["key_padding_mask"], causal=case[7])[2]
    torch.testing.assert_close(lse.cpu().double(), lse_ref, rtol=0, atol=1e-5)


def test_triton_zero_tangents_give_exactly_zero() -> None:
    args = on_device(attention_inputs(TRITON_CASES[1], torch.float32))
    primal_only = {k: v for k, v in args.items() if not k.endswith("_dot")}
    o_fwd = attention(**primal_only, backend="triton")
    zeros = {n + "_dot": torch.zeros_like(args[n]) for n in ("q", "k", "v")}
    for tangents in ({}, zeros):
        o, o_dot, _ = attention_jvp(**primal_only, **tangents, backend="triton")
        assert torch.equal(o_dot, torch.zeros_like(o_dot)) and torch.equal(o, o_fwd)


def test_triton_skipped_tangents_equal_zero_tangents() -> None:
    """K_dot = V_dot = None compiles the kernel without their products; the result equals passing zeros."""
    args = on_device(attention_inputs(TRITON_CASES[4], torch.float32))
    skipped = attention_jvp(**{**args, "k_dot": None, "v_dot": None}, backend="triton")[1]
    zeros = {"k_dot": torch.zeros_like(args["k"]), "v_dot": torch.zeros_like(args["v"])}
    torch.testing.assert_close(skipped, attention_jvp(**{**args, **zeros}, backend="triton")[1], rtol=0, atol=1e-6)


def test_triton_reads_strided_layouts() -> None:
    """diffusers hands attention (B, N, H, D) memory viewed as (B, H, N, D); the kernels read it in place."""
    args = attention_inputs((2, 4, 2, 50, 70, 40, 40, False, True), torch.float32)
    strided = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if isinstance(v, Tensor) and v.dim() == 4 else v)
               for k, v in args.items()}  # fmt: skip
    assert not strided["q"].is_contiguous()
    o, o_dot, _ = attention_jvp(**on_device(strided), backend="triton")
    o_ref, o_dot_ref, _ = attention_jvp(**args, backend="chunked")
    torch.testing.assert_close(o.cpu(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_dot.cpu(), o_dot_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", TRITON_CASES[1:3] + TRITON_CASES[4:], ids=TRITON_IDS[1:3] + TRITON_IDS[4:])
def test_triton_backward_flash_rule(case: tuple, dtype: torch.dtype) -> None:
    """q_bar, k_bar, v_bar from the saved lse against float64 autograd through math SDPA (FlashAttention's rule)."""
    args = attention_inputs(case, dtype)
    o_bar = torch.randn(*args["q"].shape[:-1], case[6], generator=torch.Generator().manual_seed(2)).to(dtype)

    def sdpa_grads(dtype: torch.dtype) -> tuple[Tensor, ...]:
        primals = [args[n].to(dtype).requires_grad_() for n in ("q", "k", "v")]
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(*primals, attn_mask=sdpa_mask(args), enable_gqa=True)
        return torch.autograd.grad(out, primals, o_bar.to(dtype))

    q, k, v = (on_device(args)[n] for n in ("q", "k", "v"))
    bias, scale, causal = key_bias(on_device(args)), case[5] ** -0.5, case[7]
    o, _, lse = triton_jvp.attention_jvp_triton(q, k, v, None, None, None, bias, scale, causal, with_tangent=False)
    grads = triton_bwd.attention_backward_triton(o_bar.to(DEVICE), q, k, v, o, lse, bias, scale, causal)
    for grad, pt, ref in zip(grads, sdpa_grads(dtype), sdpa_grads(torch.float64), strict=True):
        assert grad.dtype == dtype
        assert_flash_rule(grad.cpu(), pt, ref)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=["16x32", "32x16"])
@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[6]], ids=[CASE_IDS[2], CASE_IDS[5], CASE_IDS[6]])
def test_triton_small_tiles(case: tuple, blocks: tuple[int, int]) -> None:
    """Small tiles cross many key blocks (online rescaling), the causal diagonal at many offsets, and ragged edges;
    forward, tangent (one pass and from the saved lse) and backward against the float64 reference, fp32."""
    args = attention_inputs(case, torch.float32)
    q, k, v, q_dot, k_dot, v_dot = (on_device(args)[n] for n in ("q", "k", "v", "q_dot", "k_dot", "v_dot"))
    bias, scale, causal = key_bias(on_device(args)), case[5] ** -0.5, case[7]
    o, o_dot, lse = triton_jvp.attention_jvp_triton(q, k, v, q_dot, k_dot, v_dot, bias, scale, causal, blocks=blocks)
    args64 = [args[n].double() for n in ("q", "k", "v", "q_dot", "k_dot", "v_dot")]
    o_ref, o_dot_ref, lse_ref = attention_jvp_reference(*args64, key_bias(args), scale, causal)
    from_lse = triton_jvp.attention_tangent_triton(q, k, v, o, lse, q_dot, k_dot, v_dot, bias, scale, causal, blocks)
    o_bar = torch.randn_like(o_ref)
    o_bar_f = o_bar.float().to(DEVICE)
    grads = triton_bwd.attention_backward_triton(o_bar_f, q, k, v, o, lse, bias, scale, causal, blocks)
    grads_ref = attention_backward_reference(o_bar, *args64[:3], o_ref, lse_ref, key_bias(args), scale, causal)
    for x, ref in zip(
        (o, o_dot, lse, from_lse, *grads), (o_ref, o_dot_ref, lse_ref, o_dot_ref, *grads_ref), strict=True
    ):
        torch.testing.assert_close(x.cpu().double(), ref, rtol=0, atol=2e-5 * (1 + float(ref.abs().max())))


def test_torch_func_jvp_and_backward_through_triton() -> None:
    """The Function route: torch.func.jvp (Triton inside a custom op, not on functorch wrappers) and .backward()."""
    args = on_device(attention_inputs(TRITON_CASES[2], torch.float32))
    primals = tuple(args[n] for n in ("q", "k", "v"))
    tangents = tuple(args[n + "_dot"] for n in ("q", "k", "v"))

    def fn(backend: str) -> object:
        return lambda q, k, v: attention(q, k, v, causal=args["causal"], backend=backend)  # type: ignore[arg-type]

    o, o_dot = torch.func.jvp(fn("triton"), primals, tangents)
    o_ref, o_dot_ref = torch.func.jvp(fn("reference"), primals, tangents)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_dot, o_dot_ref, rtol=1e-5, atol=1e-5 * float(o_dot_ref.abs().max()))
    leaves = [[p.clone().requires_grad_() for p in primals] for _ in range(2)]
    for backend, xs in zip(("triton", "reference"), leaves, strict=True):
        fn(backend)(*xs).square().sum().backward()
    for x, x_ref in zip(*leaves, strict=True):
        assert x.grad is not None and x_ref.grad is not None
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5 * float(x_ref.grad.abs().max()))


@torch.no_grad()
@pytest.mark.parametrize("name", ["DiTTransformer2DModel", "UNet2DConditionModel", "FluxTransformer2DModel"])
def test_model_jvp_with_triton_backend(name: str) -> None:
    """d x0/dt by torch.func.jvp through tiny diffusers models on the Triton backend equals math-SDPA jvp (fp32)."""
    from fewstep.attention import jvp_attention
    from fewstep.schedules import schedule_from_diffusers_config
    from fewstep.teacher import Denoiser

    tiny = TINY_MODELS[name]
    torch.manual_seed(0)
    native, prediction = schedule_from_diffusers_config(tiny.scheduler())
    denoiser = Denoiser(tiny.build().eval().to(DEVICE), native, prediction)
    x, cond = torch.randn(1, *tiny.shape, device=DEVICE), on_device(tiny.cond(1))
    t0 = torch.tensor([0.4 * native.t_max], device=DEVICE)

    def f(t: Tensor) -> Tensor:
        return denoiser(x, t, cond)

    with jvp_attention(backend="triton"):
        out, dot = torch.func.jvp(f, (t0,), (torch.ones_like(t0),))
    with sdpa_kernel(SDPBackend.MATH):
        out_ref, dot_ref = torch.func.jvp(f, (t0,), (torch.ones_like(t0),))
    assert float((out - out_ref).norm() / out_ref.norm()) <= 1e-4
    assert float((dot - dot_ref).norm() / dot_ref.norm()) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_half_precision_on_gpu(dtype: torch.dtype, head_dim: int) -> None:
    """bf16/fp16 tensor-core path (not runnable in the interpreter): FlashAttention's rule at N = 1024 and 999."""
    for n in (1024, 999):
        args = attention_inputs((2, 4, 2, n, n, head_dim, head_dim, n == 999, n == 999), dtype)
        o_ref, o_dot_ref = math_sdpa_jvp(args, torch.float64)
        o_pt, o_dot_pt = math_sdpa_jvp(on_device(args))
        o, o_dot, _ = attention_jvp(**on_device(args), backend="triton")
        assert_flash_rule(o.cpu(), o_pt.cpu(), o_ref, floor=1e-3)
        assert_flash_rule(o_dot.cpu(), o_dot_pt.cpu(), o_dot_ref, floor=1e-3)
