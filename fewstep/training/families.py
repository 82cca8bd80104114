"""Teacher families: for each diffusers pipeline class, the components it needs, how its own ``encode_prompt`` turns
prompts into the keywords its backbone takes, and the latent image or clip its own ``__call__`` samples by default.

Everything a pipeline's ``__call__`` would choose is read from that ``__call__``'s defaults (sequence length, Sana's
complex human instruction, the embedded guidance of FLUX.1-dev and SANA-Sprint, height, width, frames), so a
distilled student is trained on the conditions it will meet at inference. ``EncodeOptions`` overrides them.

Conditions are flat mappings of per-row tensors; a key "a.b" is entry b of the nested keyword a (SDXL's
``added_cond_kwargs.time_ids``), nested by the Denoiser (``teacher.nest_kwargs``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError
from ..schedules import Flow, NoiseSchedule
from ..teacher import VIDEO_BACKBONES, backbone_of

Cond = dict[str, Tensor]
Encoded = tuple[Cond, Cond]  # (cond, one row per prompt; uncond, one row)

# Wan2.1's own negative prompt (wan/configs/shared_config.py, ``sample_neg_prompt``), which Wan's samplers and the
# Wan distillers (rCM, FastVideo, LightX2V) use for the unconditional branch of CFG; WanPipeline's default is "".
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class EncodeOptions:
    """What a pipeline's ``__call__`` would otherwise choose; None keeps its default."""

    negative: str | None = None  # None: the family's default negative prompt (Wan's), else the pipeline's
    max_sequence_length: int | None = None
    embedded_guidance: float | None = None  # FLUX.1-dev / SANA-Sprint: the scale fed to the guidance embedding
    height: int | None = None  # pixels
    width: int | None = None
    num_frames: int | None = None  # video pipelines


@dataclass(frozen=True)
class Size:
    """The pixel size a pipeline samples: height, width and (video) frames."""

    height: int
    width: int
    frames: int | None = None


@dataclass(frozen=True)
class Family:
    """How one group of pipeline classes is distilled from prompts."""

    name: str
    pipelines: tuple[str, ...]
    components: tuple[str, ...]  # components that must be present (not None) before any work starts
    encode: Callable[[Any, list[str], EncodeOptions, Size], Encoded]
    video: bool = False
    default_negative: str | None = None


def call_default(pipe: Any, name: str) -> Any:
    """The default of ``name`` in the pipeline's ``__call__`` (None when it has no such parameter)."""
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _pick(value: Any, pipe: Any, name: str) -> Any:
    return call_default(pipe, name) if value is None else value


def _device(pipe: Any) -> torch.device:
    return getattr(pipe, "_execution_device", torch.device("cpu"))


def _spatial_factor(pipe: Any) -> int:
    """Pixels per latent along height and width (video pipelines name it vae_scale_factor_spatial)."""
    return int(getattr(pipe, "vae_scale_factor_spatial", 0) or getattr(pipe, "vae_scale_factor", 8))


def _rows(values: Tensor, n: int) -> Tensor:
    return values.reshape(1, -1).expand(n, -1)


def _encode_sd(pipe: Any, part: list[str], o: EncodeOptions, size: Size) -> Encoded:
    negative = "" if o.negative is None else o.negative
    pe, ne = pipe.encode_prompt(part, _device(pipe), 1, True, negative_prompt=[negative] * len(part))
    return {"encoder_hidden_states": pe}, {"encoder_hidden_states": ne[:1]}


def _encode_sdxl(pipe: Any, part: list[str], o: EncodeOptions, size: Size) -> Encoded:
    """Two CLIP encoders, the pooled embedding of the second, and the size conditioning add_time_ids (Podell et al.
    2023, Sec. 2.2) for an uncropped image of the training size, as StableDiffusionXLPipeline builds them. With no
    negative prompt, force_zeros_for_empty_prompt (SDXL base) makes the unconditional embeddings zeros."""
    pe, ne, pooled, neg_pooled = pipe.encode_prompt(
        prompt=part, device=_device(pipe), num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=o.negative,
    )  # fmt: skip
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    projection = int(pooled.shape[-1]) if encoder_2 is None else int(encoder_2.config.projection_dim)
    hw = (size.height, size.width)
    time_ids = pipe._get_add_time_ids(hw, (0, 0), hw, dtype=pe.dtype, text_encoder_projection_dim=projection)
    n = len(part)
    cond = {
        "encoder_hidden_states": pe,
        "added_cond_kwargs.text_embeds": pooled,
        "added_cond_kwargs.time_ids": _rows(time_ids, n),
    }
    uncond = {
        "encoder_hidden_states": ne[:1],
        "added_cond_kwargs.text_embeds": neg_pooled[:1],
        "added_cond_kwargs.time_ids": _rows(time_ids, 1),
    }
    return cond, uncond


def _encode_sd3(pipe: Any, part: list[str], o: EncodeOptions, size: Size) -> Encoded:
    pe, ne, pp, npp = pipe.encode_prompt(
        prompt=part, prompt_2=None, prompt_3=None, device=_device(pipe), do_classifier_free_guidance=True,
        negative_prompt=o.negative, max_sequence_length=_pick(o.max_sequence_length, pipe, "max_sequence_length"),
    )  # fmt: skip
    return (
        {"encoder_hidden_states": pe, "pooled_projections": pp},
        {"encoder_hidden_states": ne[:1], "pooled_projections": npp[:1]},
    )


def _encode_masked_t5(pipe: Any, part: list[str], o: EncodeOptions, size: Size) -> Encoded:
    """PixArt-alpha / -sigma (T5) and Sana (Gemma): embeddings with their attention masks, the negative "" by default.
    PixArt-alpha at 1024 px (sample_size 128) also takes its resolution and aspect-ratio conditions."""
    kwargs: dict[str, Any] = {
        "clean_caption": bool(call_default(pipe, "clean_caption")),
        "max_sequence_length": _pick(o.max_sequence_length, pipe, "max_sequence_length"),
    }
    if "complex_human_instruction" in inspect.signature(pipe.encode_prompt).parameters:
        kwargs["complex_human_instruction"] = call_default(pipe, "complex_human_instruction")
    pe, pam, ne, nam = pipe.encode_prompt(
        part, do_classifier_free_guidance=True, negative_prompt=o.negative or "", device=_device(pipe), **kwargs
    )
    cond = {"encoder_hidden_states": pe, "encoder_attention_mask": pam}
    uncond = {"encoder_hidden_states": ne[:1], "encoder_attention_mask": nam[:1]}
    if type(pipe).__name__ == "PixArtAlphaPipeline" and pipe.transformer.config.sample_size == 128:
        resolution = torch.tensor([float(size.height), float(size.width)])
        aspect = torch.tensor([float(size.height / size.width)])
        for c, n in ((cond, len(part)), (uncond, 1)):
            c["added_cond_kwargs.resolution"] = _rows(resolution, n)
            c["added_cond_kwargs.aspect_ratio"] = _rows(aspect, n)
    return cond, uncond


def _encode_sana_sprint(pipe: Any, part: list[str], o: EncodeOptions, size: Size) -> Encoded:
    """SANA-Sprint embeds the guidance scale (times the transformer's guidance_embeds_scale) and has no negative
    branch; the unconditional row is the negative prompt encoded without the complex human instruction, as Sana
    encodes its negatives."""
    msl = _pick(o.max_sequence_length, pipe, "max_sequence_length")
    clean = bool(call_default(pipe, "clean_caption"))
    instruction = call_default(pipe, "complex_human_instruction")
    device = _device(pipe)
    pe, pam = pipe.encode_prompt(
        part, device=device, clean_caption=clean, max_sequence_length=msl, complex_human_instruction=instruction
    )
    ne, nam = pipe.encode_prompt([o.negative or ""], device=device, clean_caption=clean, max_sequence_length=msl)
    scale = _pick(o.embedded_guidance, pipe, "guidance_scale") * pipe.transformer.config.guidance_embeds_scale
    cond = {"encoder_hidden_states": pe, "encoder_attention_mask": pam, "guidance": torch.full((len(part),), scale)}
    uncond = {"encoder_hidden_states": ne, "encoder_attention_mask": nam, "guidance": torch.full((1,), scale)}
    return cond, uncond


def _encode_flux(pipe: Any, part: list[str], o: EncodeOptions, size: Size) -> Encoded:
    """CLIP pooled + T5 sequence. FLUX.1-dev embeds its guidance scale (FluxPipeline's guidance_scale, 3.5), schnell
    has no guidance embedding. FluxPipeline runs no negative branch by default; the unconditional row is the negative
    prompt ("" by default) encoded the same way, for recipes that guide with true CFG."""
    msl = _pick(o.max_sequence_length, pipe, "max_sequence_length")
    device = _device(pipe)
    pe, pooled, _ = pipe.encode_prompt(prompt=part, prompt_2=None, device=device, max_sequence_length=msl)
    negative = [o.negative or ""]
    ne, neg_pooled, _ = pipe.encode_prompt(prompt=negative, prompt_2=None, device=device, max_sequence_length=msl)
    cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
    uncond = {"encoder_hidden_states": ne, "pooled_projections": neg_pooled}
    if pipe.transformer.config.guidance_embeds:
        scale = float(_pick(o.embedded_guidance, pipe, "guidance_scale"))
        cond["guidance"], uncond["guidance"] = torch.full((len(part),), scale), torch.full((1,), scale)
    return cond, uncond


def _encode_umt5_video(pipe: Any, part: list[str], o: EncodeOptions, size: Size) -> Encoded:
    """WanPipeline (UMT5) and CogVideoXPipeline (T5): encode_prompt(prompt, negative_prompt, ...)."""
    pe, ne = pipe.encode_prompt(
        prompt=part, negative_prompt=o.negative or "", do_classifier_free_guidance=True,
        max_sequence_length=_pick(o.max_sequence_length, pipe, "max_sequence_length"), device=_device(pipe),
    )  # fmt: skip
    return {"encoder_hidden_states": pe}, {"encoder_hidden_states": ne[:1]}


FAMILIES: tuple[Family, ...] = (
    Family(
        "sd", ("StableDiffusionPipeline", "LatentConsistencyModelPipeline"), ("text_encoder", "tokenizer"), _encode_sd
    ),  # fmt: skip
    Family(
        "sdxl",
        ("StableDiffusionXLPipeline",),
        ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
        _encode_sdxl,
    ),  # fmt: skip
    Family(
        "sd3",
        ("StableDiffusion3Pipeline",),
        ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
        _encode_sd3,
    ),  # fmt: skip
    Family("pixart", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), ("text_encoder", "tokenizer"), _encode_masked_t5),
    Family("sana", ("SanaPipeline",), ("text_encoder", "tokenizer"), _encode_masked_t5),
    Family("sana-sprint", ("SanaSprintPipeline",), ("text_encoder", "tokenizer"), _encode_sana_sprint),
    Family(
        "flux", ("FluxPipeline",), ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), _encode_flux
    ),  # fmt: skip
    Family(
        "wan",
        ("WanPipeline",),
        ("text_encoder", "tokenizer"),
        _encode_umt5_video,
        video=True,
        default_negative=WAN_NEGATIVE_PROMPT,
    ),  # fmt: skip
    Family("cogvideox", ("CogVideoXPipeline",), ("text_encoder", "tokenizer"), _encode_umt5_video, video=True),
    # ModelScope T2V (UNet3DConditionModel) and AnimateDiff (UNetMotionModel): SD's CLIP encode_prompt, a 2-D VAE
    # applied frame by frame, latents (C, F, H, W) with F = the frames (MCM's two teachers)
    Family("modelscope", ("TextToVideoSDPipeline",), ("text_encoder", "tokenizer"), _encode_sd, video=True),
    Family("animatediff", ("AnimateDiffPipeline",), ("text_encoder", "tokenizer"), _encode_sd, video=True),
)
BY_PIPELINE = {name: family for family in FAMILIES for name in family.pipelines}


def supported_pipelines() -> list[str]:
    return sorted(BY_PIPELINE)


def family_of(pipe: Any) -> Family:
    """The family of a text-to-image or text-to-video pipeline; a one-line error for any other pipeline."""
    family = BY_PIPELINE.get(type(pipe).__name__)
    if family is None:
        raise FewstepError(
            f"distilling from prompts supports {', '.join(supported_pipelines())}, not {type(pipe).__name__}"
        )
    return family


def check_components(pipe: Any) -> Family:
    """The pipeline's family, after checking that every component it needs (and a VAE, to export and sample) is
    present: a one-line error naming the first missing one, before any work starts."""
    family = family_of(pipe)
    for name in (*family.components, "vae"):
        if getattr(pipe, name, None) is None:
            raise FewstepError(f"{type(pipe).__name__} teacher has no {name}: the {family.name} family needs it")
    if getattr(pipe, "transformer_2", None) is not None:
        raise FewstepError(
            f"{type(pipe).__name__} with two experts (transformer_2, Wan 2.2 A14B) is not supported as a teacher yet"
        )
    return family


def options_negative(family: Family, negative: str | None) -> str | None:
    """The negative prompt to encode: the user's, else the family's own default (Wan's), else the pipeline's."""
    return family.default_negative if negative is None else negative


def pixel_size(pipe: Any, o: EncodeOptions) -> Size:
    """The size the pipeline's ``__call__`` samples by default (or the one asked for)."""
    config: Any = backbone_of(pipe).config
    vsf = _spatial_factor(pipe)
    if type(pipe).__name__ == "CogVideoXPipeline":  # height None -> sample_height * vae factor, frames sample_frames
        default = Size(config.sample_height * vsf, config.sample_width * vsf, int(config.sample_frames))
    else:
        height, width = call_default(pipe, "height"), call_default(pipe, "width")
        if height is None or width is None:
            base = getattr(pipe, "default_sample_size", None) or config.sample_size
            height = width = int(base) * vsf
        default = Size(int(height), int(width), call_default(pipe, "num_frames"))
    frames = o.num_frames if o.num_frames is not None else default.frames
    return Size(o.height or default.height, o.width or default.width, frames if family_of(pipe).video else None)


def latent_shape(pipe: Any, size: Size) -> tuple[int, ...]:
    """One latent sample of the backbone at ``size``: (C, H, W) for images (Flux: the unpacked 2x2 latents),
    (C, F, H, W) for Wan, (F, C, H, W) for CogVideoX, with F the VAE's temporal compression of the frames."""
    name = type(pipe).__name__
    model: Any = backbone_of(pipe)
    channels = int(model.config.in_channels)
    vsf = _spatial_factor(pipe)
    h, w = size.height // vsf, size.width // vsf
    if name == "FluxPipeline":  # FluxPipeline.prepare_latents: 2 * (height // (vae_scale_factor * 2))
        return (channels // 4, 2 * (size.height // (vsf * 2)), 2 * (size.width // (vsf * 2)))
    if size.frames is None:
        return (channels, h, w)
    temporal = getattr(pipe, "vae_scale_factor_temporal", None)  # None: a 2-D VAE, one latent frame per frame
    frames = size.frames if temporal is None else (size.frames - 1) // int(temporal) + 1
    if name == "CogVideoXPipeline":
        p_t = model.config.patch_size_t
        if p_t is not None and frames % p_t:  # CogVideoX 1.5 pads the latent frames to a multiple of patch_size_t
            frames += p_t - frames % p_t
        return (frames, channels, h, w)
    return (channels, frames, h, w)


def dynamic_shift_schedule(pipe: Any, native: NoiseSchedule, shape: tuple[int, ...]) -> NoiseSchedule:
    """A flow teacher whose scheduler shifts its times by resolution (``use_dynamic_shifting``: FLUX.1-dev, SD3.5)
    runs at a fixed shift at the training size: exp(mu) with FluxPipeline's mu = calculate_shift(image tokens)
    (exponential time shift), or mu itself for the linear one. Other schedules come back unchanged."""
    config = pipe.scheduler.config
    if not isinstance(native, Flow) or not config.get("use_dynamic_shifting"):
        return native
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    height, width = shape[-2:]
    patch = 2 if type(pipe).__name__ == "FluxPipeline" else int(getattr(pipe.transformer.config, "patch_size", 2))
    tokens = (height // patch) * (width // patch)
    mu = calculate_shift(
        tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", 1.15),
    )  # fmt: skip
    shift = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
    return Flow(shift=shift, num_train_timesteps=native.num_train_timesteps)


def image_decoder(pipe: Any) -> Callable[[Tensor], Tensor] | None:
    """x0 latents (B, C, h, w), as the Denoiser holds them, -> images (B, 3, H, W) in [0, 1] through the pipeline's
    frozen VAE, differentiable in x0 (a reward on decoded images, ReFL-style): z / scaling_factor + shift_factor, as
    the pipelines decode (SD, SDXL and PixArt have no shift; SD3 and Flux do; Sana's DC-AE has its own scaling).
    None for video teachers (their clips decode frame by frame through a temporal VAE) and pipelines without a VAE."""
    vae = getattr(pipe, "vae", None)
    scaling = getattr(getattr(vae, "config", None), "scaling_factor", None)
    if vae is None or scaling is None or type(backbone_of(pipe)).__name__ in VIDEO_BACKBONES:
        return None
    vae.requires_grad_(False).eval()
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def decode(x0: Tensor) -> Tensor:
        z = (x0 / scaling + shift).to(vae.dtype)
        return ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    return decode
