"""Attention with a forward-mode (JVP) rule, so torch.func.jvp runs through every diffusers backbone.

sCM needs dF/dt of the student by a JVP; PyTorch's fused attention kernels have no forward-mode rule (on CPU:
"Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu"). ``AttentionJVP`` is softmax attention
as a torch.autograd.Function with an explicit ``jvp`` and ``backward``; this file holds the reference math (O(N^2)
memory: it keeps the probabilities), and the fused kernel of ``fewstep_kernels`` plugs into the same op.

Tangents, one query row (s_j = scale q.k_j, p = softmax(s), o = sum_j p_j v_j; RECIPES.md section 2):
    s_dot_j = scale (q_dot.k_j + q.k_dot_j)
    p_dot_j = p_j (s_dot_j - sum_i p_i s_dot_i)
    o_dot   = sum_j p_dot_j v_j + p_j v_dot_j

``jvp_attention()`` routes ``F.scaled_dot_product_attention`` through this op for the duration of a block, which
covers every attention processor diffusers has (legacy processors and the new dispatcher both call it by name).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _probabilities(q: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """softmax(q k^T scale + bias), the softmax taken in at least float32."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s if bias is None else s + bias
    return torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1).to(q.dtype)


class AttentionJVP(torch.autograd.Function):
    """softmax(q k^T scale + bias) v for (..., N, D) inputs; ``bias`` is additive and carries no tangent."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:  # type: ignore[override]
        return torch.matmul(_probabilities(q, k, scale, bias), v)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        q, k, v, bias, scale = inputs
        p = _probabilities(q, k, scale, bias)  # recomputed: the reference keeps forward() free of ctx
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, p)
        ctx.save_for_forward(q, k, v, p)

    @staticmethod
    def jvp(ctx: Any, q_dot: Tensor | None, k_dot: Tensor | None, v_dot: Tensor | None, *_: Any) -> Tensor:
        q, k, v, p = ctx.saved_tensors
        s_dot = torch.zeros_like(p)
        if q_dot is not None:
            s_dot = s_dot + torch.matmul(q_dot, k.transpose(-1, -2)) * ctx.scale
        if k_dot is not None:
            s_dot = s_dot + torch.matmul(q, k_dot.transpose(-1, -2)) * ctx.scale
        p_dot = p * (s_dot - (p * s_dot).sum(-1, keepdim=True))
        o_dot = torch.matmul(p_dot, v)
        return o_dot if v_dot is None else o_dot + torch.matmul(p, v_dot)

    @staticmethod
    def backward(ctx: Any, o_bar: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        q, k, v, p = ctx.saved_tensors
        v_bar = torch.matmul(p.transpose(-1, -2), o_bar)
        p_bar = torch.matmul(o_bar, v.transpose(-1, -2))
        s_bar = p * (p_bar - (p_bar * p).sum(-1, keepdim=True))
        q_bar = torch.matmul(s_bar, k) * ctx.scale
        k_bar = torch.matmul(s_bar.transpose(-1, -2), q) * ctx.scale
        return q_bar, k_bar, v_bar, None, None


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, scale: float | None = None) -> Tensor:
    """(..., Nq, D), (..., Nk, D), (..., Nk, Dv) -> (..., Nq, Dv) softmax attention with a JVP rule."""
    return AttentionJVP.apply(q, k, v, bias, scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))


def _mask_to_bias(attn_mask: Tensor | None, is_causal: bool, q: Tensor, k: Tensor) -> Tensor | None:
    """SDPA's boolean (True = attend) or additive mask, and is_causal, as one additive bias."""
    bias = None
    if attn_mask is not None:
        bias = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf")) if (
            attn_mask.dtype == torch.bool) else attn_mask.to(q.dtype)  # fmt: skip
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        causal_bias = torch.zeros(causal.shape, dtype=q.dtype, device=q.device).masked_fill(~causal, float("-inf"))
        bias = causal_bias if bias is None else bias + causal_bias
    return bias


def sdpa_with_jvp(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` (same arguments) computed by ``AttentionJVP``."""
    if dropout_p != 0.0:
        raise ValueError("attention dropout has no place in distillation; set it to 0")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    return attention_jvp(query, key, value, _mask_to_bias(attn_mask, is_causal, query, key), scale)


@contextmanager
def jvp_attention() -> Iterator[None]:
    """Within the block, every ``F.scaled_dot_product_attention`` call (all diffusers processors) uses AttentionJVP."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa_with_jvp  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original  # type: ignore[assignment]
