"""Prompt conditions for text-to-image teachers: each pipeline's own ``encode_prompt``, mapped onto the keywords its
backbone takes, computed once per prompt list and cached on disk.

Pipeline quirks live here (which tensors encode_prompt returns, in which order) so recipes see ``cond``/``uncond``
mappings only. Supported: StableDiffusionPipeline-style (UNet2DConditionModel with one text encoder) and
StableDiffusion3Pipeline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError

Encoded = tuple[dict[str, Tensor], dict[str, Tensor]]  # (cond, one row per prompt; uncond, one row)


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: list[str], negative: str = "", batch: int = 64) -> Encoded:
    """Conditions for ``prompts`` and for the unconditional branch (the ``negative`` prompt, "" by default)."""
    device = getattr(pipe, "_execution_device", torch.device("cpu"))
    name = type(pipe).__name__
    chunks: list[dict[str, Tensor]] = []
    uncond: dict[str, Tensor] = {}
    for i in range(0, len(prompts), batch):
        part = prompts[i : i + batch]
        if name == "StableDiffusion3Pipeline":
            pe, ne, pp, npp = pipe.encode_prompt(
                prompt=part, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=True,
                negative_prompt=negative,
            )  # fmt: skip
            cond = {"encoder_hidden_states": pe, "pooled_projections": pp}
            uncond = {"encoder_hidden_states": ne[:1], "pooled_projections": npp[:1]}
        elif _single_encoder_unet(pipe):
            pe, ne = pipe.encode_prompt(part, device, 1, True, negative_prompt=[negative] * len(part))
            cond, uncond = {"encoder_hidden_states": pe}, {"encoder_hidden_states": ne[:1]}
        else:
            raise FewstepError(
                f"distilling from prompts supports StableDiffusionPipeline-style and StableDiffusion3Pipeline "
                f"teachers, not {name} yet"
            )
        chunks.append({k: v.float().cpu() for k, v in cond.items()})
    joined = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    return joined, {k: v.float().cpu() for k, v in uncond.items()}


def _single_encoder_unet(pipe: Any) -> bool:
    """StableDiffusionPipeline and its relatives: a UNet, one text encoder, encode_prompt -> (embeds, negative)."""
    return hasattr(pipe, "unet") and hasattr(pipe, "encode_prompt") and getattr(pipe, "text_encoder_2", None) is None


def cache_key(source: str, prompts: list[str], negative: str) -> str:
    digest = hashlib.sha256(json.dumps([source, negative, prompts]).encode()).hexdigest()
    return digest[:16]


def cached_prompt_conditions(pipe: Any, source: str, prompts: list[str], negative: str, cache_dir: Path) -> Encoded:
    """``encode_prompts`` through a safetensors cache in ``cache_dir`` (keyed by teacher, prompts and negative)."""
    from ..io import cached_tensors

    def compute() -> dict[str, Tensor]:
        cond, uncond = encode_prompts(pipe, prompts, negative)
        return {**{f"cond.{k}": v for k, v in cond.items()}, **{f"uncond.{k}": v for k, v in uncond.items()}}

    flat = cached_tensors(cache_dir / f"prompts-{cache_key(source, prompts, negative)}.safetensors", compute)
    cond = {k.removeprefix("cond."): v for k, v in flat.items() if k.startswith("cond.")}
    uncond = {k.removeprefix("uncond."): v for k, v in flat.items() if k.startswith("uncond.")}
    return cond, uncond


def latent_shape(model: Any) -> tuple[int, ...]:
    """(C, H, W) of the backbone's latents at its configured sample size."""
    config = model.config
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config.in_channels), int(h), int(w))
