"""Triton kernels: the primal's backward from the saved row log-sum-exp (FlashAttention-2's backward, Dao 2023).

With P = exp(S - lse) recomputed tile by tile and D = rowsum(O_bar O) precomputed (float32):
    V_bar = P^T O_bar,   S_bar = P (O_bar V^T - D),   Q_bar = scale S_bar K,   K_bar = scale S_bar^T Q.
One kernel owns a block of keys of one key/value head and loops over the query heads of its GQA group and over
the query blocks (K_bar, V_bar); another owns a block of queries and loops over keys (Q_bar). No atomics, so the
result is deterministic. Same layouts, masks and interpreter rules as ``triton_jvp.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_jvp import (
    LOG2E,
    LaunchParams,
    check_head_dims,
    device_capability,
    dtype_flags,
    key_bias,
    load_tile,
    padded,
    tile_config,
    unit_stride,
)


@triton.jit
def _row_stats(LSE, DELTA, off, rows, N_Q):
    """lse in base 2 (+inf for rows that see no key, so their P is 0, not NaN) and D for a block of rows."""
    lse = tl.load(LSE + off + rows, mask=rows < N_Q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return lse, tl.load(DELTA + off + rows, mask=rows < N_Q, other=0.0)


@triton.jit
def attention_bwd_kv_kernel(
    Q, K, V, O_BAR, LSE, DELTA, BIAS, K_BAR, V_BAR,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_kbb, stride_kbh, stride_kbn, stride_vbb, stride_vbh, stride_vbn,
    stride_bias_b, H_KV, GROUP, N_Q, N_K, scale,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0)
    off_bhk = tl.program_id(1)
    off_b = off_bhk // H_KV
    off_hk = off_bhk % H_KV
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale = scale * LOG2E
    k = load_tile(K + off_b * stride_kb + off_hk * stride_kh, cols, offs_dk, stride_kn, N_K, HEAD_DK, UPCAST)
    v = load_tile(V + off_b * stride_vb + off_hk * stride_vh, cols, offs_dv, stride_vn, N_K, HEAD_DV, UPCAST)
    bias = tl.zeros([BLOCK_N], tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + off_b * stride_bias_b + cols, mask=cols < N_K, other=0.0) * LOG2E
    k_bar = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    v_bar = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if CAUSAL:  # queries above this key block's first key cannot see any of it
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        o_bar_base = O_BAR + off_b * stride_ob + off_h * stride_oh
        off_rows = (off_b * H_KV * GROUP + off_h) * N_Q
        for start_m in range(lo, N_Q, BLOCK_M):
            rows = start_m + offs_m
            q = load_tile(q_base, rows, offs_dk, stride_qm, N_Q, HEAD_DK, UPCAST)
            o_bar = load_tile(o_bar_base, rows, offs_dv, stride_om, N_Q, HEAD_DV, UPCAST)
            lse, delta = _row_stats(LSE, DELTA, off_rows, rows, N_Q)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale + bias[:, None]  # S^T, base 2
            visible = (cols[:, None] < N_K) & (rows[None, :] < N_Q)
            if CAUSAL:
                visible = visible & (cols[:, None] <= rows[None, :])
            p_t = tl.where(visible, tl.math.exp2(s_t - lse[None, :]), 0.0)
            v_bar = tl.dot(p_t.to(o_bar.dtype), o_bar, v_bar, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(o_bar), input_precision=PRECISION)
            s_bar_t = p_t * (dp_t - delta[None, :])
            k_bar = tl.dot(s_bar_t.to(q.dtype), q, k_bar, input_precision=PRECISION)
    mask_n = cols[:, None] < N_K
    kb_ptrs = K_BAR + off_b * stride_kbb + off_hk * stride_kbh + cols[:, None] * stride_kbn + offs_dk[None, :]
    tl.store(kb_ptrs, (k_bar * scale).to(K_BAR.dtype.element_ty), mask=mask_n & (offs_dk[None, :] < HEAD_DK))
    vb_ptrs = V_BAR + off_b * stride_vbb + off_hk * stride_vbh + cols[:, None] * stride_vbn + offs_dv[None, :]
    tl.store(vb_ptrs, v_bar.to(V_BAR.dtype.element_ty), mask=mask_n & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def attention_bwd_q_kernel(
    Q, K, V, O_BAR, LSE, DELTA, BIAS, Q_BAR,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_qbb, stride_qbh, stride_qbm,
    stride_bias_b, H, GROUP, N_Q, N_K, scale,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // GROUP
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale = scale * LOG2E
    q = load_tile(Q + off_b * stride_qb + off_h * stride_qh, rows, offs_dk, stride_qm, N_Q, HEAD_DK, UPCAST)
    o_bar = load_tile(O_BAR + off_b * stride_ob + off_h * stride_oh, rows, offs_dv, stride_om, N_Q, HEAD_DV, UPCAST)
    lse, delta = _row_stats(LSE, DELTA, off_bh * N_Q, rows, N_Q)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    q_bar = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    hi = N_K
    if CAUSAL:
        hi = tl.minimum(N_K, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(k_base, cols, offs_dk, stride_kn, N_K, HEAD_DK, UPCAST)
        v = load_tile(v_base, cols, offs_dv, stride_vn, N_K, HEAD_DV, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            s += tl.load(BIAS + off_b * stride_bias_b + cols, mask=cols < N_K, other=0.0)[None, :] * LOG2E
        visible = (cols[None, :] < N_K) & (rows[:, None] < N_Q)
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(o_bar, tl.trans(v), input_precision=PRECISION)
        s_bar = p * (dp - delta[:, None])
        q_bar = tl.dot(s_bar.to(k.dtype), k, q_bar, input_precision=PRECISION)
    qb_ptrs = Q_BAR + off_b * stride_qbb + off_h * stride_qbh + rows[:, None] * stride_qbm + offs_dk[None, :]
    qb_mask = (rows[:, None] < N_Q) & (offs_dk[None, :] < HEAD_DK)
    tl.store(qb_ptrs, (q_bar * scale).to(Q_BAR.dtype.element_ty), mask=qb_mask)


def bwd_launch_params(
    dtype: torch.dtype,
    d_k: int,
    d_v: int,
    capability: tuple[int, int] | None,
    *,
    bias: bool = False,
    causal: bool = False,
    n_q: int = 128,
    n_k: int = 128,
    blocks: tuple[int, int] | None = None,
) -> dict[str, LaunchParams]:
    """The launches of the backward, by kernel name (``attention_bwd_kv_kernel``, ``attention_bwd_q_kernel``), for
    the arguments of ``jvp_launch_params``."""
    check_head_dims(d_k, d_v)
    config = tile_config(dtype, max(d_k, d_v), capability, n_q, n_k, blocks)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    constexprs = {"HEAD_DK": d_k, "HEAD_DV": d_v, **config, "BLOCK_DK": padded(d_k), "BLOCK_DV": padded(d_v),
                  "HAS_BIAS": bias, "CAUSAL": causal, **dtype_flags(dtype, capability)}  # fmt: skip
    params = LaunchParams(constexprs, warps, stages)
    return {"attention_bwd_kv_kernel": params, "attention_bwd_q_kernel": params}


def attention_backward_triton(
    o_bar: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    scale: float,
    causal: bool,
    blocks: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(q_bar, k_bar, v_bar) of <o_bar, o>, in the dtypes of q, k, v; ``blocks`` as in ``attention_jvp_triton``."""
    b, h, n_q, d_k = q.shape
    h_kv, n_k, d_v = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v, o_bar = unit_stride(q), unit_stride(k), unit_stride(v), unit_stride(o_bar)
    delta = (o_bar.float() * o.float()).sum(-1).contiguous()  # FA2's D = rowsum(O_bar O), (B, H, Nq)
    lse = lse.to(torch.float32).contiguous()
    flat_bias, stride_bias_b = key_bias(bias, n_k)
    q_bar = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_bar = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    v_bar = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    bias_arg = flat_bias if flat_bias is not None else q
    launches = bwd_launch_params(
        q.dtype, d_k, d_v, device_capability(q), bias=flat_bias is not None, causal=causal, n_q=n_q, n_k=n_k,
        blocks=blocks,
    )  # fmt: skip
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o_bar.stride()[:3])
    kv = launches["attention_bwd_kv_kernel"]
    attention_bwd_kv_kernel[(triton.cdiv(n_k, kv.constexprs["BLOCK_N"]), b * h_kv)](
        q, k, v, o_bar, lse, delta, bias_arg, k_bar, v_bar, *strides, *k_bar.stride()[:3], *v_bar.stride()[:3],
        stride_bias_b, h_kv, h // h_kv, n_q, n_k, scale, **kv.constexprs, **kv.options(),
    )  # fmt: skip
    dq = launches["attention_bwd_q_kernel"]
    attention_bwd_q_kernel[(triton.cdiv(n_q, dq.constexprs["BLOCK_M"]), b * h)](
        q, k, v, o_bar, lse, delta, bias_arg, q_bar, *strides, *q_bar.stride()[:3],
        stride_bias_b, h, h // h_kv, n_q, n_k, scale, **dq.constexprs, **dq.options(),
    )  # fmt: skip
    return q_bar, k_bar, v_bar
