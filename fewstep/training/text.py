"""Prompt conditions for text-to-image and text-to-video teachers: each pipeline's own ``encode_prompt`` (through the
family table, families.py), computed once per prompt list and cached on disk.

Pipeline quirks live in families.py (which tensors encode_prompt returns, in which order, what __call__ adds) so
recipes see flat ``cond``/``uncond`` mappings only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .families import Encoded, EncodeOptions, Size, family_of, options_negative, pixel_size


@torch.no_grad()
def encode_prompts(
    pipe: Any, prompts: list[str], options: EncodeOptions | None = None, size: Size | None = None, batch: int = 64
) -> Encoded:
    """Conditions for ``prompts`` and for the unconditional branch (the negative prompt: ``options.negative``, else
    the family's default)."""
    family = family_of(pipe)
    options = options or EncodeOptions()
    options = replace(options, negative=options_negative(family, options.negative))
    size = size or pixel_size(pipe, options)
    chunks: list[dict[str, Tensor]] = []
    uncond: dict[str, Tensor] = {}
    for i in range(0, len(prompts), batch):
        cond, uncond = family.encode(pipe, prompts[i : i + batch], options, size)
        chunks.append({k: v.float().cpu() for k, v in cond.items()})
    joined = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    return joined, {k: v.float().cpu() for k, v in uncond.items()}


def cache_key(source: str, prompts: list[str], settings: Any) -> str:
    digest = hashlib.sha256(json.dumps([source, settings, prompts], default=str).encode()).hexdigest()
    return digest[:16]


def cached_prompt_conditions(
    pipe: Any, source: str, prompts: list[str], options: EncodeOptions, size: Size, cache_dir: Path
) -> Encoded:
    """``encode_prompts`` through a safetensors cache in ``cache_dir`` (keyed by teacher, prompts and options)."""
    from ..io import cached_tensors

    def compute() -> dict[str, Tensor]:
        cond, uncond = encode_prompts(pipe, prompts, options, size)
        return {**{f"cond.{k}": v for k, v in cond.items()}, **{f"uncond.{k}": v for k, v in uncond.items()}}

    key = cache_key(source, prompts, [asdict(options), asdict(size)])
    flat = cached_tensors(cache_dir / f"prompts-{key}.safetensors", compute)
    cond = {k.removeprefix("cond."): v for k, v in flat.items() if k.startswith("cond.")}
    uncond = {k.removeprefix("uncond."): v for k, v in flat.items() if k.startswith("uncond.")}
    return cond, uncond
