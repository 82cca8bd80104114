"""``fewstep teacher inspect``: what fewstep reads from a model folder (backbone, schedule, prediction type)."""

from __future__ import annotations

from .loading import load_pipeline
from .teacher import Denoiser


def describe(source: str) -> str:
    pipe = load_pipeline(source)
    denoiser = Denoiser.from_pipeline(pipe)
    model = denoiser.model
    params = sum(p.numel() for p in model.parameters())
    config = getattr(model, "config", {})
    lines = [
        f"source        {source}",
        f"pipeline      {type(pipe).__name__}",
        f"backbone      {type(model).__name__} ({params / 1e6:.2f}M parameters, {next(model.parameters()).dtype})",
        f"scheduler     {type(pipe.scheduler).__name__}",
        f"schedule      {denoiser.native.config()}",
        f"prediction    {denoiser.prediction}",
    ]
    for key in ("sample_size", "in_channels", "patch_size", "num_layers", "num_embeds_ada_norm"):
        if key in config:
            lines.append(f"{key:<13} {config[key]}")
    return "\n".join(lines)
