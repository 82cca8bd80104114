"""fewstep_kernels: attention with a fused forward-mode (JVP) rule, for distillation recipes that need d/dt of a
network (sCM, rCM). Never imports fewstep; Triton is imported only when its backend runs.

    o, o_dot, lse = attention_jvp(q, k, v, q_dot, k_dot, v_dot)   # explicit tangents, one pass
    o = attention(q, k, v)   # an autograd.Function: torch.func.jvp and .backward() both run on the fused kernels

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "chunked" (pure PyTorch, O(N) extra memory), and
"reference" (upcast math); "auto" picks Triton on CUDA and the chunked path elsewhere ($FEWSTEP_ATTENTION_BACKEND
overrides). The math is in kernels/README.md.
"""

from .chunked import attention_backward_chunked, attention_jvp_chunked, attention_tangent_chunked
from .ops import (
    BACKEND_ENV,
    AttentionFunction,
    Backend,
    FusedJVPFunction,
    attention,
    attention_jvp,
    is_key_bias,
    resolve_backend,
    triton_available,
)
from .reference import attention_backward_reference, attention_jvp_reference, attention_tangent_reference

__all__ = [
    "BACKEND_ENV",
    "AttentionFunction",
    "Backend",
    "FusedJVPFunction",
    "attention",
    "attention_backward_chunked",
    "attention_backward_reference",
    "attention_jvp",
    "attention_jvp_chunked",
    "attention_jvp_reference",
    "attention_tangent_chunked",
    "attention_tangent_reference",
    "is_key_bias",
    "resolve_backend",
    "triton_available",
]
