"""Tiny diffusers pipelines of every family fewstep distils, built from config in-process (no downloads).

Each ``tiny_<name>_pipeline()`` seeds ``torch.manual_seed(0)`` and returns a pipeline with random weights, small
enough that one call takes well under a second on CPU. Tokenizers are built locally: CLIP's from conftest's byte
alphabet, T5/UMT5's as a small unigram model, Gemma's as a character-level BPE with bos/eos/pad/unk.

``FAMILIES`` maps a family name to its builder; ``CALL_KWARGS`` holds the extra keyword arguments ``pipe(...)`` needs
for a tiny, fast call (image size, frames, short text sequences, ...); ``ENCODE_KWARGS`` the same for
``pipe.encode_prompt(...)``; ``VIDEO`` names the families whose output is ``.frames`` instead of ``.images``.

Schedulers are configured as the released checkpoints ship them (see the comment on each), so a test that reads the
scheduler sees what a user of the real model gets.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import torch
from conftest import tiny_clip_text_config, tiny_clip_tokenizer

# ---------------------------------------------------------------------------------------------------------------
# Tokenizers and text encoders


def tiny_t5_tokenizer() -> Any:
    """A T5Tokenizer over lowercase letters, digits and a little punctuation (a unigram model built in-process;
    pad 0, eos 1, unk 2 as in T5; capitals and other characters become <unk>). Serves T5 (PixArt, Flux, CogVideoX)
    and UMT5 (Wan): the pipelines only call it."""
    from transformers import T5Tokenizer

    letters = string.ascii_lowercase
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in letters + string.digits + ".,"] + [("\u2581" + c, -2.5) for c in letters]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_t5_encoder(tokenizer: Any, d_model: int = 32) -> Any:
    """A 1-layer T5EncoderModel of width ``d_model`` over ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
        eos_token_id=1,
    )  # fmt: skip
    return T5EncoderModel(config)


def tiny_gemma_tokenizer() -> Any:
    """A character-level GemmaTokenizer (transformers 5: ``vocab=dict, merges=[]``) with Gemma's special tokens.

    Like the real Gemma-2 tokenizer it prepends ``<bos>`` (Sana keeps token 0 of every prompt) and pads right with
    ``<pad>`` (id 0). Every printable ASCII character is a token, so no English prompt maps to ``<unk>``; there are no
    merges, so a prompt costs one token per character (Sana's default complex_human_instruction: ~1060 tokens)."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "\u2581": 4, "\n": 5}
    for c in string.ascii_letters + string.digits + string.punctuation:
        vocab[c] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, padding_side="right")


def tiny_gemma2_encoder(tokenizer: Any, hidden_size: int = 16) -> Any:
    """A 1-layer Gemma2Model (Sana's text encoder is Gemma-2-2B's decoder stack) of width ``hidden_size``."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    config._attn_implementation = "eager"  # as diffusers' Sana tests; Gemma-2 soft-caps its attention logits
    return Gemma2Model(config)


# ---------------------------------------------------------------------------------------------------------------
# Autoencoders


def _tiny_vae_kl(latent_channels: int = 4, **kwargs: Any) -> Any:
    """AutoencoderKL with two blocks: 16x16 images <-> 8x8 latents (vae_scale_factor 2)."""
    import diffusers as d

    return d.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16, **kwargs,
    )  # fmt: skip


def _tiny_vae_dc(latent_channels: int = 4) -> Any:
    """AutoencoderDC (Sana's deep-compression AE) with two stages: 32x32 images <-> 16x16 latents."""
    import diffusers as d

    return d.AutoencoderDC(
        in_channels=3, latent_channels=latent_channels, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Image pipelines


def tiny_sdxl_pipeline() -> Any:
    """StableDiffusionXLPipeline: 16x16 images from 4x8x8 latents (unet sample_size 8 x vae_scale_factor 2 = the
    pipeline's default size). Two 32-wide CLIP encoders: their penultimate hidden states are concatenated (64 =
    cross_attention_dim), text_encoder_2's projection (32) is the pooled embedding fed to the "text_time" addition."""
    import diffusers as d
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer))
    pooled_dim = 32  # text_encoder_2's projection_dim: its text_embeds are SDXL's pooled prompt embedding
    assert text_encoder_2.config.projection_dim == pooled_dim
    time_dim = 8  # each of the 6 add_time_ids (original size, crop top-left, target size) gets time_dim features
    unet = d.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=64, attention_head_dim=4, use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
    )  # fmt: skip
    # stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json
    scheduler = d.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
        timestep_spacing="leading", steps_offset=1, interpolation_type="linear", use_karras_sigmas=False,
    )  # fmt: skip
    return d.StableDiffusionXLPipeline(
        vae=_tiny_vae_kl(force_upcast=False), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tiny_clip_tokenizer(), unet=unet, scheduler=scheduler,
        image_encoder=None, feature_extractor=None, add_watermarker=False,
    )  # fmt: skip


def _tiny_pixart(pipeline_class: str) -> Any:
    import diffusers as d

    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = tiny_t5_encoder(tokenizer, d_model=32)
    transformer = d.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,  # learned sigma: 2 x in
        num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16,  # = heads x head_dim
        caption_channels=text_encoder.config.d_model, norm_num_groups=4,
    )  # fmt: skip
    # PixArt-alpha/PixArt-XL-2-1024-MS and PixArt-Sigma-XL-2-1024-MS ship DPMSolverMultistepScheduler with its
    # defaults (diffusers' conversion scripts construct it bare): linear betas 1e-4..0.02 (the DiT/ADM schedule PixArt
    # was trained on, not SD's scaled_linear), epsilon prediction, dpmsolver++ order 2.
    scheduler = d.DPMSolverMultistepScheduler(
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon",
        algorithm_type="dpmsolver++", solver_order=2,
    )  # fmt: skip
    cls = getattr(d, pipeline_class)
    return cls(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae_kl(), transformer=transformer,
        scheduler=scheduler,
    )  # fmt: skip


def tiny_pixart_alpha_pipeline() -> Any:
    """PixArtAlphaPipeline: PixArt transformer with learned sigma over 4x8x8 latents, 16x16 images, T5 text."""
    return _tiny_pixart("PixArtAlphaPipeline")


def tiny_pixart_sigma_pipeline() -> Any:
    """PixArtSigmaPipeline: the same tiny components as PixArt-alpha (the two differ in checkpoints, not classes)."""
    return _tiny_pixart("PixArtSigmaPipeline")


def _tiny_sana_transformer(**kwargs: Any) -> Any:
    import diffusers as d

    return d.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=16, patch_size=1, **kwargs,
    )  # fmt: skip


def tiny_sana_pipeline() -> Any:
    """SanaPipeline: Sana linear-attention transformer over 4x8x8 DC-AE latents, 16x16 images, Gemma-2 text."""
    import diffusers as d

    torch.manual_seed(0)
    tokenizer = tiny_gemma_tokenizer()
    # Sana_*_diffusers ship DPMSolverMultistepScheduler on flow sigmas (diffusers' convert_sana_to_diffusers.py,
    # default "flow-dpm_solver"), flow_shift 3.0 at 1024px.
    scheduler = d.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return d.SanaPipeline(
        tokenizer=tokenizer, text_encoder=tiny_gemma2_encoder(tokenizer), vae=_tiny_vae_dc(),
        transformer=_tiny_sana_transformer(), scheduler=scheduler,
    )  # fmt: skip


def tiny_sana_sprint_pipeline() -> Any:
    """SanaSprintPipeline: a guidance-embedding Sana transformer with RMS q/k norm (as Sana-Sprint's conversion and
    diffusers' tests build it), DC-AE, Gemma-2, and the sCM scheduler (TrigFlow, sigma_data 0.5)."""
    import diffusers as d

    torch.manual_seed(0)
    tokenizer = tiny_gemma_tokenizer()
    transformer = _tiny_sana_transformer(guidance_embeds=True, qk_norm="rms_norm_across_heads")
    return d.SanaSprintPipeline(
        tokenizer=tokenizer, text_encoder=tiny_gemma2_encoder(tokenizer), vae=_tiny_vae_dc(),
        transformer=transformer, scheduler=d.SCMScheduler(prediction_type="trigflow", sigma_data=0.5),
    )  # fmt: skip


def _tiny_flux(guidance_embeds: bool, scheduler: Any) -> Any:
    import diffusers as d
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))  # pooler_output (32) -> pooled_projections
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = tiny_t5_encoder(tokenizer_2, d_model=32)  # last hidden state -> encoder_hidden_states
    latent_channels = 4
    transformer = d.FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels,  # the pipeline packs 2x2 latent patches into tokens
        num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model, pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
    )  # fmt: skip
    # Flux's VAE has 16 channels, a shift and a scale; the pipeline applies both (shift_factor must not be None).
    vae = _tiny_vae_kl(
        latent_channels, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False
    )
    return d.FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip


def tiny_flux_dev_pipeline() -> Any:
    """FluxPipeline as FLUX.1-dev: guidance-distilled (guidance_embeds=True), resolution-dependent shift."""
    import diffusers as d

    # black-forest-labs/FLUX.1-dev's scheduler_config.json
    scheduler = d.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return _tiny_flux(True, scheduler)


def tiny_flux_schnell_pipeline() -> Any:
    """FluxPipeline as FLUX.1-schnell: timestep-distilled, no guidance embedding, no shift."""
    import diffusers as d

    # black-forest-labs/FLUX.1-schnell's scheduler_config.json (the dynamic-shift fields ship but are unused)
    scheduler = d.FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return _tiny_flux(False, scheduler)


# ---------------------------------------------------------------------------------------------------------------
# Video pipelines


def tiny_wan_pipeline() -> Any:
    """WanPipeline (Wan 2.1 text-to-video): 16x16 videos of 5 frames from 16x2x2x2 latents (the tiny causal VAE
    compresses 4x in time and 8x in space), UMT5 text encoder."""
    import diffusers as d
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer()
    umt5_config = UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    text_encoder = UMT5EncoderModel(umt5_config)
    vae = d.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = d.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
        text_dim=text_encoder.config.d_model, freq_dim=16, ffn_dim=16, num_layers=1, rope_max_seq_len=32,
    )  # fmt: skip
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers ships UniPCMultistepScheduler on flow sigmas with flow_shift 3.0 (Wan's
    # recommendation for 480p; 5.0 for 720p).
    scheduler = d.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, solver_order=2, solver_type="bh2",
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, final_sigmas_type="zero",
    )  # fmt: skip
    return d.WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )


def _tiny_unet_blocks(dims: str) -> dict[str, Any]:
    """The tiny SD UNet's layout (conftest's tiny_sd_pipeline) with ``dims``-D blocks: 8x8x4 latents, width 8/16."""
    return {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (8, 16), "layers_per_block": 1,
        "norm_num_groups": 4, "cross_attention_dim": 32, "attention_head_dim": 4,
        "down_block_types": (f"CrossAttnDownBlock{dims}", f"DownBlock{dims}"),
        "up_block_types": (f"UpBlock{dims}", f"CrossAttnUpBlock{dims}"),
    }  # fmt: skip


def tiny_modelscope_pipeline() -> Any:
    """TextToVideoSDPipeline (ModelScope T2V, MCM's teacher): a UNet3DConditionModel on 4x8x8 latents per frame, the
    2-D tiny VAE applied frame by frame, SD's CLIP text encoder."""
    import diffusers as d
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    unet = d.UNet3DConditionModel(**_tiny_unet_blocks("3D"))
    # damo-vilab/text-to-video-ms-1.7b ships SD's DDIMScheduler (scaled_linear 0.00085-0.012, steps_offset 1)
    scheduler = d.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip
    return d.TextToVideoSDPipeline(
        vae=_tiny_vae_kl(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )


def tiny_animatediff_pipeline() -> Any:
    """AnimateDiffPipeline (MCM's other teacher): the tiny SD UNet plus a MotionAdapter, which the pipeline turns into
    one UNetMotionModel; CLIP text encoder, the 2-D tiny VAE frame by frame."""
    import diffusers as d
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    unet = d.UNet2DConditionModel(**_tiny_unet_blocks("2D"))
    adapter = d.MotionAdapter(
        block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=4, motion_num_attention_heads=2,
        motion_max_seq_length=32,
    )  # fmt: skip
    # AnimateDiff's (and MCM demo.py's) DDIMScheduler: linear betas 0.00085-0.012, linspace spacing, steps_offset 1
    scheduler = d.DDIMScheduler(
        beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, timestep_spacing="linspace",
        steps_offset=1,
    )  # fmt: skip
    return d.AnimateDiffPipeline(
        vae=_tiny_vae_kl(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, motion_adapter=adapter,
        scheduler=scheduler, feature_extractor=None, image_encoder=None,
    )  # fmt: skip


def tiny_cogvideox_pipeline() -> Any:
    """CogVideoXPipeline (CogVideoX-2b): 16x16 videos from 4x2x2 latent frames (8x spatial, 4x temporal VAE).

    The transformer's sample_height/width/frames (2, 2, 5) give the pipeline's default call size (16x16, 5 frames);
    max_text_seq_length is 16, so calls must pass max_sequence_length=16 (the default 226 does not fit the
    positional embedding)."""
    import diffusers as d

    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = tiny_t5_encoder(tokenizer, d_model=32)
    transformer = d.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8,  # 3D sincos positions need heads x head_dim % 16 == 0
        in_channels=4, out_channels=4, time_embed_dim=4, text_embed_dim=text_encoder.config.d_model, num_layers=1,
        sample_width=2, sample_height=2, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=16,
    )  # fmt: skip
    vae = d.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )  # fmt: skip
    # THUDM/CogVideoX-2b's scheduler_config.json: v-prediction on zero-terminal-SNR scaled-linear betas, SNR shifted
    # by 3, trailing timesteps.
    scheduler = d.CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=True,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0, steps_offset=0,
        timestep_spacing="trailing",
    )  # fmt: skip
    return d.CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


# ---------------------------------------------------------------------------------------------------------------
# Registry


def in_eval_mode(build: Callable[[], Any]) -> Callable[[], Any]:
    """A builder whose networks are in eval mode, as ``from_pretrained`` leaves them (built from config they train:
    the T5 and Gemma encoders' dropout would make every encoding differ)."""

    def built() -> Any:
        pipe = build()
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        return pipe

    return built


FAMILIES: dict[str, Callable[[], Any]] = {
    name: in_eval_mode(build)
    for name, build in {
        "sdxl": tiny_sdxl_pipeline,
        "pixart_alpha": tiny_pixart_alpha_pipeline,
        "pixart_sigma": tiny_pixart_sigma_pipeline,
        "sana": tiny_sana_pipeline,
        "sana_sprint": tiny_sana_sprint_pipeline,
        "flux_dev": tiny_flux_dev_pipeline,
        "flux_schnell": tiny_flux_schnell_pipeline,
        "wan": tiny_wan_pipeline,
        "cogvideox": tiny_cogvideox_pipeline,
        "modelscope": tiny_modelscope_pipeline,
        "animatediff": tiny_animatediff_pipeline,
    }.items()
}

VIDEO = frozenset({"wan", "cogvideox", "modelscope", "animatediff"})

# Short text sequences keep the text encoders and cross-attention cheap: the pipelines' defaults are PixArt-alpha 120,
# PixArt-Sigma / Sana / Sana-Sprint 300, Flux 512 (T5 side), Wan 512 in __call__ (226 in encode_prompt), CogVideoX
# 226. CogVideoX's must equal the transformer's max_text_seq_length (16 here).
_SEQ = {"max_sequence_length": 16}
# PixArt/Sana refuse use_resolution_binning with a sample_size outside their bins (ValueError "Invalid sample size");
# the bins would also resize to 256-4096 px.
_PIXART = {"height": 16, "width": 16, "use_resolution_binning": False, "clean_caption": False, **_SEQ}
# Sana's and Sana-Sprint's __call__ prepend a 1057-character "complex human instruction" by default (encode_prompt's
# default is None). It works with the tiny tokenizer (~1060 tokens, one per character; the embeddings keep <bos> plus
# the last max_sequence_length - 1 tokens, so shapes do not change) but makes the call 4-7x slower: tests pass None.
# Sana also insists on height and width divisible by 32 (check_inputs), whatever the VAE: 32x32 -> 16x16 latents.
_SANA = {**_PIXART, "height": 32, "width": 32, "complex_human_instruction": None}

CALL_KWARGS: dict[str, dict[str, Any]] = {
    "sdxl": {"height": 16, "width": 16},  # also the default (unet sample_size 8 x vae scale 2)
    "pixart_alpha": {**_PIXART},
    "pixart_sigma": {**_PIXART},
    "sana": {**_SANA},  # default size 1024x1024
    "sana_sprint": {**_SANA},
    "flux_dev": {"height": 16, "width": 16, **_SEQ},  # default size is 128 x vae_scale_factor (256 here)
    "flux_schnell": {"height": 16, "width": 16, **_SEQ},
    "wan": {"height": 16, "width": 16, "num_frames": 5, **_SEQ},  # defaults 480x832, 81 frames
    # 9 frames -> 3 latent frames -> 9 frames again; an even latent count decodes to 4 frames each (5 -> 2 -> 8).
    "cogvideox": {"height": 16, "width": 16, "num_frames": 9, **_SEQ},  # also the defaults (transformer sample_*)
    "modelscope": {"height": 16, "width": 16, "num_frames": 4},  # default 16 frames at unet sample_size x vae scale
    "animatediff": {"height": 16, "width": 16, "num_frames": 4},
}

# Keyword arguments for ``pipe.encode_prompt(prompt, **ENCODE_KWARGS[name])``.
ENCODE_KWARGS: dict[str, dict[str, Any]] = {
    "sdxl": {"do_classifier_free_guidance": True},
    "pixart_alpha": {"do_classifier_free_guidance": True, **_SEQ},
    "pixart_sigma": {"do_classifier_free_guidance": True, **_SEQ},
    "sana": {"do_classifier_free_guidance": True, "complex_human_instruction": None, **_SEQ},
    "sana_sprint": {"complex_human_instruction": None, **_SEQ},
    "flux_dev": {"prompt_2": None, **_SEQ},
    "flux_schnell": {"prompt_2": None, **_SEQ},
    "wan": {"do_classifier_free_guidance": True, **_SEQ},
    "cogvideox": {"do_classifier_free_guidance": True, **_SEQ},
    "modelscope": {"device": "cpu", "num_images_per_prompt": 1, "do_classifier_free_guidance": True},
    "animatediff": {"device": "cpu", "num_images_per_prompt": 1, "do_classifier_free_guidance": True},
}
