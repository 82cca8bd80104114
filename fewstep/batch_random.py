"""Random draws for a training batch that may be one slice of a larger, global batch.

When the Trainer runs on several processes, each holds a slice of the global batch (``batch_slice``). Every
per-sample draw a recipe makes goes through these functions: they draw the numbers of the *whole* global batch from
the shared generator and keep this process's rows. So each sample gets the same noise and times whatever the number of
processes, and every process's generator advances identically, which keeps per-batch draws (a plan, a step count)
equal on all of them. On one process they are the plain torch draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_SLICE: ContextVar[tuple[int, int]] = ContextVar("fewstep_batch_slice", default=(0, 1))


@contextmanager
def batch_slice(index: int, count: int) -> Iterator[None]:
    """Within the block, batches are slice ``index`` of ``count`` equal slices of the global batch."""
    if not 0 <= index < count:
        raise ValueError(f"slice {index} of {count}")
    token = _SLICE.set((index, count))
    try:
        yield
    finally:
        _SLICE.reset(token)


def current_slice() -> tuple[int, int]:
    """(index, count) of the batch slice this process holds; (0, 1) outside ``batch_slice``."""
    return _SLICE.get()


def _draw(fn: Callable[..., Tensor], shape: Sequence[int], **kwargs: object) -> Tensor:
    index, count = _SLICE.get()
    if count == 1 or not shape:
        return fn(tuple(shape), **kwargs)
    b = shape[0]
    return fn((b * count, *shape[1:]), **kwargs)[index * b : (index + 1) * b]


def randn(shape: Sequence[int], dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
    """N(0, 1) of ``shape`` (batch first)."""
    return _draw(torch.randn, shape, dtype=dtype, device=device)


def rand(shape: Sequence[int], dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
    """U[0, 1) of ``shape`` (batch first)."""
    return _draw(torch.rand, shape, dtype=dtype, device=device)


def randint(high: int, shape: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Integers uniform in [0, high) of ``shape`` (batch first)."""
    return _draw(lambda s, **kw: torch.randint(0, high, s, **kw), shape, device=device)


def randn_like(x: Tensor) -> Tensor:
    return randn(x.shape, dtype=x.dtype, device=x.device)


def rand_like(x: Tensor) -> Tensor:
    return rand(x.shape, dtype=x.dtype, device=x.device)
