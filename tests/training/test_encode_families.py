"""The conditions fewstep encodes for each pipeline family are the ones the pipeline itself feeds its backbone.

Identity: the Denoiser on ``encode_prompts``' conditions, at the first time of a one-step plan, gives the same x0 as
the pipeline's own ``__call__`` (one step, no CFG, the same starting latents), which returns x0 after its only step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from families import CALL_KWARGS, FAMILIES

from fewstep.errors import FewstepError
from fewstep.export.scheduling_fewstep import FewStepScheduler
from fewstep.teacher import Denoiser, pack_2x2, unpack_2x2
from fewstep.training.families import (
    WAN_NEGATIVE_PROMPT,
    EncodeOptions,
    call_default,
    check_components,
    dynamic_shift_schedule,
    latent_shape,
    pixel_size,
)
from fewstep.training.text import encode_prompts

PROMPTS = ["a red circle", "the blue square"]


def options_for(name: str, negative: str | None = "") -> EncodeOptions:
    kw = CALL_KWARGS[name]
    return EncodeOptions(
        negative=negative, max_sequence_length=kw.get("max_sequence_length"), height=kw.get("height"),
        width=kw.get("width"), num_frames=kw.get("num_frames"),
    )  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_denoiser_on_encoded_prompts_is_the_pipelines_own_one_step_x0(name: str) -> None:
    pipe = FAMILIES[name]()
    pipe.set_progress_bar_config(disable=True)
    check_components(pipe)
    options = options_for(name)
    size = pixel_size(pipe, options)
    shape = latent_shape(pipe, size)
    cond, _ = encode_prompts(pipe, PROMPTS, options, size)
    denoiser = Denoiser.from_pipeline(pipe)
    native = dynamic_shift_schedule(pipe, denoiser.native, shape)
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    # the call: the pipeline's own choices (Sana's complex human instruction, embedded guidance), no CFG
    call = {k: v for k, v in CALL_KWARGS[name].items() if k != "complex_human_instruction"}
    if name not in ("flux_dev", "flux_schnell", "sana_sprint"):
        call["guidance_scale"] = 1.0
    if name == "sana_sprint":  # SCMScheduler, one step from its max_timesteps; latents enter in units of sigma_data
        t = torch.tensor(call_default(pipe, "max_timesteps"))
        call["intermediate_timesteps"] = None
        sigma_d = pipe.scheduler.config.sigma_data
        x_t, latents, to_x0 = noise * sigma_d, noise, lambda out: out * sigma_d
    else:
        t = torch.tensor(native.t_max)
        pipe.scheduler = FewStepScheduler(
            schedule=native.config(), prediction_type=denoiser.prediction, plan={"1": [native.t_max]}, gamma=1.0
        )
        x_t = noise * float(native.prior_std(t))
        latents, to_x0 = noise, (lambda out: out)
        if name.startswith("flux"):  # FluxPipeline takes and returns packed latents
            latents = pack_2x2(noise)[0]
            to_x0 = lambda out: unpack_2x2(out, noise.shape)  # noqa: E731
    out = pipe(prompt=PROMPTS, num_inference_steps=1, latents=latents, output_type="latent", **call)[0]
    expected = to_x0(out.float())
    x0 = Denoiser(denoiser.model, native, denoiser.prediction)(x_t, t, cond)
    torch.testing.assert_close(x0, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["sdxl", "pixart_alpha", "flux_dev", "wan", "cogvideox"])
def test_a_missing_component_is_a_one_line_error_naming_it(name: str) -> None:
    pipe = FAMILIES[name]()
    missing = "text_encoder_2" if name in ("sdxl", "flux_dev") else "tokenizer"
    setattr(pipe, missing, None)
    with pytest.raises(FewstepError, match=f"no {missing}"):
        check_components(pipe)
    pipe = FAMILIES[name]()
    pipe.vae = None
    with pytest.raises(FewstepError, match="no vae"):
        check_components(pipe)


def test_video_latents_follow_the_vae_compression_and_the_backbone_layout() -> None:
    wan, cog = FAMILIES["wan"](), FAMILIES["cogvideox"]()
    assert latent_shape(wan, pixel_size(wan, options_for("wan"))) == (16, 2, 2, 2)  # (C, F, H, W): 5 frames -> 2
    size = pixel_size(cog, options_for("cogvideox"))
    c = cog.transformer.config.in_channels
    assert latent_shape(cog, size) == (3, c, 2, 2)  # (F, C, H, W): 9 frames -> 3
    default = pixel_size(wan, EncodeOptions())
    assert (default.height, default.width, default.frames) == (480, 832, 81)  # WanPipeline.__call__'s defaults


def test_wan_distills_against_wans_own_negative_prompt_unless_told_otherwise() -> None:
    pipe = FAMILIES["wan"]()
    _, uncond = encode_prompts(pipe, PROMPTS, options_for("wan", negative=None))
    kw = {"max_sequence_length": 16, "do_classifier_free_guidance": True}
    _, wan_negative = pipe.encode_prompt(PROMPTS[:1], negative_prompt=WAN_NEGATIVE_PROMPT, **kw)
    _, empty = pipe.encode_prompt(PROMPTS[:1], negative_prompt="", **kw)
    torch.testing.assert_close(uncond["encoder_hidden_states"], wan_negative)
    assert not torch.allclose(wan_negative, empty)
    _, uncond = encode_prompts(pipe, PROMPTS, options_for("wan", negative=""))
    torch.testing.assert_close(uncond["encoder_hidden_states"], empty)


def test_flux_dev_embeds_its_pipelines_guidance_and_schnell_none() -> None:
    dev, schnell = FAMILIES["flux_dev"](), FAMILIES["flux_schnell"]()
    cond, uncond = encode_prompts(dev, PROMPTS, options_for("flux_dev"))
    assert cond["guidance"].tolist() == [3.5, 3.5] and uncond["guidance"].tolist() == [3.5]  # FluxPipeline's default
    cond, _ = encode_prompts(schnell, PROMPTS, options_for("flux_schnell"))
    assert "guidance" not in cond


def test_flux_dev_trains_at_the_shift_its_scheduler_uses_at_that_size() -> None:
    """FLUX.1-dev shifts by resolution: the teacher's Euler grid at the training size is the stock scheduler's."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = FAMILIES["flux_dev"]()
    for side in (16, 64):
        shape = latent_shape(pipe, pixel_size(pipe, EncodeOptions(height=side, width=side)))
        native = dynamic_shift_schedule(pipe, Denoiser.from_pipeline(pipe).native, shape)
        c = pipe.scheduler.config
        tokens = (shape[-2] // 2) * (shape[-1] // 2)
        mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
        u = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
        torch.testing.assert_close(native.shift_time(u).float(), pipe.scheduler.sigmas[:4].float())


def test_sdxl_conditions_carry_pooled_embeds_and_size_ids(tmp_path: Path) -> None:
    pipe = FAMILIES["sdxl"]()
    cond, uncond = encode_prompts(pipe, PROMPTS, options_for("sdxl", negative=None))
    assert cond["added_cond_kwargs.time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2
    assert not uncond["encoder_hidden_states"].any()  # force_zeros_for_empty_prompt, as StableDiffusionXLPipeline


def test_teacher_samples_are_cached_per_encoding_choice(tmp_path: Path) -> None:
    """The cached x0 follow every choice that changes the conditions (here FLUX.1-dev's embedded guidance), not only
    the negative prompt: a second run with another scale must not reuse the first run's samples."""
    from fewstep.training.data import DataConfig, PromptBatches

    pipe = FAMILIES["flux_dev"]()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    teacher = Denoiser.from_pipeline(pipe)
    base = {"prompts": str(prompts), "teacher_steps": 2, "height": 16, "width": 16, "max_sequence_length": 16}
    x0 = {}
    for scale, cache in ((3.5, "shared"), (1.0, "shared"), (1.0, "fresh")):
        cfg = DataConfig(**base, embedded_guidance=scale)
        x0[scale, cache] = PromptBatches.for_teacher(pipe, teacher, "flux", cfg, 2, 0, tmp_path / cache).x0
    torch.testing.assert_close(x0[1.0, "shared"], x0[1.0, "fresh"])
    assert not torch.allclose(x0[3.5, "shared"], x0[1.0, "shared"])
