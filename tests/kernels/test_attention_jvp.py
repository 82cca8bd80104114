"""fewstep_kernels on CPU: the chunked path and the math reference against torch.func.jvp over PyTorch's math SDPA
(float64), FlashAttention's accuracy rule, identities of the tangent (zero, linearity, finite differences), the
LSE backward, and the public API. The Triton kernels run the same checks in test_attention_triton.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fewstep_kernels import (
    BACKEND_ENV,
    attention,
    attention_backward_chunked,
    attention_backward_reference,
    attention_jvp,
    attention_jvp_chunked,
    attention_jvp_reference,
    attention_tangent_chunked,
    attention_tangent_reference,
    resolve_backend,
)
from fewstep_kernels.chunked import TILE_ELEMENTS
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

# (batch, heads, kv heads, Nq, Nk, d, dv, causal, key-padding mask): odd lengths, head dims that are not powers of
# two, Lq != Lk both ways, GQA ratios 2 and 4, masks and causal, alone and together.
CASES = [
    (2, 2, 2, 15, 15, 40, 40, False, False),
    (1, 4, 2, 77, 77, 72, 72, False, True),
    (1, 4, 1, 197, 197, 80, 80, True, False),
    (1, 2, 2, 1000, 1000, 64, 64, False, False),
    (1, 2, 1, 197, 77, 128, 128, False, True),
    (2, 4, 1, 77, 1000, 64, 64, True, True),
    (1, 2, 2, 100, 37, 64, 32, True, False),
]
CASE_IDS = [f"b{c[0]}h{c[1]}kv{c[2]}-{c[3]}x{c[4]}-d{c[5]}v{c[6]}{'-causal' if c[7] else ''}{'-mask' if c[8] else ''}"
            for c in CASES]  # fmt: skip


def attention_inputs(case: tuple, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """q, k, v, their tangents and the key-padding mask of a case (every query sees at least key 0)."""
    b, h, h_kv, n_q, n_k, d, d_v, causal, masked = case
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (b, h, n_q, d), "k": (b, h_kv, n_k, d), "v": (b, h_kv, n_k, d_v)}
    args: dict[str, Any] = {}
    for name, shape in shapes.items():
        args[name] = torch.randn(shape, generator=g).to(dtype)
        args[name + "_dot"] = torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(b, n_k, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[:, 0] = True
    return {**args, "key_padding_mask": mask, "causal": causal}


def sdpa_mask(args: dict[str, Any]) -> Tensor | None:
    """The case's key-padding mask and causal rule as one SDPA boolean mask (True = attend)."""
    mask, n_q, n_k = args["key_padding_mask"], args["q"].shape[2], args["k"].shape[2]
    full = None if mask is None else mask[:, None, None, :]
    if args["causal"]:
        tril = torch.ones(n_q, n_k, dtype=torch.bool, device=args["q"].device).tril()
        full = tril if full is None else full & tril
    return full


def math_sdpa_jvp(args: dict[str, Any], dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(o, o_dot) by torch.func.jvp over PyTorch's math SDPA, in ``dtype`` (default: the inputs')."""
    cast = (lambda x: x.to(dtype)) if dtype is not None else (lambda x: x)
    mask = sdpa_mask(args)

    def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    primals = tuple(cast(args[n]) for n in ("q", "k", "v"))
    tangents = tuple(cast(args[n + "_dot"]) if args[n + "_dot"] is not None else torch.zeros_like(p)
                     for n, p in zip(("q", "k", "v"), primals, strict=True))  # fmt: skip
    with sdpa_kernel(SDPBackend.MATH):
        out, out_dot = torch.func.jvp(sdpa, primals, tangents)
    return out, out_dot


def max_err(x: Tensor, ref: Tensor) -> float:
    return float((x.double() - ref.double()).abs().max())


def assert_flash_rule(kernel: Tensor, same_dtype_math: Tensor, ref: Tensor, floor: float = 2e-7) -> None:
    """FlashAttention's test criterion: the kernel's error is at most twice that of PyTorch's math at the same dtype
    (both against the float64 reference), plus a small absolute floor scaled by the output's size."""
    bound = 2 * max_err(same_dtype_math, ref) + floor * (1 + float(ref.abs().max()))
    assert max_err(kernel, ref) <= bound, (max_err(kernel, ref), bound)


def chunked(args: dict[str, Any], **blocks: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """The chunked path with small blocks, so every case crosses several query and key chunks."""
    return attention_jvp(**args, backend="chunked") if not blocks else attention_jvp_chunked(
        *(args[n] for n in ("q", "k", "v", "q_dot", "k_dot", "v_dot")), key_bias(args),
        args["q"].shape[-1] ** -0.5, args["causal"], **blocks,
    )  # fmt: skip


def key_bias(args: dict[str, Any]) -> Tensor | None:
    mask = args["key_padding_mask"]
    if mask is None:
        return None
    return torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=torch.float64, device=mask.device).masked_fill(
        ~mask[:, None, None, :], float("-inf")
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunked_flash_rule(case: tuple, dtype: torch.dtype) -> None:
    """Primal, tangent and lse of the chunked path against float64 torch.func.jvp(math SDPA)."""
    args = attention_inputs(case, dtype)
    o_ref, o_dot_ref = math_sdpa_jvp(args, torch.float64)
    o_pt, o_dot_pt = math_sdpa_jvp(args)
    o, o_dot, lse = chunked(args, block_q=64, block_k=96)
    assert o.dtype == o_dot.dtype == dtype and lse.dtype == torch.float32
    assert_flash_rule(o, o_pt, o_ref)
    assert_flash_rule(o_dot, o_dot_pt, o_dot_ref)
    bias = key_bias(args)
    s = torch.matmul(args["q"].double(), args["k"].double().repeat_interleave(case[1] // case[2], 1).mT)
    s = s * case[5] ** -0.5 + (0 if bias is None else bias)
    if args["causal"]:
        s = s.masked_fill(torch.ones(case[3], case[4], dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES[:3] + CASES[5:], ids=CASE_IDS[:3] + CASE_IDS[5:])
def test_float64_paths_match_sdpa_jvp(case: tuple) -> None:
    """In float64 the chunked path (default and small blocks) and the reference agree with math SDPA to rounding."""
    args = attention_inputs(case, torch.float64)
    o_ref, o_dot_ref = math_sdpa_jvp(args)
    ragged = chunked(args, block_q=16, block_k=5)  # tiles that meet the causal diagonal at every offset
    for o, o_dot, _ in (chunked(args), ragged, attention_jvp(**args, backend="reference")):
        torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(o_dot, o_dot_ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_zero_tangents_give_exactly_zero(backend: str) -> None:
    args = attention_inputs(CASES[1], torch.float32)
    primal_only = {k: v for k, v in args.items() if not k.endswith("_dot")}
    o_fwd = attention(**primal_only, backend=backend)  # type: ignore[arg-type]
    o, o_dot, _ = attention_jvp(**primal_only, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(o_dot, torch.zeros_like(o_dot)) and torch.equal(o, o_fwd)
    zeros = {n + "_dot": torch.zeros_like(args[n]) for n in ("q", "k", "v")}
    o, o_dot, _ = attention_jvp(**primal_only, **zeros, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(o_dot, torch.zeros_like(o_dot)) and torch.equal(o, o_fwd)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_none_tangent_equals_zero_tangent(backend: str) -> None:
    """K_dot = V_dot = None (fixed text context) skips their products and equals passing zeros."""
    args = attention_inputs(CASES[4], torch.float64)
    skipped = attention_jvp(**{**args, "k_dot": None, "v_dot": None}, backend=backend)[1]
    zeros = {"k_dot": torch.zeros_like(args["k"]), "v_dot": torch.zeros_like(args["v"])}
    torch.testing.assert_close(skipped, attention_jvp(**{**args, **zeros}, backend=backend)[1], rtol=0, atol=1e-14)


def test_tangent_is_linear() -> None:
    """JVP(a t1 + b t2) = a JVP(t1) + b JVP(t2), tangent by tangent and all together."""
    args1, args2 = attention_inputs(CASES[2], torch.float64), attention_inputs(CASES[2], torch.float64, seed=1)
    a, b = 0.7, -1.9
    mixed = {n: a * args1[n] + b * args2[n] for n in ("q_dot", "k_dot", "v_dot")}
    o_dot = chunked({**args1, **mixed}, block_q=64, block_k=64)[1]
    expected = a * chunked(args1, block_q=64, block_k=64)[1] + b * chunked({**args1, **{n: args2[n] for n in mixed}},
                                                                            block_q=64, block_k=64)[1]  # fmt: skip
    torch.testing.assert_close(o_dot, expected, rtol=1e-12, atol=1e-12)
    parts = [chunked({**args1, **{m: (args1[m] if m == n else None) for m in mixed}})[1] for n in mixed]
    torch.testing.assert_close(sum(parts), chunked(args1)[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=[CASE_IDS[1], CASE_IDS[6]])
def test_central_difference_float64(case: tuple) -> None:
    """o_dot = (o(x + eps t) - o(x - eps t)) / 2 eps + O(eps^2), independently of any autodiff."""
    args, eps = attention_inputs(case, torch.float64), 1e-5
    o_dot = chunked(args, block_q=32, block_k=32)[1]

    def shifted(sign: float) -> Tensor:
        moved = {n: args[n] + sign * eps * args[n + "_dot"] for n in ("q", "k", "v")}
        return chunked({**args, **moved, "q_dot": None, "k_dot": None, "v_dot": None}, block_q=32, block_k=32)[0]

    fd = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert max_err(o_dot, fd) <= 1e-7 * (1 + float(fd.abs().max()))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tangent_from_saved_lse(case: tuple) -> None:
    """What AttentionFunction.jvp runs: o_dot from the forward's (o, lse), chunked and reference, equals the
    one-pass o_dot (float64), including None tangents."""
    args = attention_inputs(case, torch.float64)
    names, bias, scale = ("q", "k", "v", "q_dot", "k_dot", "v_dot"), key_bias(args), case[5] ** -0.5
    o, o_dot, lse = attention_jvp_reference(*(args[n] for n in names), bias, scale, case[7])
    for tangent, blocks in (
        (attention_tangent_chunked, {"block_q": 64, "block_k": 48}),
        (attention_tangent_reference, {}),
    ):
        from_lse = tangent(args["q"], args["k"], args["v"], o, lse, args["q_dot"], args["k_dot"], args["v_dot"], bias,
                           scale, case[7], **blocks)  # fmt: skip
        torch.testing.assert_close(from_lse, o_dot, rtol=1e-11, atol=1e-11)
        q_only = tangent(args["q"], args["k"], args["v"], o, lse, args["q_dot"], None, None, bias, scale, case[7])
        expected = attention_jvp_reference(*(args[n] for n in names[:4]), None, None, bias, scale, case[7])[1]
        torch.testing.assert_close(q_only, expected, rtol=1e-11, atol=1e-11)


BackwardFn = Callable[..., tuple[Tensor, Tensor, Tensor]]


@pytest.mark.parametrize(
    "backward", [attention_backward_chunked, attention_backward_reference], ids=["chunked", "ref"]
)
@pytest.mark.parametrize("case", CASES[1:3] + CASES[4:], ids=CASE_IDS[1:3] + CASE_IDS[4:])
def test_lse_backward_matches_autograd(case: tuple, backward: BackwardFn) -> None:
    """q_bar, k_bar, v_bar from the saved lse equal autograd through math SDPA (float64)."""
    args = attention_inputs(case, torch.float64)
    o, _, lse = attention_jvp_reference(args["q"], args["k"], args["v"], None, None, None, key_bias(args),
                                        case[5] ** -0.5, args["causal"], with_tangent=False)  # fmt: skip
    o_bar = torch.randn_like(o)
    blocks = {"block_q": 64, "block_k": 48} if backward is attention_backward_chunked else {}
    grads = backward(o_bar, args["q"], args["k"], args["v"], o, lse, key_bias(args), case[5] ** -0.5, args["causal"],
                     **blocks)  # fmt: skip
    primals = [args[n].clone().requires_grad_() for n in ("q", "k", "v")]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*primals, attn_mask=sdpa_mask(args), enable_gqa=True)
    expected = torch.autograd.grad(out, primals, o_bar)
    for grad, ref in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_autograd_function_gradcheck(backend: str) -> None:
    """attention() is one op to autograd: forward-mode and reverse-mode gradcheck in float64."""
    args = attention_inputs((1, 4, 2, 6, 9, 5, 3, True, True), torch.float64)
    q, k, v = (args[n].clone().requires_grad_() for n in ("q", "k", "v"))

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(q, k, v, 0.37, key_padding_mask=args["key_padding_mask"], causal=True, backend=backend)  # type: ignore[arg-type]

    assert torch.autograd.gradcheck(fn, (q, k, v), check_forward_ad=True, check_backward_ad=True)


def test_explicit_jvp_api_backward_through_o() -> None:
    """attention_jvp's o carries the primal gradient; a gradient reaching o_dot is refused, not dropped."""
    args = attention_inputs(CASES[1], torch.float64)
    q, k, v = (args[n].clone().requires_grad_() for n in ("q", "k", "v"))
    o, o_dot, _ = attention_jvp(q, k, v, args["q_dot"], None, args["v_dot"], key_padding_mask=args["key_padding_mask"])
    o_bar = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), o_bar)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(args), enable_gqa=True)
    for grad, ref in zip(grads, torch.autograd.grad(out, (q, k, v), o_bar), strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="tangent"):
        o_dot.sum().backward()


def test_row_without_visible_keys_is_zero_not_nan() -> None:
    args = attention_inputs((2, 2, 2, 9, 12, 8, 8, False, True), torch.float64)
    args["key_padding_mask"][1] = False  # batch 1 sees nothing
    for backend in ("chunked", "reference"):
        o, o_dot, lse = attention_jvp(**args, backend=backend)
        assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.equal(o_dot[1], torch.zeros_like(o_dot[1]))
        assert torch.isinf(lse[1]).all() and torch.isfinite(o[0]).all()
        q = args["q"].clone().requires_grad_()
        attention(q, args["k"], args["v"], key_padding_mask=args["key_padding_mask"], backend=backend).sum().backward()  # type: ignore[arg-type]
        assert q.grad is not None and torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (a structural memory check, independent of the allocator)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else (out,):
            if isinstance(x, Tensor):
                self.numel = max(self.numel, x.numel())
        return out


def test_chunked_never_materializes_the_score_matrix() -> None:
    """The chunked functions are called directly (a dispatch mode does not see inside a custom op): with explicit
    blocks no tensor exceeds the inputs; with the default blocks no tensor exceeds the tile budget."""
    args = attention_inputs((1, 2, 2, 1000, 1000, 64, 64, True, True), torch.float32)
    with _LargestTensor() as largest:
        o, _, lse = chunked(args, block_q=128, block_k=128)
        attention_backward_chunked(o, args["q"], args["k"], args["v"], o, lse, key_bias(args), 0.125, True,
                                   block_q=128, block_k=128)  # fmt: skip
    assert largest.numel <= 2 * 1000 * 64 * 2  # the inputs' size: no 2 x 1000 x 1000 tile
    with _LargestTensor() as largest:
        math_sdpa_jvp(args)
    assert largest.numel >= 2 * 1000 * 1000  # the check sees what math attention allocates
    args = attention_inputs((1, 2, 2, 3000, 3000, 8, 8, False, False), torch.float32)
    with _LargestTensor() as largest:
        attention_jvp_chunked(*(args[n] for n in ("q", "k", "v", "q_dot", "k_dot", "v_dot")), None, 0.3, False)
    assert largest.numel <= TILE_ELEMENTS < 2 * 3000 * 3000


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.zeros(1, 2, 3, 4)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("auto", q) == "chunked"  # CPU
    assert resolve_backend("triton", q, torch.zeros(1, 1, 3, 5)) == "chunked"  # a per-query bias
    assert resolve_backend("triton", q.double()) == "chunked"
    assert resolve_backend("triton", q, torch.zeros(2, 1, 1, 5)) == "triton"  # key padding: the kernel's case
    wide = torch.zeros(1, 2, 3, 257)  # beyond the head dims the Triton kernels are built for
    assert resolve_backend("triton", wide) == "chunked" and resolve_backend("triton", q, v=wide) == "chunked"
    assert resolve_backend("triton", torch.zeros(1, 2, 3, 256)) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert resolve_backend("auto", q) == "reference" and resolve_backend("chunked", q) == "chunked"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", q)


def test_custom_ops_have_fake_kernels() -> None:
    """The ops trace on meta tensors (register_fake), which torch.compile and FakeTensor tracing need."""
    q, k, v = torch.empty(2, 4, 7, 40, device="meta"), torch.empty(2, 2, 9, 40, device="meta"), torch.empty(
        2, 2, 9, 24, device="meta"
    )  # fmt: skip
    o, o_dot, lse = torch.ops.fewstep_kernels.attention_fwd_jvp(q, k, v, q, None, None, None, 0.1, False, "chunked")
    assert o.shape == o_dot.shape == (2, 4, 7, 24) and lse.shape == (2, 4, 7) and lse.dtype == torch.float32
    assert (
        torch.ops.fewstep_kernels.attention_tangent(q, k, v, o, lse, q, None, None, None, 0.1, False, "chunked").shape
        == o.shape
    )
    real = [torch.randn(x.shape, dtype=torch.float64) for x in (q, k, v, q, k, v)]
    torch.library.opcheck(torch.ops.fewstep_kernels.attention_fwd_jvp.default, (*real, None, 0.1, True, "chunked"))
    o, _, lse = torch.ops.fewstep_kernels.attention_fwd_jvp(*real, None, 0.1, True, "chunked")
    torch.library.opcheck(
        torch.ops.fewstep_kernels.attention_tangent.default, (*real[:3], o, lse, *real[3:], None, 0.1, True, "chunked")
    )
    torch.library.opcheck(torch.ops.fewstep_kernels.attention_fwd.default, (*real[:3], None, 0.1, False, "reference"))
    torch.library.opcheck(
        torch.ops.fewstep_kernels.attention_bwd.default,
        (torch.randn_like(o), *real[:3], o, lse, None, 0.1, True, "chunked"),
    )


def test_wide_heads_leave_triton_on_gpus_with_99_kib_per_block() -> None:
    """SD 1.x's head dim 160 pads to 256, whose forward+JVP needs 132 KiB of shared memory per block: A100 (163 KiB)
    and H100 (227 KiB) run it on Triton; RTX 30xx/40xx, L4 and A10 (99 KiB) get the chunked path instead of a launch
    that fails with OutOfResources."""
    from fewstep_kernels.ops import triton_fits

    a100, h100, rtx4090 = 163 * 1024, 227 * 1024, 99 * 1024
    assert triton_fits(160, a100) and triton_fits(256, h100)
    assert not triton_fits(160, rtx4090) and not triton_fits(256, rtx4090)
    assert triton_fits(128, rtx4090) and triton_fits(64, rtx4090)
