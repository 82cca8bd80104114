"""Memory-efficient attention JVP in pure PyTorch: FlashAttention's online softmax over key chunks, with the tangent
carried in the same pass (the one-pass recurrence of rCM's FA2-JVP kernel, with its two tangent accumulators merged).

Same layout and conventions as ``reference.py``. Queries are processed in chunks of ``block_q`` rows and keys in
chunks of ``block_k``, so beyond inputs and outputs the extra memory is a few (B, H, block_q, block_k) tiles plus
O(N d) row state, never an Nq x Nk matrix. Runs on any device; the Triton kernel computes the same recurrence.

Per key chunk (fp32 state m, l, r per row, accumulators O~ and G~; RECIPES.md 2a):
    S = scale Q K^T + bias,   S_dot = scale (Q_dot K^T + Q K_dot^T)
    m' = max(m, rowmax S),  alpha = exp(m - m'),  P~ = exp(S - m'),  H = P~ * S_dot
    l <- alpha l + rowsum P~,   r <- alpha r + rowsum H
    O~ <- alpha O~ + P~ V,      G~ <- alpha G~ + P~ V_dot + H V
Epilogue: O = O~ / l,  mu = r / l,  O_dot = G~ / l - mu O,  lse = m + log l.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import compute_dtype, safe_lse

# Elements of one (B, H, block_q, block_k) score tile when the caller gives no block sizes: 2^21 fp32 = 8 MiB, a
# handful of which are alive at once. Large enough that Python overhead per tile is negligible on CPU.
TILE_ELEMENTS = 2**21


def _blocks(batch_heads: int, n_q: int, n_k: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """Chunk sizes: keys in chunks of up to 1024, queries filling the rest of the tile budget."""
    bk = block_k or min(n_k, 1024)
    bq = block_q or max(16, min(n_q, TILE_ELEMENTS // max(1, batch_heads * bk)))
    return max(1, bq), max(1, bk)


def _grouped(x: Tensor, heads_kv: int) -> Tensor:
    """(B, H, N, D) -> (B, Hkv, H // Hkv, N, D) view: a GQA group of query heads shares one key/value head."""
    return x.unflatten(1, (heads_kv, x.shape[1] // heads_kv))


def _grouped_bias(bias: Tensor | None, heads_kv: int, dtype: torch.dtype) -> Tensor | None:
    """A bias broadcastable to (B, H, Nq, Nk) as one broadcastable to (B, Hkv, G, Nq, Nk), in ``dtype``."""
    if bias is None:
        return None
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).to(dtype)
    return bias.unsqueeze(2) if bias.shape[1] == 1 else _grouped(bias, heads_kv)


def _masked_scores(q_c: Tensor, k_c: Tensor, bias: Tensor | None, causal: bool, rows: slice, cols: slice) -> Tensor:
    """scale Q K^T + bias for one tile (``q_c`` is pre-scaled), with keys j > i hidden when causal."""
    s = torch.matmul(q_c, k_c.transpose(-1, -2))
    if bias is not None:  # a broadcast (size-1) query or key axis of the bias is not sliced
        s.add_(bias[..., rows if bias.shape[-2] > 1 else slice(None), cols if bias.shape[-1] > 1 else slice(None)])
    if causal and cols.stop - 1 > rows.start:  # the tile crosses the diagonal
        i = torch.arange(rows.start, rows.stop, device=s.device)
        j = torch.arange(cols.start, cols.stop, device=s.device)
        s.masked_fill_(j[None, :] > i[:, None], float("-inf"))
    return s


def _add_tangent(
    g: Tensor,
    r: Tensor,
    p: Tensor,
    q_c: Tensor,
    q_dot_c: Tensor | None,
    k_c: Tensor,
    k_dot_c: Tensor | None,
    v_c: Tensor,
    v_dot_c: Tensor | None,
) -> None:
    """G~ += P~ V_dot + H V and r += rowsum H, where H = P~ * S_dot and S_dot = Q_dot K^T + Q K_dot^T (Q and Q_dot
    pre-scaled). None tangents skip their matmuls; with S_dot = 0 there is no H at all."""
    if q_dot_c is not None or k_dot_c is not None:
        s_dot = torch.matmul(q_dot_c, k_c.transpose(-1, -2)) if q_dot_c is not None else None
        if k_dot_c is not None:
            qk_dot = torch.matmul(q_c, k_dot_c.transpose(-1, -2))
            s_dot = qk_dot if s_dot is None else s_dot.add_(qk_dot)
        assert s_dot is not None
        h = s_dot.mul_(p)  # H = P~ * S_dot, in place of S_dot; hidden keys have P~ = 0
        r.add_(h.sum(-1, keepdim=True))
        g.add_(torch.matmul(h, v_c))
    if v_dot_c is not None:
        g.add_(torch.matmul(p, v_dot_c))


def _grouped_inputs(
    q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor | None, k_dot: Tensor | None, v_dot: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Queries as (B, Hkv, G, N, D) views; keys and values upcast with a singleton group axis that broadcasts
    against the G query heads sharing them."""
    h_kv, ct = k.shape[1], compute_dtype(q.dtype)

    def kv(x: Tensor | None) -> Tensor | None:
        return x.to(ct).unsqueeze(2) if x is not None else None

    q_dot5 = _grouped(q_dot, h_kv) if q_dot is not None else None
    return _grouped(q, h_kv), k.to(ct).unsqueeze(2), v.to(ct).unsqueeze(2), q_dot5, kv(k_dot), kv(v_dot)


def attention_jvp_chunked(
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
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(o (B, H, Nq, Dv), o_dot or None when ``with_tangent`` is False, lse (B, H, Nq)); None tangents are zero."""
    b, h, n_q, _ = q.shape
    h_kv, n_k, d_v = k.shape[1], k.shape[2], v.shape[-1]
    ct = compute_dtype(q.dtype)
    bq, bk = _blocks(b * h, n_q, n_k, block_q, block_k)
    if not with_tangent:
        q_dot = k_dot = v_dot = None
    q5, k5, v5, q_dot5, k_dot5, v_dot5 = _grouped_inputs(q, k, v, q_dot, k_dot, v_dot)
    bias5 = _grouped_bias(bias, h_kv, ct)
    o = q.new_empty(b, h, n_q, d_v)
    o_dot = torch.zeros_like(o) if with_tangent else None
    lse = torch.empty(b, h, n_q, dtype=ct, device=q.device)
    o5, lse5 = _grouped(o, h_kv), _grouped(lse, h_kv)
    o_dot5 = _grouped(o_dot, h_kv) if o_dot is not None else None

    for i0 in range(0, n_q, bq):
        rows = slice(i0, min(n_q, i0 + bq))
        q_c = q5[..., rows, :].to(ct) * scale  # folding the scale into Q (and Q_dot) saves a pass over each tile
        q_dot_c = q_dot5[..., rows, :].to(ct) * scale if q_dot5 is not None else None
        m = torch.full((*q_c.shape[:-1], 1), float("-inf"), dtype=ct, device=q.device)
        l, r, m_use = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
        acc = q_c.new_zeros(*q_c.shape[:-1], d_v)
        g = torch.zeros_like(acc)
        for j0 in range(0, min(n_k, rows.stop) if causal else n_k, bk):
            cols = slice(j0, min(n_k, j0 + bk))
            s = _masked_scores(q_c, k5[..., cols, :], bias5, causal, rows, cols)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_use = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with no visible key yet: avoid inf - inf
            alpha = torch.exp(m - m_use)
            p = s.sub_(m_use).exp_()  # P~, in place of S
            l.mul_(alpha).add_(p.sum(-1, keepdim=True))
            acc.mul_(alpha).add_(torch.matmul(p, v5[..., cols, :]))
            if o_dot5 is not None:
                g.mul_(alpha)
                r.mul_(alpha)
                _add_tangent(g, r, p, q_c, q_dot_c, k5[..., cols, :], _tile(k_dot5, cols), v5[..., cols, :],
                             _tile(v_dot5, cols))  # fmt: skip
            m = m_new
        l_safe = l.masked_fill(l == 0, 1.0)  # a row that saw no key: o = o_dot = 0, lse = -inf
        o_c = acc / l_safe
        o5[..., rows, :] = o_c.to(q.dtype)
        lse5[..., rows] = (m_use + torch.log(l)).squeeze(-1)
        if o_dot5 is not None:
            o_dot5[..., rows, :] = (g / l_safe - (r / l_safe) * o_c).to(q.dtype)
    return o, o_dot, lse


def _tile(x: Tensor | None, cols: slice) -> Tensor | None:
    return x[..., cols, :] if x is not None else None


def attention_tangent_chunked(
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
    block_q: int | None = None,
    block_k: int | None = None,
) -> Tensor:
    """o_dot (B, H, Nq, Dv) from a forward's saved o and lse: with P = exp(S - lse) already normalized there is no
    running max and no P V product, so the tangent costs 5 tile matmuls (what AttentionFunction.jvp runs after
    AttentionFunction.forward has produced o):
        mu = rowsum(P * S_dot),   O_dot = P V_dot + (P * S_dot) V - mu O.
    """
    b, h, n_q, _ = q.shape
    h_kv, n_k, d_v = k.shape[1], k.shape[2], v.shape[-1]
    ct = compute_dtype(q.dtype)
    bq, bk = _blocks(b * h, n_q, n_k, block_q, block_k)
    q5, k5, v5, q_dot5, k_dot5, v_dot5 = _grouped_inputs(q, k, v, q_dot, k_dot, v_dot)
    bias5 = _grouped_bias(bias, h_kv, ct)
    o5, lse5 = _grouped(o, h_kv), _grouped(safe_lse(lse.to(ct)), h_kv)
    o_dot = q.new_zeros(b, h, n_q, d_v)
    o_dot5 = _grouped(o_dot, h_kv)
    if q_dot is None and k_dot is None and v_dot is None:
        return o_dot

    for i0 in range(0, n_q, bq):
        rows = slice(i0, min(n_q, i0 + bq))
        q_c = q5[..., rows, :].to(ct) * scale
        q_dot_c = q_dot5[..., rows, :].to(ct) * scale if q_dot5 is not None else None
        g = q_c.new_zeros(*q_c.shape[:-1], d_v)
        mu = q_c.new_zeros(*q_c.shape[:-1], 1)
        for j0 in range(0, min(n_k, rows.stop) if causal else n_k, bk):
            cols = slice(j0, min(n_k, j0 + bk))
            p = _masked_scores(q_c, k5[..., cols, :], bias5, causal, rows, cols).sub_(lse5[..., rows, None]).exp_()
            _add_tangent(g, mu, p, q_c, q_dot_c, k5[..., cols, :], _tile(k_dot5, cols), v5[..., cols, :],
                         _tile(v_dot5, cols))  # fmt: skip
        o_dot5[..., rows, :] = (g - mu * o5[..., rows, :].to(ct)).to(q.dtype)
    return o_dot


def attention_backward_chunked(
    o_bar: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    scale: float,
    causal: bool,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(q_bar, k_bar, v_bar) from the saved lse, FlashAttention-2's backward tile by tile (no Nq x Nk matrix):

    P = exp(S - lse);  V_bar += P^T O_bar;  S_bar = P (O_bar V^T - D),  D = rowsum(O_bar O);
    Q_bar += scale S_bar K;  K_bar += scale S_bar^T Q (summed over each GQA group).
    """
    b, h, n_q, _ = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    ct = compute_dtype(q.dtype)
    bq, bk = _blocks(b * h, n_q, n_k, block_q, block_k)
    q5, o_bar5 = _grouped(q, h_kv), _grouped(o_bar, h_kv)
    lse5 = _grouped(safe_lse(lse.to(ct)), h_kv)
    delta5 = _grouped((o_bar.to(ct) * o.to(ct)).sum(-1), h_kv)
    bias5 = _grouped_bias(bias, h_kv, ct)
    k5, v5 = k.to(ct).unsqueeze(2), v.to(ct).unsqueeze(2)
    q_bar = torch.empty(q.shape, dtype=ct, device=q.device)
    k_bar, v_bar = torch.zeros_like(k5.squeeze(2)), torch.zeros_like(v5.squeeze(2))
    q_bar5 = _grouped(q_bar, h_kv)

    for i0 in range(0, n_q, bq):
        rows = slice(i0, min(n_q, i0 + bq))
        q_c = q5[..., rows, :].to(ct)
        o_bar_c = o_bar5[..., rows, :].to(ct)
        q_bar_c = torch.zeros_like(q_c)
        for j0 in range(0, min(n_k, rows.stop) if causal else n_k, bk):
            cols = slice(j0, min(n_k, j0 + bk))
            k_c, v_c = k5[..., cols, :], v5[..., cols, :]
            p = _masked_scores(q_c * scale, k_c, bias5, causal, rows, cols).sub_(lse5[..., rows, None]).exp_()
            v_bar[..., cols, :] += torch.matmul(p.transpose(-1, -2), o_bar_c).sum(2)
            s_bar = torch.matmul(o_bar_c, v_c.transpose(-1, -2)).sub_(delta5[..., rows, None]).mul_(p)
            q_bar_c.add_(torch.matmul(s_bar, k_c))
            k_bar[..., cols, :] += torch.matmul(s_bar.transpose(-1, -2), q_c).sum(2)
        q_bar5[..., rows, :] = q_bar_c * scale
    return q_bar.to(q.dtype), (k_bar * scale).to(k.dtype), v_bar.to(v.dtype)
