"""Directional derivatives of a network: forward-mode JVP (with fewstep's attention rule) or a central finite
difference for models whose ops have no forward-mode rule.

    d/dh fn(primals + h tangents) at h = 0  ~=  (fn(p + h t) - fn(p - h t)) / 2h   (error O(h^2))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ..attention import jvp_attention

Method = Literal["auto", "jvp", "fd"]


def finite_difference(
    fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...], step: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """(fn(primals), central difference of fn along tangents with step ``step``): three evaluations."""
    out = fn(*primals)
    plus = fn(*(p + step * t for p, t in zip(primals, tangents, strict=True)))
    minus = fn(*(p - step * t for p, t in zip(primals, tangents, strict=True)))
    return out, (plus - minus) / (2 * step)


def _no_forward_rule(err: Exception) -> bool:
    text = str(err)
    return "forward AD" in text or "forward-mode" in text or "jvp" in text.lower()


def directional_derivative(
    fn: Callable[..., Tensor],
    primals: tuple[Tensor, ...],
    tangents: tuple[Tensor, ...],
    method: Method = "auto",
    fd_step: float = 1e-3,
) -> tuple[Tensor, Tensor, Method]:
    """(fn(primals), its derivative along ``tangents``, the method used).

    "jvp": ``torch.func.jvp`` under ``jvp_attention``; "fd": ``finite_difference``; "auto": jvp, falling back to fd
    (with one warning) when an op of the model has no forward-mode rule. Call under ``torch.no_grad``.
    """
    if method in ("auto", "jvp"):
        try:
            with jvp_attention():
                out, dot = torch.func.jvp(fn, primals, tangents)[:2]
            return out, dot, "jvp"
        except (RuntimeError, NotImplementedError) as err:
            if method == "jvp" or not _no_forward_rule(err):
                raise
            warnings.warn(
                f"forward-mode JVP failed ({str(err).splitlines()[0]}); using a central finite difference",
                stacklevel=2,
            )
    out, dot = finite_difference(fn, primals, tangents, fd_step)
    return out, dot, "fd"
