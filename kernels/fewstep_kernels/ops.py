"""The attention ops: backend choice, torch.library custom ops, and the autograd.Functions built on them.

Why custom ops: torch.func.jvp runs a Function's ``jvp`` on functorch wrapper tensors, whose storage a Triton launch
cannot read ("Cannot access storage of TensorWrapper"); a torch.library custom op (with ``register_fake``) is
unwrapped by the dispatcher first. A custom op alone is not enough either: ``register_autograd`` has no forward-mode
hook and torch.func.jvp would silently return a zero tangent. So ``AttentionFunction`` carries the ``jvp`` and
``backward`` rules and calls the kernels only through the three ops below.

Backends ("reference", "chunked", "triton") share one signature and one math (see their modules); "auto" reads
$FEWSTEP_ATTENTION_BACKEND, else picks Triton for CUDA tensors (when installed) and the chunked path elsewhere.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from .chunked import attention_backward_chunked, attention_jvp_chunked, attention_tangent_chunked
from .reference import (
    attention_backward_reference,
    attention_jvp_reference,
    attention_tangent_reference,
    compute_dtype,
)

Backend = Literal["auto", "reference", "chunked", "triton"]
BACKEND_ENV = "FEWSTEP_ATTENTION_BACKEND"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256  # the widest head the Triton launchers take (tests/kernels/test_kernels_compile.py: 256)
# Shared memory per block that a head dim above 128 (padded to 256) needs: 132 KiB for the one-pass forward+JVP in
# the sm_80 builds (kernels/README.md, "Builds for real GPUs"); 128 and below need at most 96 KiB. Consumer Ampere,
# Ada and Blackwell cards (sm_86, sm_89, sm_120) grant 99 KiB, so wide heads run on "chunked" there.
WIDE_HEAD_SHARED_BYTES = 132 * 1024


class Kernels(NamedTuple):
    """One backend: forward(+JVP) in one pass, the tangent from a saved (o, lse), and the LSE backward."""

    forward: Callable[..., tuple[Tensor, Tensor | None, Tensor]]
    tangent: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


def _triton() -> Kernels:
    from .triton_bwd import attention_backward_triton  # imports triton: only when this backend runs
    from .triton_jvp import attention_jvp_triton, attention_tangent_triton

    return Kernels(attention_jvp_triton, attention_tangent_triton, attention_backward_triton)


BACKENDS: dict[str, Callable[[], Kernels]] = {
    "reference": lambda: Kernels(attention_jvp_reference, attention_tangent_reference, attention_backward_reference),
    "chunked": lambda: Kernels(attention_jvp_chunked, attention_tangent_chunked, attention_backward_chunked),
    "triton": _triton,
}


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def is_key_bias(bias: Tensor | None) -> bool:
    """Whether ``bias`` (broadcastable to (B, H, Nq, Nk)) varies along batch and keys only, as padding masks do."""
    return bias is None or all(n == 1 for n in tuple(bias.shape)[-3:-1])


def triton_fits(head_dim: int, shared_per_block: int) -> bool:
    """Whether the Triton launch for ``head_dim`` fits a device granting ``shared_per_block`` bytes per block."""
    return head_dim <= 128 or shared_per_block >= WIDE_HEAD_SHARED_BYTES


def resolve_backend(backend: str, q: Tensor, bias: Tensor | None = None, v: Tensor | None = None) -> str:
    """The backend that will run: "auto" -> $FEWSTEP_ATTENTION_BACKEND or the device default; "triton" falls back to
    "chunked" for what its kernels do not express (a bias that varies per query or head, float64, head dims of q or
    ``v`` beyond TRITON_MAX_HEAD_DIM, wide heads on a GPU with too little shared memory per block)."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown attention backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_available() else "chunked"
    head_dim = max(q.shape[-1] if q.dim() else 0, v.shape[-1] if v is not None else 0)
    if backend == "triton" and (
        q.dtype not in TRITON_DTYPES or not is_key_bias(bias) or head_dim > TRITON_MAX_HEAD_DIM
    ):
        backend = "chunked"
    if backend == "triton" and q.is_cuda:
        shared = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
        if not triton_fits(head_dim, shared):
            backend = "chunked"
    return backend


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: the only place kernels are launched


def _empty_outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    return o, q.new_empty(q.shape[:-1], dtype=compute_dtype(q.dtype))


@torch.library.custom_op("fewstep_kernels::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, causal: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """(o, lse): the primal alone."""
    o, _, lse = BACKENDS[backend]().forward(q, k, v, None, None, None, bias, scale, causal, with_tangent=False)
    return o, lse.to(compute_dtype(q.dtype))


@attention_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, causal: bool, backend: str) -> Any:
    return _empty_outputs(q, v)


@torch.library.custom_op("fewstep_kernels::attention_fwd_jvp", mutates_args=())
def attention_fwd_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_dot: Tensor | None,
    k_dot: Tensor | None,
    v_dot: Tensor | None,
    bias: Tensor | None,
    scale: float,
    causal: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(o, o_dot, lse) in one pass; a None tangent is zero and its products are skipped."""
    o, o_dot, lse = BACKENDS[backend]().forward(q, k, v, q_dot, k_dot, v_dot, bias, scale, causal)
    assert o_dot is not None
    return o, o_dot, lse.to(compute_dtype(q.dtype))


@attention_fwd_jvp.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_dot: Tensor | None,
    k_dot: Tensor | None,
    v_dot: Tensor | None,
    bias: Tensor | None,
    scale: float,
    causal: bool,
    backend: str,
) -> Any:
    o, lse = _empty_outputs(q, v)
    return o, torch.empty_like(o), lse


@torch.library.custom_op("fewstep_kernels::attention_tangent", mutates_args=())
def attention_tangent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    q_dot: Tensor | None,
    k_dot: Tensor | None,
    v_dot: Tensor | None,
    bias: Tensor | None,
    scale: float,
    causal: bool,
    backend: str,
) -> Tensor:
    """o_dot from a forward's saved (o, lse): no running max and no P V product."""
    return BACKENDS[backend]().tangent(q, k, v, o, lse, q_dot, k_dot, v_dot, bias, scale, causal)


@attention_tangent.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    q_dot: Tensor | None,
    k_dot: Tensor | None,
    v_dot: Tensor | None,
    bias: Tensor | None,
    scale: float,
    causal: bool,
    backend: str,
) -> Any:
    return torch.empty_like(o, memory_format=torch.contiguous_format)


@torch.library.custom_op("fewstep_kernels::attention_bwd", mutates_args=())
def attention_bwd(
    o_bar: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    scale: float,
    causal: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(q_bar, k_bar, v_bar) of <o_bar, o> from the saved lse."""
    return BACKENDS[backend]().backward(o_bar.contiguous(), q, k, v, o, lse, bias, scale, causal)


@attention_bwd.register_fake
def _(
    o_bar: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    scale: float,
    causal: bool,
    backend: str,
) -> Any:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ---------------------------------------------------------------------------------------------------------------
# Autograd


class AttentionFunction(torch.autograd.Function):
    """(o, lse) = attention(q, k, v) with a forward-mode rule (``jvp``) and a reverse-mode rule (``backward`` from
    the saved lse), so both torch.func.jvp and .backward() run on the fused kernels. ``bias`` carries no tangent.

    An autograd.Function sees the tangents only after its forward has run, so under torch.func.jvp ``forward``
    computes (o, lse) and ``jvp`` computes o_dot from them (``attention_tangent``: 5 tile matmuls, against 2 for the
    forward and 6 for the one-pass forward+JVP of ``attention_jvp``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, causal: bool, backend: str
    ) -> tuple[Tensor, Tensor]:
        return attention_fwd(q, k, v, bias, scale, causal, backend)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        q, k, v, bias, scale, causal, backend = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # inputs without a tangent arrive as None: the kernels skip their products
        ctx.scale, ctx.causal, ctx.backend, ctx.bias = scale, causal, backend, bias
        ctx.save_for_forward(q, k, v, o, lse)
        ctx.save_for_backward(q, k, v, o, lse)

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, q_dot: Tensor | None, k_dot: Tensor | None, v_dot: Tensor | None, bias_dot: Tensor | None, *_: Any
    ) -> tuple[Tensor, None]:
        if bias_dot is not None:
            raise NotImplementedError("fewstep_kernels attention: the additive bias/mask cannot carry a tangent")
        q, k, v, o, lse = ctx.saved_tensors
        o_dot = attention_tangent(q, k, v, o, lse, q_dot, k_dot, v_dot, ctx.bias, ctx.scale, ctx.causal, ctx.backend)
        return o_dot, None

    @staticmethod
    def backward(ctx: Any, o_bar: Tensor | None, _lse_bar: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if o_bar is None:
            return (None,) * 7
        q, k, v, o, lse = ctx.saved_tensors
        q_bar, k_bar, v_bar = attention_bwd(o_bar, q, k, v, o, lse, ctx.bias, ctx.scale, ctx.causal, ctx.backend)
        return q_bar, k_bar, v_bar, None, None, None, None


class FusedJVPFunction(torch.autograd.Function):
    """(o, o_dot, lse) from explicit tangents in one pass; o is differentiable (the primal backward from lse), the
    tangent is not: a gradient reaching o_dot raises instead of being dropped."""

    @staticmethod
    def forward(  # type: ignore[override]
        q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor | None, k_dot: Tensor | None, v_dot: Tensor | None,
        bias: Tensor | None, scale: float, causal: bool, backend: str,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        return attention_fwd_jvp(q, k, v, q_dot, k_dot, v_dot, bias, scale, causal, backend)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
        q, k, v, _, _, _, bias, scale, causal, backend = inputs
        o, _, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.scale, ctx.causal, ctx.backend, ctx.bias = scale, causal, backend, bias
        ctx.save_for_backward(q, k, v, o, lse)

    @staticmethod
    def backward(ctx: Any, o_bar: Tensor | None, o_dot_bar: Tensor | None, _: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if o_dot_bar is not None:
            raise NotImplementedError("fewstep_kernels.attention_jvp: no gradient through the tangent o_dot")
        if o_bar is None:
            return (None,) * 10
        q, k, v, o, lse = ctx.saved_tensors
        q_bar, k_bar, v_bar = attention_bwd(o_bar, q, k, v, o, lse, ctx.bias, ctx.scale, ctx.causal, ctx.backend)
        return q_bar, k_bar, v_bar, *(None,) * 7


# ---------------------------------------------------------------------------------------------------------------
# Public functional API


def _prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tangents: tuple[Tensor | None, ...],
    key_padding_mask: Tensor | None,
    bias: Tensor | None,
) -> Tensor | None:
    """Checks shapes and returns the additive bias (key_padding_mask folded in as -inf), or None."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention inputs are (B, H, N, D)")
    (b, h, _, d), (bk, h_kv, n_k, dk), (bv, hv, nv, _) = q.shape, k.shape, v.shape
    if not (b == bk == bv and h_kv == hv and n_k == nv and d == dk) or n_k == 0 or h % h_kv:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    for x, x_dot in zip((q, k, v), tangents, strict=True):
        if x_dot is not None and (x_dot.shape != x.shape or x_dot.dtype != x.dtype):
            raise ValueError(f"a tangent must match its primal: {x_dot.shape} {x_dot.dtype} vs {x.shape} {x.dtype}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, n_k) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask is a (B, Nk) bool tensor, True for keys to attend to")
        pad = torch.zeros(b, 1, 1, n_k, dtype=compute_dtype(q.dtype), device=q.device)
        pad.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
        bias = pad if bias is None else bias + pad
    if bias is not None:
        if bias.requires_grad:
            raise ValueError("the attention bias is a constant here (no gradient, no tangent); detach it")
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    return bias


def _scale(q: Tensor, scale: float | None) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    backend: Backend = "auto",
) -> Tensor:
    """softmax(scale q k^T + bias) v: (B, H, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv) -> (B, H, Nq, Dv).

    Differentiable in both modes: torch.func.jvp / forward AD use the one-pass JVP, .backward() the LSE backward.
    ``key_padding_mask`` (B, Nk) is True for keys to attend to; ``bias`` is additive, broadcastable to
    (B, H, Nq, Nk), and constant (no tangent, no gradient); ``causal`` hides keys j > i (SDPA's top-left rule).
    """
    bias = _prepare(q, k, v, (None, None, None), key_padding_mask, bias)
    resolved = resolve_backend(backend, q, bias, v)
    return AttentionFunction.apply(q, k, v, bias, _scale(q, scale), causal, resolved)[0]


def attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_dot: Tensor | None = None,
    k_dot: Tensor | None = None,
    v_dot: Tensor | None = None,
    scale: float | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """(o, o_dot, lse) for callers that carry tangents by hand (rCM's FSDP / context-parallel route).

    Shapes as in ``attention``; tangents match their primals, and None means zero (with k_dot = v_dot = None, the
    fixed-text cross-attention case, two of the six matmuls are skipped). lse (B, H, Nq) is in float32 (float64 for
    float64 inputs), natural log. o is differentiable w.r.t. q, k, v; o_dot is not.
    """
    bias = _prepare(q, k, v, (q_dot, k_dot, v_dot), key_padding_mask, bias)
    args = (q, k, v, q_dot, k_dot, v_dot, bias, _scale(q, scale), causal, resolve_backend(backend, q, bias, v))
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return FusedJVPFunction.apply(*args)
    return attention_fwd_jvp(*args)
