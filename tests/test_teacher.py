"""The Denoiser adapter against each pipeline's own conventions, on tiny models built from config."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import TinyModel
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.errors import FewstepError
from fewstep.loading import load_pipeline, resolve_source
from fewstep.schedules import VP, Flow, TrigFlow, append_dims, ddim_step, from_x0, schedule_from_diffusers_config
from fewstep.teacher import Backbone, Denoiser, concat_cond, expand_cond, nest_kwargs

STEP_INDEX = 3


def pipeline_call(tiny: TinyModel, model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> Any:
    """The model output exactly as the model's diffusers pipeline computes it (written from each pipeline)."""
    from diffusers import FluxPipeline

    t = timestep.expand(x.shape[0])
    if tiny.name == "FluxTransformer2DModel":  # FluxPipeline: packed latents, timestep / 1000, ids
        b, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3)
        out = model(packed, timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **cond)[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)
    if tiny.name == "PixArtTransformer2DModel":
        added = {"resolution": None, "aspect_ratio": None}
        out = model(x, timestep=t, added_cond_kwargs=added, return_dict=False, **cond)[0]
    else:
        out = model(x, timestep=t, return_dict=False, **cond)[0]
    if out.shape[1] == 2 * x.shape[1]:  # DiTPipeline / PixArtAlphaPipeline: drop the learned variance
        out = out.split(x.shape[1], dim=1)[0]
    return out


def scheduler_x0(scheduler: Any, out: torch.Tensor, timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x0 as the pipeline's own scheduler derives it from the model output."""
    name = type(scheduler).__name__
    if name in ("DDIMScheduler", "DDPMScheduler"):
        return scheduler.step(out, timestep, x).pred_original_sample
    scheduler._step_index = STEP_INDEX
    return scheduler.convert_model_output(out, sample=x)  # DPM-Solver / UniPC (predict x0)


@torch.no_grad()
def test_adapter_x0_matches_pipeline_scheduler(tiny: TinyModel) -> None:
    model = tiny.build().eval()
    scheduler = tiny.scheduler()
    scheduler.set_timesteps(10)
    denoiser = Denoiser.from_pipeline(type("Pipe", (), {"transformer": model, "scheduler": scheduler})())
    timestep = scheduler.timesteps[STEP_INDEX]
    if hasattr(scheduler, "sigmas") and denoiser.native.kind == "flow":
        # DPM-Solver / UniPC truncate flow timesteps to integers but derive x0 with the exact sigma; evaluate the
        # model at that sigma so both sides describe the same point
        timestep = scheduler.sigmas[STEP_INDEX] * 1000
    x = torch.randn(2, *tiny.shape)
    cond = tiny.cond(2)
    out = pipeline_call(tiny, model, x, timestep, cond)
    t = denoiser.native.from_model_timestep(timestep.float())
    x0 = denoiser(x, t, cond)
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":  # it only returns the Euler step
        sigma, sigma_next = scheduler.sigmas[STEP_INDEX], scheduler.sigmas[STEP_INDEX + 1]
        prev = scheduler.step(out, timestep, x).prev_sample
        c = denoiser.native.coeffs
        torch.testing.assert_close(ddim_step(x0, x, c(sigma), c(sigma_next)), prev, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(x0, scheduler_x0(scheduler, out, timestep, x), rtol=1e-5, atol=1e-5)


def test_time_derivative_reaches_time_embedding(tiny: TinyModel) -> None:
    """d x0/dt by forward-mode AD through the adapter equals a central finite difference."""
    torch.manual_seed(0)
    model = tiny.build().eval()
    native, prediction = schedule_from_diffusers_config(tiny.scheduler())
    denoiser = Denoiser(model, native, prediction)
    x = torch.randn(1, *tiny.shape)
    cond = tiny.cond(1)
    t0 = torch.tensor([0.37 * native.t_max])
    # sinusoidal time embeddings oscillate once per model-timestep unit: step a twentieth of one
    h = 0.05 / float(native.to_model_timestep(torch.tensor(1.0)) - native.to_model_timestep(torch.tensor(0.0)))

    def f(t: torch.Tensor) -> torch.Tensor:
        return denoiser(x, t, cond)

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, x0_dot = torch.func.jvp(f, (t0,), (torch.ones_like(t0),))
        fd = (f(t0 + h) - f(t0 - h)) / (2 * h)
    assert x0_dot.abs().max() > 0
    assert (x0_dot - fd).norm() <= 0.05 * fd.norm() + 1e-6


class GaussianScore(nn.Module):
    """Exact model output for data N(m, v I) on a given schedule, called the way diffusers calls a backbone."""

    def __init__(self, schedule: Any, prediction: str, m: float = 0.3, v: float = 0.5):
        super().__init__()
        self.schedule, self.prediction, self.m, self.v = schedule, prediction, m, v

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        c = self.schedule.coeffs(append_dims(self.schedule.from_model_timestep(timestep), x.ndim))
        x0 = self.m + c.alpha * self.v / (c.alpha**2 * self.v + c.sigma**2) * (x - c.alpha * self.m)
        return (from_x0(x0, x, c, self.prediction),)


@pytest.mark.parametrize(
    "native,prediction",
    [
        (Flow(), "flow"),
        (VP(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), "epsilon"),
        (VP(), "v_prediction"),
    ],
)
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_teacher_in_trigflow_time_is_exact(native: Any, prediction: str, sigma_data: float) -> None:
    """A flow or VP teacher answering in TrigFlow time equals the exact TrigFlow denoiser (no retraining)."""
    trig = TrigFlow(sigma_data=sigma_data)
    teacher = Denoiser(GaussianScore(native, prediction).double(), native, prediction, backbone=Backbone())
    student_view = teacher.with_schedule(trig)
    exact = GaussianScore(trig, "sample")
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([0.2, 0.6, 1.0, 1.4], dtype=torch.float64)
    if isinstance(native, VP):  # stay inside the SNR range the discrete VP schedule covers
        t = t.clamp(max=float(trig.time_at_ratio(native.ratio(torch.tensor(native.t_max, dtype=torch.float64)))))
    torch.testing.assert_close(student_view(x, t), exact(x, t)[0], rtol=1e-6, atol=1e-8)
    # TrigFlow's F from the converted teacher gives back the same x0 (Eq. 4 of sCM: x0 = cos t x_t - sin t sd F)
    F = student_view.predict(x, t, prediction="trigflow")
    c = trig.coeffs(append_dims(t, x.ndim))
    torch.testing.assert_close(c.alpha * x - c.sigma * F, exact(x, t)[0], rtol=1e-6, atol=1e-8)


@torch.no_grad()
def test_guidance_batches_both_branches() -> None:
    from conftest import TINY_MODELS

    tiny = TINY_MODELS["DiTTransformer2DModel"]
    torch.manual_seed(0)
    model = tiny.build().eval()
    denoiser = Denoiser(model, VP(), "epsilon")
    x, t = torch.randn(3, *tiny.shape), torch.tensor([100.0, 500.0, 900.0])
    cond, uncond = {"class_labels": torch.tensor([0, 1, 2])}, {"class_labels": torch.full((3,), 5)}
    x0_c, x0_u = denoiser(x, t, cond), denoiser(x, t, uncond)
    torch.testing.assert_close(denoiser.guided(x, t, cond, uncond, 1.0), x0_c)
    torch.testing.assert_close(denoiser.guided(x, t, cond, uncond, 0.0), x0_u)
    torch.testing.assert_close(
        denoiser.guided(x, t, cond, uncond, 3.0), x0_u + 3.0 * (x0_c - x0_u), atol=1e-5, rtol=1e-5
    )


def test_nest_kwargs_turns_dotted_keys_into_nested_arguments_over_the_defaults() -> None:
    a, b, c = torch.ones(2, 3), torch.zeros(2, 6), torch.ones(2, 4)
    flat = {"encoder_hidden_states": a, "added_cond_kwargs.time_ids": b, "added_cond_kwargs.text_embeds": c}
    nested = nest_kwargs(flat, {"added_cond_kwargs": {"resolution": None, "time_ids": None}})
    assert nested["encoder_hidden_states"] is a
    assert nested["added_cond_kwargs"] == {"resolution": None, "time_ids": b, "text_embeds": c}
    assert nest_kwargs({"x.y.z": a}) == {"x": {"y": {"z": a}}}
    defaults = {"added_cond_kwargs": {"resolution": None}}
    nest_kwargs(flat, defaults)
    assert defaults == {"added_cond_kwargs": {"resolution": None}}  # the backbone's defaults are not mutated


def test_expand_cond_broadcasts_one_negative_prompt() -> None:
    """The unconditional branch alone (guidance 0) gets the shared negative-prompt row expanded to the batch."""
    uncond = {"e": torch.ones(1, 4), "ids": torch.zeros(1, 3), "added": {"t": torch.ones(1, 1)}, "flag": True}
    out = expand_cond(uncond, batch=3, shared=("ids",))
    assert out["e"].shape == (3, 4) and out["added"]["t"].shape == (3, 1) and out["flag"] is True
    assert out["ids"].shape == (1, 3)


def test_concat_cond_expands_and_shares() -> None:
    a = {"e": torch.zeros(3, 4), "ids": torch.zeros(3, 3), "added": {"t": torch.zeros(3, 1)}}
    b = {"e": torch.ones(1, 4), "ids": torch.zeros(3, 3), "added": {"t": torch.ones(3, 1)}}  # one negative prompt
    out = concat_cond(a, b, batch=3, shared=("ids",))
    assert out["e"].shape == (6, 4) and out["e"][3:].eq(1).all()  # uncond expanded to the batch
    assert out["ids"].shape == (3, 3)  # position ids shared even though their length equals the batch
    assert out["added"]["t"].shape == (6, 1)
    with pytest.raises(ValueError, match="batch"):
        concat_cond({"e": torch.zeros(2, 4)}, {"e": torch.zeros(3, 4)}, batch=3)


@torch.no_grad()
def test_bf16_vp_teacher_at_the_first_timestep() -> None:
    """bf16 would round t = 999 to 1000 and index past the table; time stays float32 inside the adapter."""
    from conftest import TINY_MODELS

    torch.manual_seed(0)
    model = TINY_MODELS["DiTTransformer2DModel"].build().eval()
    x, t, cond = torch.randn(2, 2, 8, 8), torch.tensor([999.0, 937.3]), {"class_labels": torch.tensor([0, 1])}
    ref = Denoiser(model, VP(), "epsilon")(x, t, cond)
    out = Denoiser(model.to(torch.bfloat16), VP(), "epsilon")(x.bfloat16(), t, cond)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out.float() - ref).norm() <= 0.05 * ref.norm()


@pytest.mark.parametrize("src", [Flow(), VP()])
def test_change_of_variables_at_pure_noise_in_float32(src: Any) -> None:
    """float32 pi/2 is past pi/2 (cos < 0): the map must still land on the source's pure-noise end."""
    from fewstep.schedules import change_of_variables

    rep = change_of_variables(torch.tensor([torch.pi / 2], dtype=torch.float32), TrigFlow(sigma_data=1.0), src)
    assert torch.isfinite(rep.scale).all() and rep.t_src.dtype == torch.float32
    assert float(rep.t_src) == pytest.approx(src.t_max)
    if isinstance(src, Flow):  # closed form: scale = 1 / (sin t + cos t) = 1
        assert float(rep.scale) == pytest.approx(1.0)


def test_unsupported_model_class_is_a_clear_error() -> None:
    with pytest.raises(FewstepError, match="unsupported model class Linear"):
        Denoiser(nn.Linear(2, 2), Flow(), "flow")


def test_bad_sources_are_clear_errors(tmp_path: Any) -> None:
    with pytest.raises(FewstepError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(FewstepError, match="not a diffusers pipeline folder"):
        resolve_source(str(tmp_path))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FewstepError, match="is a file"):
        resolve_source(str(tmp_path / "file.txt"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(FewstepError, match="could not load pipeline"):
        load_pipeline(str(broken))


def test_guidance_embedding_models_need_a_guidance_scale() -> None:
    """Flux-dev style (guidance_embeds=True): a clear error without cond['guidance'], a result with it."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    denoiser = Denoiser(model, Flow(), "flow")
    x = torch.randn(2, 2, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(2, 6, 32), "pooled_projections": torch.randn(2, 16)}
    with pytest.raises(FewstepError, match="guidance"):
        denoiser(x, torch.tensor([0.5, 0.5]), cond)
    with torch.no_grad():
        out = denoiser(x, torch.tensor([0.5, 0.5]), {**cond, "guidance": torch.full((2,), 3.5)})
    assert out.shape == x.shape
