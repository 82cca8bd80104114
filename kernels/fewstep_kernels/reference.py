"""Upcast math reference: attention, its JVP and its backward written as the formulas, O(Nq Nk) memory.

Every function takes (B, H, Nq, D) queries and (B, Hkv, Nk, D) / (B, Hkv, Nk, Dv) keys and values with H % Hkv == 0
(query head h reads key/value head h // (H // Hkv), SDPA's ``enable_gqa`` convention), an optional additive ``bias``
broadcastable to (B, H, Nq, Nk) (-inf masks a key), and ``causal`` (key j visible to query i iff j <= i, SDPA's
top-left alignment). Arithmetic runs in float32 for half inputs and float64 for float64 inputs; outputs come back in
the input dtype, the row log-sum-exp ``lse`` (B, H, Nq) in the compute dtype. A row that sees no key gives o = 0,
o_dot = 0 and lse = -inf (PyTorch's math SDPA would give NaN).

Tangents of one query row (s_j = scale q.k_j + bias_j, p = softmax(s), o = sum_j p_j v_j):
    s_dot_j = scale (q_dot.k_j + q.k_dot_j)
    p_dot_j = p_j (s_dot_j - mu),   mu = sum_j p_j s_dot_j
    o_dot   = sum_j p_j (s_dot_j v_j + v_dot_j) - mu o
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32, float64 for float64: where softmax statistics live."""
    return torch.promote_types(dtype, torch.float32)


def expand_kv(x: Tensor, heads: int) -> Tensor:
    """(B, Hkv, N, D) -> (B, H, N, D) by repeating each key/value head for its group of query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def causal_bias(n_q: int, n_k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(Nq, Nk) additive mask, -inf above the diagonal (key j hidden from query i when j > i)."""
    hidden = torch.ones(n_q, n_k, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(n_q, n_k, dtype=dtype, device=device).masked_fill(hidden, float("-inf"))


def safe_lse(lse: Tensor) -> Tensor:
    """LSE with -inf rows (no visible key) set to +inf, so exp(s - lse) is 0 there instead of NaN."""
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _scores(q: Tensor, k: Tensor, bias: Tensor | None, scale: float, causal: bool) -> Tensor:
    """s = scale q k^T + bias (+ causal mask), (B, H, Nq, Nk) in the compute dtype of q."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if causal:
        s = s + causal_bias(s.shape[-2], s.shape[-1], s.dtype, s.device)
    return s


def _upcast(*xs: Tensor | None, heads: int | None = None) -> list[Tensor | None]:
    out = []
    for x in xs:
        if x is not None:
            x = x.to(compute_dtype(x.dtype))
            x = expand_kv(x, heads) if heads is not None else x
        out.append(x)
    return out


def attention_jvp_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_dot: Tensor | None,
    k_dot: Tensor | None,
    v_dot: Tensor | None,
    bias: Tensor | None,
    scale: float,
    causal: bool,
    with_tangent: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(o (B, H, Nq, Dv), o_dot or None when ``with_tangent`` is False, lse (B, H, Nq)); None tangents are zero."""
    heads = q.shape[1]
    qf, qf_dot = _upcast(q, q_dot)
    kf, vf, kf_dot, vf_dot = _upcast(k, v, k_dot, v_dot, heads=heads)
    assert qf is not None and kf is not None and vf is not None
    s = _scores(qf, kf, bias, scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - safe_lse(lse)[..., None])
    o = torch.matmul(p, vf)
    if not with_tangent:
        return o.to(q.dtype), None, lse
    o_dot = torch.zeros_like(o)
    if qf_dot is not None or kf_dot is not None:
        s_dot = torch.zeros_like(s)
        if qf_dot is not None:
            s_dot = s_dot + torch.matmul(qf_dot, kf.transpose(-1, -2)) * scale
        if kf_dot is not None:
            s_dot = s_dot + torch.matmul(qf, kf_dot.transpose(-1, -2)) * scale
        mu = (p * s_dot).sum(-1, keepdim=True)
        o_dot = o_dot + torch.matmul(p * s_dot, vf) - mu * o
    if vf_dot is not None:
        o_dot = o_dot + torch.matmul(p, vf_dot)
    return o.to(q.dtype), o_dot.to(q.dtype), lse


def attention_tangent_reference(
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
) -> Tensor:
    """o_dot from a forward's saved o and lse: p = exp(s - lse), o_dot = p v_dot + (p s_dot) v - mu o."""
    heads = q.shape[1]
    qf, qf_dot, of = _upcast(q, q_dot, o)
    kf, vf, kf_dot, vf_dot = _upcast(k, v, k_dot, v_dot, heads=heads)
    assert qf is not None and kf is not None and vf is not None and of is not None
    p = torch.exp(_scores(qf, kf, bias, scale, causal) - safe_lse(lse.to(qf.dtype))[..., None])
    o_dot = torch.zeros_like(of)
    if qf_dot is not None or kf_dot is not None:
        s_dot = torch.zeros_like(p)
        if qf_dot is not None:
            s_dot = s_dot + torch.matmul(qf_dot, kf.transpose(-1, -2)) * scale
        if kf_dot is not None:
            s_dot = s_dot + torch.matmul(qf, kf_dot.transpose(-1, -2)) * scale
        o_dot = torch.matmul(p * s_dot, vf) - (p * s_dot).sum(-1, keepdim=True) * of
    if vf_dot is not None:
        o_dot = o_dot + torch.matmul(p, vf_dot)
    return o_dot.to(q.dtype)


def attention_backward_reference(
    o_bar: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    scale: float,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (q_bar, k_bar, v_bar) of <o_bar, o> from the saved lse (FlashAttention-2's backward, unblocked).

    p = exp(s - lse);  v_bar = p^T o_bar;  s_bar = p (o_bar v^T - rowsum(o_bar o));  q_bar = scale s_bar k;
    k_bar = scale s_bar^T q, with GQA groups summed back onto their key/value head.
    """
    heads, heads_kv = q.shape[1], k.shape[1]
    qf, of, ob = _upcast(q, o, o_bar)
    kf, vf = _upcast(k, v, heads=heads)
    assert qf is not None and of is not None and ob is not None and kf is not None and vf is not None
    p = torch.exp(_scores(qf, kf, bias, scale, causal) - safe_lse(lse.to(qf.dtype))[..., None])
    v_bar = torch.matmul(p.transpose(-1, -2), ob)
    delta = (ob * of).sum(-1, keepdim=True)  # = rowsum(p * (o_bar v^T)): FA2's D_i
    s_bar = p * (torch.matmul(ob, vf.transpose(-1, -2)) - delta)
    q_bar = torch.matmul(s_bar, kf) * scale
    k_bar = torch.matmul(s_bar.transpose(-1, -2), qf) * scale
    b, _, n_k, _ = k_bar.shape
    k_bar = k_bar.view(b, heads_kv, heads // heads_kv, n_k, -1).sum(2)
    v_bar = v_bar.view(b, heads_kv, heads // heads_kv, n_k, -1).sum(2)
    return q_bar.to(q.dtype), k_bar.to(k.dtype), v_bar.to(v.dtype)
