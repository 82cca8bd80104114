"""Shared fixtures: tiny diffusers models built from config in-process (no downloads)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class TinyModel:
    """A tiny backbone, an input shape and a condition builder, with the scheduler its real pipeline uses."""

    name: str
    build: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]  # one sample of x_t
    cond: Callable[[int], dict[str, Any]]  # batch -> model kwargs
    scheduler: Callable[[], Any]


def _text(batch: int, seq: int = 6, dim: int = 32) -> torch.Tensor:
    return torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(1))


def tiny_models() -> list[TinyModel]:
    import diffusers as d

    def ddim(prediction: str = "epsilon") -> Any:
        return d.DDIMScheduler(
            beta_schedule="scaled_linear", prediction_type=prediction, set_alpha_to_one=False, clip_sample=False
        )

    def flow(shift: float = 3.0) -> Any:
        return d.FlowMatchEulerDiscreteScheduler(shift=shift)

    def flow_dpm() -> Any:  # Sana's DPM-Solver on flow sigmas
        return d.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)

    def flow_unipc() -> Any:  # Wan's UniPC on flow sigmas
        return d.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)

    return [
        TinyModel(
            "UNet2DModel",
            lambda: d.UNet2DModel(
                sample_size=8,
                in_channels=2,
                out_channels=2,
                block_out_channels=(8, 16),
                layers_per_block=1,
                norm_num_groups=4,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=8,
                num_class_embeds=3,
            ),
            (2, 8, 8),
            lambda b: {"class_labels": torch.arange(b) % 3},
            lambda: d.DDPMScheduler(beta_schedule="linear", clip_sample=False),
        ),
        TinyModel(
            "UNet2DConditionModel",
            lambda: d.UNet2DConditionModel(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                block_out_channels=(8, 16),
                layers_per_block=1,
                norm_num_groups=4,
                cross_attention_dim=32,
                attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                addition_embed_type="text_time",
                addition_time_embed_dim=4,
                projection_class_embeddings_input_dim=32 + 6 * 4,
                time_cond_proj_dim=8,
            ),
            (4, 8, 8),
            lambda b: {
                "encoder_hidden_states": _text(b),
                "added_cond_kwargs": {"text_embeds": torch.randn(b, 32), "time_ids": torch.ones(b, 6)},
                "timestep_cond": torch.randn(b, 8),
            },
            lambda: ddim("v_prediction"),
        ),
        TinyModel(
            "DiTTransformer2DModel",
            lambda: d.DiTTransformer2DModel(
                num_attention_heads=2,
                attention_head_dim=8,
                in_channels=2,
                out_channels=4,  # learned sigma
                num_layers=2,
                sample_size=8,
                patch_size=2,
                num_embeds_ada_norm=5,
            ),
            (2, 8, 8),
            lambda b: {"class_labels": torch.arange(b) % 5},
            ddim,
        ),
        TinyModel(
            "PixArtTransformer2DModel",
            lambda: d.PixArtTransformer2DModel(
                num_attention_heads=2,
                attention_head_dim=8,
                in_channels=2,
                out_channels=4,
                num_layers=2,
                sample_size=8,
                patch_size=2,
                cross_attention_dim=16,
                caption_channels=32,
            ),
            (2, 8, 8),
            lambda b: {"encoder_hidden_states": _text(b)},
            ddim,
        ),
        TinyModel(
            "SD3Transformer2DModel",
            lambda: d.SD3Transformer2DModel(
                sample_size=8,
                patch_size=2,
                in_channels=2,
                out_channels=2,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=32,
                caption_projection_dim=16,
                pooled_projection_dim=16,
                pos_embed_max_size=8,
            ),
            (2, 8, 8),
            lambda b: {"encoder_hidden_states": _text(b), "pooled_projections": torch.randn(b, 16)},
            flow,
        ),
        TinyModel(
            "SanaTransformer2DModel",
            lambda: d.SanaTransformer2DModel(
                in_channels=2,
                out_channels=2,
                num_attention_heads=2,
                attention_head_dim=8,
                num_layers=2,
                num_cross_attention_heads=2,
                cross_attention_head_dim=8,
                cross_attention_dim=16,
                caption_channels=32,
                sample_size=8,
                patch_size=1,
            ),
            (2, 8, 8),
            lambda b: {"encoder_hidden_states": _text(b)},
            flow_dpm,
        ),
        TinyModel(
            "FluxTransformer2DModel",
            lambda: d.FluxTransformer2DModel(
                patch_size=1,
                in_channels=8,
                out_channels=None,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=16,
                guidance_embeds=False,
                axes_dims_rope=(2, 2, 4),
            ),
            (2, 8, 8),  # packs to (16 tokens, 8 channels)
            lambda b: {"encoder_hidden_states": _text(b), "pooled_projections": torch.randn(b, 16)},
            flow,
        ),
        TinyModel(
            "WanTransformer3DModel",
            lambda: d.WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=8,
                in_channels=2,
                out_channels=2,
                text_dim=32,
                freq_dim=16,
                ffn_dim=16,
                num_layers=2,
                rope_max_seq_len=32,
            ),
            (2, 2, 8, 8),
            lambda b: {"encoder_hidden_states": _text(b)},
            flow_unipc,
        ),
    ]


TINY_MODELS = {m.name: m for m in tiny_models()} if True else {}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    torch.manual_seed(0)
    return TINY_MODELS[request.param]
