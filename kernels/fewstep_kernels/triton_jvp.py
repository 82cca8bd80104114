"""Triton kernel: attention forward and its JVP in one online-softmax pass (imported lazily; see ops.py).

One program owns BLOCK_M query rows of one (batch, head) and streams the keys in blocks of BLOCK_N. Besides
FlashAttention-2's state (m, l, O~) it carries the tangent state of rCM's FA2-JVP kernel (Zheng et al., 2025,
NVlabs/rcm), with its two tangent accumulators merged into one (RECIPES.md 2a): r = sum P~ S_dot and
G~ = sum P~ (V_dot + S_dot V), all float32. Epilogue: O = O~/l, O_dot = G~/l - (r/l) O, lse = m + log l.

Conventions as in ``reference.py``: (B, H, N, D) layout with any strides but a unit stride on D; GQA by key/value head
h // GROUP; a per-key additive bias (B or 1, Nk) covers key-padding masks (-inf); ``causal`` hides keys j > i. Head
dims that are not powers of two are padded to one with masked loads. Tangents that are None compile out: with
K_dot = V_dot = None (cross-attention to a fixed text context) the kernel runs 4 matmuls per block instead of 6.

Inputs in float32, and any input under the Triton interpreter (TRITON_INTERPRET=1, whose bf16 arithmetic is wrong),
are upcast to float32 right after each load; on a GPU, fp16/bf16 tiles feed the tensor cores directly and the
probabilities are rounded to the input dtype before the P V products, as in FlashAttention-2.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ops import TRITON_MAX_HEAD_DIM as MAX_HEAD_DIM  # SD 1.x's 160 pads to 256; ops.py sends wider heads to "chunked"

# Globals a kernel reads must be tl.constexpr: the real compiler rejects plain floats (the interpreter does not).
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e): scores stay in base 2, the kernel calls exp2
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def load_tile(base, offs_r, offs_c, stride_r, n_r, n_c, UPCAST: tl.constexpr):
    """[R, C] tile of a row-major (stride_r, 1) matrix, zero outside (n_r, n_c); float32 when UPCAST."""
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    x = tl.load(base + offs_r[:, None] * stride_r + offs_c[None, :], mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def attention_jvp_kernel(
    Q, K, V, Q_DOT, K_DOT, V_DOT, BIAS, O, O_DOT, LSE,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_qdb, stride_qdh, stride_qdm, stride_kdb, stride_kdh, stride_kdn, stride_vdb, stride_vdh, stride_vdn,
    stride_ob, stride_oh, stride_om, stride_odb, stride_odh, stride_odm, stride_bias_b,
    H, GROUP, N_Q, N_K, scale,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_Q_DOT: tl.constexpr, HAS_K_DOT: tl.constexpr,
    HAS_V_DOT: tl.constexpr, WITH_TANGENT: tl.constexpr, FROM_LSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Writes O, LSE and (WITH_TANGENT) O_DOT; with FROM_LSE it reads O and LSE of an earlier forward instead and
    writes only O_DOT: P = exp(S - lse) is then final, so there is no running max and no P V product."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // GROUP  # GQA: the key/value head this query head reads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale = scale * LOG2E

    q = load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_dk, stride_qm, N_Q, HEAD_DK, UPCAST)
    if HAS_Q_DOT:
        q_dot = load_tile(
            Q_DOT + off_b * stride_qdb + off_h * stride_qdh, offs_m, offs_dk, stride_qdm, N_Q, HEAD_DK, UPCAST
        )
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    k_dot_base = K_DOT + off_b * stride_kdb + off_hk * stride_kdh
    v_dot_base = V_DOT + off_b * stride_vdb + off_hk * stride_vdh

    if FROM_LSE:  # the final row max: lse in base 2 (+inf for rows that see no key, so their P is 0)
        lse_row = tl.load(LSE + off_bh * N_Q + offs_m, mask=offs_m < N_Q, other=float("-inf"))
        m_i = tl.where(lse_row == float("-inf"), float("inf"), lse_row * LOG2E)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of S, base 2
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of P~
    r_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of P~ S_dot
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # O~
    g = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # G~ = sum P~ (V_dot + S_dot V)

    hi = N_K
    if CAUSAL:  # key blocks wholly right of this query block's diagonal contribute nothing
        hi = tl.minimum(N_K, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(k_base, cols, offs_dk, stride_kn, N_K, HEAD_DK, UPCAST)
        v = load_tile(v_base, cols, offs_dv, stride_vn, N_K, HEAD_DV, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            s += tl.load(BIAS + off_b * stride_bias_b + cols, mask=cols < N_K, other=0.0) * LOG2E
        visible = (cols < N_K)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        if FROM_LSE:
            p = tl.math.exp2(s - m_i[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep exp2 off inf - inf
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            if WITH_TANGENT:  # the same alpha rescales the tangent state
                g = g * alpha[:, None]
                r_i = r_i * alpha
            m_i = m_new
        if WITH_TANGENT:
            if HAS_Q_DOT or HAS_K_DOT:  # S_dot = scale (Q_dot K^T + Q K_dot^T); it is never exponentiated
                s_dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                if HAS_Q_DOT:
                    s_dot = tl.dot(q_dot, tl.trans(k), s_dot, input_precision=PRECISION)
                if HAS_K_DOT:
                    k_dot = load_tile(k_dot_base, cols, offs_dk, stride_kdn, N_K, HEAD_DK, UPCAST)
                    s_dot = tl.dot(q, tl.trans(k_dot), s_dot, input_precision=PRECISION)
                h = p * (s_dot * scale)  # H = P~ S_dot; zero wherever the key is hidden (P~ = 0)
                r_i += tl.sum(h, 1)
                g = tl.dot(h.to(v.dtype), v, g, input_precision=PRECISION)
            if HAS_V_DOT:
                v_dot = load_tile(v_dot_base, cols, offs_dv, stride_vdn, N_K, HEAD_DV, UPCAST)
                g = tl.dot(p.to(v_dot.dtype), v_dot, g, input_precision=PRECISION)

    row_ok = offs_m < N_Q
    out_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    od_ptrs = O_DOT + off_b * stride_odb + off_h * stride_odh + offs_m[:, None] * stride_odm + offs_dv[None, :]
    if FROM_LSE:  # P was normalized already: mu = r, O_dot = G - mu O
        o = tl.load(o_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(od_ptrs, (g - r_i[:, None] * o).to(O_DOT.dtype.element_ty), mask=out_mask)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that sees no key: O = O_dot = 0, lse = -inf
        o = acc / l_safe[:, None]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=out_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        tl.store(LSE + off_bh * N_Q + offs_m, lse, mask=row_ok)
        if WITH_TANGENT:
            mu = r_i / l_safe  # mu = sum_j p_j s_dot_j
            o_dot = g / l_safe[:, None] - mu[:, None] * o
            tl.store(od_ptrs, o_dot.to(O_DOT.dtype.element_ty), mask=out_mask)


def interpreted() -> bool:
    """Whether this module's kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return type(attention_jvp_kernel).__name__ == "InterpretedFunction"


def unit_stride(x: Tensor) -> Tensor:
    """The kernels index D with stride 1; any other layout of the batch, head and sequence axes is read in place."""
    return x if x.stride(-1) == 1 else x.contiguous()


def key_bias(bias: Tensor | None, n_k: int) -> tuple[Tensor | None, int]:
    """An additive bias broadcastable to (B, 1, 1, Nk) as a float32 (B or 1, Nk) matrix and its batch stride."""
    if bias is None:
        return None, 0
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    assert bias.shape[1] == bias.shape[2] == 1, "the Triton kernels take a per-key bias only"
    flat = bias[:, 0, 0, :].to(torch.float32).expand(bias.shape[0], n_k).contiguous()
    return flat, (n_k if flat.shape[0] > 1 else 0)


class LaunchParams(NamedTuple):
    """What one kernel launch is built with: its tl.constexpr arguments, warps and software-pipeline stages.
    ``aot.py`` compiles exactly these for sm_80 and sm_90 without a GPU (tests/kernels/test_kernels_compile.py)."""

    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int

    def options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def padded(head_dim: int) -> int:
    """The tile width of a head dim: tl.arange takes powers of two only."""
    return max(16, triton.next_power_of_2(head_dim))


def check_head_dims(d_k: int, d_v: int) -> None:
    if max(d_k, d_v) > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, not {d_k}, {d_v}: use 'chunked'")


def tile_config(
    dtype: torch.dtype,
    head_dim: int,
    capability: tuple[int, int] | None,
    n_q: int = 128,
    n_k: int = 128,
    blocks: tuple[int, int] | None = None,
) -> dict[str, int]:
    """Block sizes, warps and stages; ``capability`` None means the interpreter. Under the interpreter each
    (program x key block) costs milliseconds whatever its size, so tiles are as large as the problem allows; on a GPU,
    the register budget of two fp32 accumulators rules."""
    interpreter = capability is None
    if blocks is not None:
        return {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "num_warps": 4, "num_stages": 1 if interpreter else 2}
    if interpreter:
        block_m, block_n = (min(128, max(16, triton.next_power_of_2(n))) for n in (n_q, n_k))
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:  # IEEE fp32 products run on FMA units, whose operand tiles live in registers: every
        # fp32 build spills (kernels/README.md), small tiles least; 64 x 32 needs 264 KiB of shared memory at d = 256
        return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def dtype_flags(dtype: torch.dtype, capability: tuple[int, int] | None) -> dict[str, object]:
    """UPCAST: float32 tiles (fp32 inputs, and every input under the interpreter, whose bf16 is wrong)."""
    upcast = capability is None or dtype == torch.float32
    return {"UPCAST": upcast, "PRECISION": "ieee"}  # ieee: fp32 inputs get fp32 (not TF32) products


def jvp_launch_params(
    dtype: torch.dtype,
    d_k: int,
    d_v: int,
    capability: tuple[int, int] | None,
    *,
    q_dot: bool = False,
    k_dot: bool = False,
    v_dot: bool = False,
    from_lse: bool = False,
    bias: bool = False,
    causal: bool = False,
    n_q: int = 128,
    n_k: int = 128,
    blocks: tuple[int, int] | None = None,
) -> LaunchParams:
    """The launch of ``attention_jvp_kernel`` for inputs of ``dtype`` with head dims (d_k, d_v) on a device of
    compute ``capability`` (None: the interpreter). Tangent flags say which of q_dot, k_dot, v_dot are given (none:
    the forward alone); ``from_lse`` is the tangent from a saved forward."""
    check_head_dims(d_k, d_v)
    config = tile_config(dtype, max(d_k, d_v), capability, n_q, n_k, blocks)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    constexprs = {
        "HEAD_DK": d_k, "HEAD_DV": d_v, **config, "BLOCK_DK": padded(d_k), "BLOCK_DV": padded(d_v),
        "HAS_Q_DOT": q_dot, "HAS_K_DOT": k_dot, "HAS_V_DOT": v_dot, "WITH_TANGENT": q_dot or k_dot or v_dot,
        "FROM_LSE": from_lse, "HAS_BIAS": bias, "CAUSAL": causal, **dtype_flags(dtype, capability),
    }  # fmt: skip
    return LaunchParams(constexprs, warps, stages)


def device_capability(x: Tensor) -> tuple[int, int] | None:
    """The compute capability the kernels are built for (None: the interpreter runs them)."""
    if interpreted():
        return None
    if x.device.type != "cuda":
        raise RuntimeError(
            "Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before "
            "fewstep_kernels.triton_jvp is first imported, or use the 'chunked' backend"
        )
    return torch.cuda.get_device_capability(x.device)


def _launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_dot: Tensor | None,
    k_dot: Tensor | None,
    v_dot: Tensor | None,
    bias: Tensor | None,
    scale: float,
    causal: bool,
    o: Tensor,
    o_dot: Tensor | None,
    lse: Tensor,
    from_lse: bool,
    blocks: tuple[int, int] | None,
) -> None:
    b, h, n_q, d_k = q.shape
    h_kv, n_k, d_v = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    q_dot, k_dot, v_dot = (unit_stride(t) if t is not None else None for t in (q_dot, k_dot, v_dot))
    flat_bias, stride_bias_b = key_bias(bias, n_k)
    params = jvp_launch_params(
        q.dtype, d_k, d_v, device_capability(q), q_dot=q_dot is not None, k_dot=k_dot is not None,
        v_dot=v_dot is not None, from_lse=from_lse, bias=flat_bias is not None, causal=causal, n_q=n_q, n_k=n_k,
        blocks=blocks,
    )  # fmt: skip
    assert params.constexprs["WITH_TANGENT"] == (o_dot is not None)
    grid = (triton.cdiv(n_q, params.constexprs["BLOCK_M"]), b * h)
    attention_jvp_kernel[grid](
        q, k, v, q_dot if q_dot is not None else q, k_dot if k_dot is not None else k,
        v_dot if v_dot is not None else v, flat_bias if flat_bias is not None else q, o,
        o_dot if o_dot is not None else o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *(q_dot if q_dot is not None else q).stride()[:3], *(k_dot if k_dot is not None else k).stride()[:3],
        *(v_dot if v_dot is not None else v).stride()[:3], *o.stride()[:3],
        *(o_dot if o_dot is not None else o).stride()[:3], stride_bias_b,
        h, h // h_kv, n_q, n_k, scale, **params.constexprs, **params.options(),
    )  # fmt: skip


def attention_jvp_triton(
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
    blocks: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(o (B, H, Nq, Dv), o_dot or None when ``with_tangent`` is False, lse (B, H, Nq) float32) in one launch.
    ``blocks`` = (BLOCK_M, BLOCK_N) overrides the launch configuration (tests use it to cross many tiles)."""
    b, h, n_q, _ = q.shape
    o = torch.empty(b, h, n_q, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    has_tangent = with_tangent and any(t is not None for t in (q_dot, k_dot, v_dot))
    o_dot = torch.empty_like(o) if has_tangent else None
    if not has_tangent:
        q_dot = k_dot = v_dot = None
    _launch(q, k, v, q_dot, k_dot, v_dot, bias, scale, causal, o, o_dot, lse, False, blocks)
    if with_tangent and o_dot is None:
        o_dot = torch.zeros_like(o)  # every tangent None: exactly zero, no tangent work at all
    return o, o_dot, lse


def attention_tangent_triton(
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
    blocks: tuple[int, int] | None = None,
) -> Tensor:
    """o_dot from a forward's saved o and lse (the kernel's FROM_LSE mode; 5 matmuls per tile instead of 6)."""
    o_dot = torch.empty_like(o, memory_format=torch.contiguous_format)
    if q_dot is None and k_dot is None and v_dot is None:
        return o_dot.zero_()
    lse = lse.to(torch.float32).contiguous()
    _launch(q, k, v, q_dot, k_dot, v_dot, bias, scale, causal, unit_stride(o), o_dot, lse, True, blocks)
    return o_dot
