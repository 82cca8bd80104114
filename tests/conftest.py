"""Shared fixtures: tiny diffusers models built from config in-process (no downloads)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, fewstep_kernels' Triton tests run under Triton's interpreter, which is read when triton is first
# imported (torch._dynamo imports it as soon as diffusers loads, below). It changes nothing else: without CUDA,
# Triton kernels cannot run any other way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


TINY_MODELS = {m.name: m for m in tiny_models()}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    torch.manual_seed(0)
    return TINY_MODELS[request.param]


# ---------------------------------------------------------------------------------------------------------------
# Tiny text-to-image pipelines and a tiny CLIP, built in-process


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (the base alphabet of a byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tiny_clip_tokenizer() -> Any:
    """A CLIPTokenizer over the byte alphabet plus a few merges (transformers 5 wants vocab= and merges=)."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = [("t", "h"), ("th", "e</w>")]
    for token in ("th", "the</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_clip_text_config(tokenizer: Any) -> Any:
    """A 2-layer, 32-wide CLIP text encoder config over ``tokenizer`` (SD's encoder and both of SD3's)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=1,
    )  # fmt: skip


def tiny_sd_pipeline() -> Any:
    """StableDiffusionPipeline with a tiny UNet, VAE and CLIP text encoder: 16x16 images from 8x8x4 latents."""
    import diffusers as d
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    unet = d.UNet2DConditionModel(
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
    )
    vae = d.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )
    scheduler = d.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip
    return d.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def tiny_sd3_pipeline() -> Any:
    """StableDiffusion3Pipeline with a tiny SD3 transformer, VAE, two CLIP text encoders and a T5 encoder (with a
    small unigram tokenizer built in-process): 16x16 images from 8x8x4 latents."""
    import string

    import diffusers as d
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()

    def encoder() -> Any:
        return CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer))

    letters = string.ascii_lowercase
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in letters + string.digits + ".,"] + [("\u2581" + c, -2.5) for c in letters]
    t5_tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    t5_config = T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=64,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
    )
    transformer = d.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=8,
    )  # fmt: skip
    vae = d.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16, shift_factor=0.0, scaling_factor=1.0,
    )  # fmt: skip
    return d.StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, text_encoder=encoder(), tokenizer=tokenizer, text_encoder_2=encoder(),
        tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=T5EncoderModel(t5_config), tokenizer_3=t5_tokenizer,
        scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0),
    )  # fmt: skip


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_sd_pipeline`` saved as a diffusers folder (read-only for tests)."""
    folder = tmp_path_factory.mktemp("teachers") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_sd3_pipeline`` saved as a diffusers folder (read-only for tests)."""
    folder = tmp_path_factory.mktemp("teachers") / "tiny-sd3"
    tiny_sd3_pipeline().save_pretrained(folder)
    return folder


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``CONFIG.json:WEIGHTS`` for a tiny random open_clip model saved locally (what --clip takes)."""
    import json

    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "fewstep-tiny-clip.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("fewstep-tiny-clip")
    torch.save(model.state_dict(), folder / "weights.pt")
    return f"{config}:{folder / 'weights.pt'}"


@pytest.fixture(scope="session")
def random_digits(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A digits pipeline folder with a randomly perturbed (untrained) DiT: fast, and not constant in its inputs."""
    from fewstep.worlds.digits.pipeline import DigitsPipeline
    from fewstep.worlds.digits.train import make_teacher_model, teacher_scheduler

    torch.manual_seed(0)
    model = make_teacher_model()
    with torch.no_grad():
        for p in model.parameters():  # ada_norm_zero starts with a zero output
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("models") / "random-digits"
    DigitsPipeline(transformer=model, scheduler=teacher_scheduler()).save_pretrained(folder)
    return folder


def tiny_video_model() -> Any:
    """A WanTransformer3DModel for the video world's clips, far smaller than the shipped teacher's (fast tests)."""
    from diffusers import WanTransformer3DModel

    from fewstep.worlds.video.data import COND_DIM

    return WanTransformer3DModel(
        patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=12, in_channels=1, out_channels=1,
        text_dim=COND_DIM, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )  # fmt: skip


@pytest.fixture(scope="session")
def random_video(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A video-world pipeline folder with a tiny random Wan transformer (untrained: fast, not constant in inputs)."""
    from fewstep.worlds.video.pipeline import VideoDigitsPipeline
    from fewstep.worlds.video.train import video_teacher_scheduler

    torch.manual_seed(0)
    model = tiny_video_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("models") / "random-video"
    VideoDigitsPipeline(transformer=model, scheduler=video_teacher_scheduler()).save_pretrained(folder)
    return folder
