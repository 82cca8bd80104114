"""Attention with a forward-mode (JVP) rule, so torch.func.jvp runs through every diffusers backbone.

sCM needs dF/dt of the student by a JVP; PyTorch's fused attention kernels have no forward-mode rule (on CPU:
"Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu"), and torch.func.jvp over math SDPA keeps
four Nq x Nk matrices per head. ``jvp_attention()`` routes ``F.scaled_dot_product_attention`` (which every diffusers
attention processor calls by name, legacy processors and the new dispatcher alike) through
``fewstep_kernels.AttentionFunction``: its ``jvp`` computes the output and its tangent in one online-softmax pass
(fused Triton kernel on CUDA, chunked PyTorch elsewhere, O(N) extra memory) and its ``backward`` runs from the saved
log-sum-exp. The math is in kernels/README.md; tangents of one query row (s_j = scale q.k_j, p = softmax(s)):
    s_dot_j = scale (q_dot.k_j + q.k_dot_j)
    o_dot   = sum_j p_j (s_dot_j v_j + v_dot_j) - (sum_j p_j s_dot_j) o
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from fewstep_kernels import AttentionFunction, Backend, resolve_backend
from torch import Tensor

AttentionJVP = AttentionFunction  # the autograd.Function behind the route (name kept from the reference version)

_backend: ContextVar[Backend] = ContextVar("fewstep_attention_backend", default="auto")


def _as_4d(x: Tensor, lead: tuple[int, ...]) -> Tensor:
    """(..., H, N, D) -> (B, H, N, D): missing leading axes are 1; with several batch axes ``lead`` (SDPA broadcasts
    them), x is broadcast to them and they fold into one."""
    x = x.reshape((1,) * max(0, len(lead) + 3 - x.dim()) + tuple(x.shape))
    if len(lead) <= 1:
        return x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))
    return x.broadcast_to(*lead, *x.shape[-3:]).reshape(-1, *x.shape[-3:])


def attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    scale: float | None = None,
    *,
    causal: bool = False,
    backend: Backend | None = None,
) -> Tensor:
    """(..., H, Nq, D), (..., Hkv, Nk, D), (..., Hkv, Nk, Dv) -> (..., H, Nq, Dv) softmax attention with JVP and
    backward rules. ``bias`` is additive, broadcastable to (..., H, Nq, Nk), and constant; H % Hkv == 0 (GQA).
    ``backend`` defaults to the one ``jvp_attention`` set (else "auto")."""
    lead = tuple(q.shape[:-3])
    q4, k4, v4 = _as_4d(q, lead), _as_4d(k, lead), _as_4d(v, lead)
    if bias is not None:  # (..., H | 1, Nq | 1, Nk): its leading axes fold the same way as the inputs'
        bias = _as_4d(bias, lead)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    resolved = resolve_backend(backend or _backend.get(), q4, bias)
    out = AttentionFunction.apply(q4, k4, v4, bias, scale, causal, resolved)[0]
    return out.reshape(*q.shape[:-1], v.shape[-1])


def _mask_to_bias(attn_mask: Tensor | None, q: Tensor) -> Tensor | None:
    """SDPA's boolean mask (True = attend) as an additive bias (-inf hides a key); a float mask is already one."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    bias = torch.zeros(attn_mask.shape, dtype=torch.promote_types(q.dtype, torch.float32), device=attn_mask.device)
    return bias.masked_fill_(~attn_mask, float("-inf"))


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
    """Drop-in for ``F.scaled_dot_product_attention`` (same arguments) computed by ``AttentionFunction``.

    Boolean and float masks that vary only along batch and keys (padding masks, the usual diffusers case) stay on
    the fused kernels; masks that vary per query or head go to the chunked path. Key/value heads may be fewer than
    query heads whenever they divide them (GQA/MQA), with or without ``enable_gqa``.
    """
    if dropout_p != 0.0:
        raise ValueError("attention dropout has no place in distillation; set it to 0")
    return attention_jvp(query, key, value, _mask_to_bias(attn_mask, query), scale, causal=is_causal)


@contextmanager
def jvp_attention(backend: Backend = "auto") -> Iterator[None]:
    """Within the block, every ``F.scaled_dot_product_attention`` call (all diffusers processors) runs on
    ``AttentionFunction`` with ``backend``: "auto" (Triton on CUDA, chunked elsewhere; $FEWSTEP_ATTENTION_BACKEND
    overrides), "triton", "chunked" or "reference"."""
    resolve_backend(backend, torch.empty(0))  # fail early on a misspelt backend
    token = _backend.set(backend)
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa_with_jvp  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original  # type: ignore[assignment]
        _backend.reset(token)
