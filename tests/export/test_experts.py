"""TimestepExperts: routing by phase (whole batches and mixed ones), save/load, pipelines reloaded with stock
diffusers, and fewstep's Denoiser over the wrapper, on tiny models built from config."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_MODELS, TinyModel, tiny_sd3_pipeline
from test_teacher import pipeline_call  # the model call exactly as each backbone's diffusers pipeline makes it
from torch import nn

from fewstep.errors import FewstepError
from fewstep.export.experts import TimestepExperts
from fewstep.schedules import Flow
from fewstep.teacher import Denoiser, backbone_for

BOUNDARIES = (700.0, 300.0)  # in pipeline timesteps (0..1000); FluxPipeline passes timestep / 1000 to its model
ROUTED = ["DiTTransformer2DModel", "FluxTransformer2DModel", "SD3Transformer2DModel", "UNet2DConditionModel"]
# 16 samples (= Flux's 16 image tokens, so position ids look batch-shaped), every phase, both boundaries
MIXED = torch.tensor([20.0, 950.0, 300.0, 500.0, 1000.0, 700.0, 0.0, 299.0, 650.0, 701.0, 120.0, 400.0, 999.0, 5.0,
                      310.0, 800.0])  # fmt: skip


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # inputs and initial weights come from the global generator


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with seeded noise on every weight (zero-initialised modulations would make experts agree)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def make_experts(tiny: TinyModel, k: int = 3) -> list[nn.Module]:
    return [perturbed(tiny.build(), seed) for seed in range(k)]


def model_units(tiny: TinyModel, timesteps: Any) -> tuple[float, ...]:
    """Pipeline timesteps in the units the model itself receives."""
    scale = 1e-3 if tiny.name == "FluxTransformer2DModel" else 1.0
    return tuple(float(t) * scale for t in timesteps)


def expected_phase(timestep: float) -> int:
    return 0 if timestep > BOUNDARIES[0] else 1 if timestep > BOUNDARIES[1] else 2


@pytest.mark.parametrize("name", ROUTED)
@torch.no_grad()
def test_whole_batch_in_one_phase_is_its_expert(name: str) -> None:
    tiny = TINY_MODELS[name]
    experts = make_experts(tiny)
    wrapper = TimestepExperts.from_experts(experts, model_units(tiny, BOUNDARIES))
    x, cond = torch.randn(2, *tiny.shape), tiny.cond(2)
    for timestep in (1000.0, 701.0, 700.0, 500.0, 300.0, 0.0):  # a timestep on a boundary goes to the later phase
        t = torch.tensor(timestep)
        outs = [pipeline_call(tiny, e, x, t, cond) for e in experts]
        with wrapper.cache_context("cond"):  # as FluxPipeline calls its transformer
            out = pipeline_call(tiny, wrapper, x, t, cond)
        k = expected_phase(timestep)
        assert torch.equal(out, outs[k]), (timestep, k)
        assert not any(torch.allclose(out, o, atol=1e-3) for j, o in enumerate(outs) if j != k)


@pytest.mark.parametrize("name", ROUTED)
@torch.no_grad()
def test_mixed_batch_routes_each_sample(name: str) -> None:
    tiny = TINY_MODELS[name]
    experts = make_experts(tiny)
    wrapper = TimestepExperts.from_experts(experts, model_units(tiny, BOUNDARIES))
    batch = len(MIXED)
    x, cond = torch.randn(batch, *tiny.shape), tiny.cond(batch)
    out = pipeline_call(tiny, wrapper, x, MIXED, cond)
    outs = [pipeline_call(tiny, e, x, MIXED, cond) for e in experts]
    for i, timestep in enumerate(MIXED.tolist()):
        k = expected_phase(timestep)
        torch.testing.assert_close(out[i], outs[k][i], rtol=1e-5, atol=1e-5)  # sub-batches round differently
        assert not torch.allclose(out[i], outs[(k + 1) % 3][i], atol=1e-3)


@torch.no_grad()
def test_output_type_follows_the_expert() -> None:
    tiny = TINY_MODELS["DiTTransformer2DModel"]
    experts = make_experts(tiny, 2)
    wrapper = TimestepExperts.from_experts(experts, [500.0])
    x, cond = torch.randn(3, *tiny.shape), tiny.cond(3)
    for t in (torch.full((3,), 800.0), torch.tensor([800.0, 100.0, 900.0])):  # one phase, then mixed
        out, ref = wrapper(x, timestep=t, **cond), experts[0](x, timestep=t, **cond)
        assert type(out) is type(ref) and out.sample.shape == ref.sample.shape
        tup = wrapper(x, timestep=t, return_dict=False, **cond)
        assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], out.sample)


@torch.no_grad()
def test_unet_takes_timestep_positionally() -> None:
    """StableDiffusionPipeline calls ``unet(latents, t, encoder_hidden_states=...)``; nested added_cond_kwargs and
    timestep_cond are sliced per sample too."""
    tiny = TINY_MODELS["UNet2DConditionModel"]
    experts = make_experts(tiny)
    wrapper = TimestepExperts.from_experts(experts, BOUNDARIES)
    t = torch.tensor([900.0, 100.0, 500.0, 300.0])
    x, cond = torch.randn(4, *tiny.shape), tiny.cond(4)
    out = wrapper(x, t, **cond).sample
    outs = [e(x, t, **cond).sample for e in experts]
    for i, k in enumerate([0, 2, 1, 2]):
        torch.testing.assert_close(out[i], outs[k][i], rtol=1e-5, atol=1e-5)
    assert torch.equal(wrapper(x, 100.0, **cond).sample, experts[2](x, 100.0, **cond).sample)  # a python float


def test_phase_boundaries_and_dtype() -> None:
    wrapper = TimestepExperts.from_experts(make_experts(TINY_MODELS["DiTTransformer2DModel"]), [0.7, 0.3])
    t = torch.tensor([1.0, 0.7000001, 0.7, 0.5, 0.3, 0.2999999, 0.0], dtype=torch.float64)
    assert wrapper.phase(t).tolist() == [0, 0, 1, 1, 2, 2, 2]
    # float32 0.3 lies above the float64 0.3: compared in the timestep's dtype it sits on the boundary
    assert wrapper.phase(torch.tensor(0.3, dtype=torch.float32)).item() == 2
    assert wrapper.phase(torch.tensor([300.0, 700.0, 999.0]) / 1000).tolist() == [2, 1, 0]  # as FluxPipeline


def test_config_reads_through_to_experts() -> None:
    for name in ("DiTTransformer2DModel", "FluxTransformer2DModel", "SD3Transformer2DModel", "UNet2DConditionModel"):
        experts = make_experts(TINY_MODELS[name], 2)
        wrapper = TimestepExperts.from_experts(experts, [500.0])
        for key, value in experts[0].config.items():
            if not key.startswith("_"):
                assert getattr(wrapper.config, key) == value and wrapper.config[key] == value
        assert wrapper.config.boundaries == [500.0] and wrapper.config.expert_class == name
        assert wrapper.dtype == torch.float32 and wrapper.device == torch.device("cpu")
    assert wrapper.to(torch.float64).dtype == torch.float64
    assert wrapper.add_embedding is experts[0].add_embedding  # SDXL's pipeline reads unet.add_embedding
    with pytest.raises(AttributeError, match="each of .experts"):
        wrapper.set_default_attn_processor()  # on expert 0 alone it would silently skip the others


def test_rejects_inconsistent_experts() -> None:
    tiny = TINY_MODELS["DiTTransformer2DModel"]
    experts = make_experts(tiny, 3)
    with pytest.raises(FewstepError, match="decreasing"):
        TimestepExperts.from_experts(experts, [300.0, 700.0])
    with pytest.raises(FewstepError, match="need 3 experts"):
        TimestepExperts.from_experts(experts[:2], [700.0, 300.0])
    with pytest.raises(FewstepError, match="must be DiTTransformer2DModel"):
        TimestepExperts.from_experts([*experts[:2], TINY_MODELS["SD3Transformer2DModel"].build()], [700.0, 300.0])
    other = TINY_MODELS["DiTTransformer2DModel"].build()
    other.register_to_config(num_layers=3)
    with pytest.raises(FewstepError, match="one config"):
        TimestepExperts.from_experts([experts[0], other], [500.0])


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path: Path) -> None:
    tiny = TINY_MODELS["SD3Transformer2DModel"]
    wrapper = TimestepExperts.from_experts(make_experts(tiny), BOUNDARIES)
    wrapper.save_pretrained(tmp_path)
    loaded = TimestepExperts.from_pretrained(tmp_path)
    assert loaded.boundaries == BOUNDARIES and len(loaded.experts) == 3
    assert loaded.config.joint_attention_dim == tiny.build().config.joint_attention_dim
    x, cond = torch.randn(len(MIXED), *tiny.shape), tiny.cond(len(MIXED))
    for t in (MIXED, torch.tensor(500.0)):
        assert torch.equal(pipeline_call(tiny, loaded, x, t, cond), pipeline_call(tiny, wrapper, x, t, cond))


def _digits_pipeline(transformer: nn.Module) -> Any:
    from fewstep.worlds.digits.pipeline import DigitsPipeline
    from fewstep.worlds.digits.train import teacher_scheduler

    pipe = DigitsPipeline(transformer=transformer, scheduler=teacher_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_digits_pipeline_with_experts_reloads(tmp_path: Path) -> None:
    """Two steps at timesteps 1000 and 500 (on the boundary: expert 1), with CFG batching both branches."""
    from diffusers import DiffusionPipeline

    from fewstep.worlds.digits.train import make_teacher_model

    experts = [perturbed(make_teacher_model(), seed) for seed in range(2)]
    pipe = _digits_pipeline(TimestepExperts.from_experts(experts, [500.0]))
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, TimestepExperts)

    def sample(p: Any) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return p(class_labels=[0, 3, 7], num_inference_steps=2, guidance_scale=2.0, generator=gen).images

    images = sample(pipe)
    torch.testing.assert_close(sample(loaded), images, rtol=0, atol=0)
    for expert in experts:  # both experts took part
        assert not torch.allclose(sample(_digits_pipeline(expert)), images, atol=1e-3)


def test_sd3_pipeline_with_experts_reloads(tmp_path: Path) -> None:
    import diffusers

    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():  # built in train mode: T5's dropout would differ from the reload
        if isinstance(module, nn.Module):
            module.eval()
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(2)
    boundary = float(scheduler.timesteps.mean())  # between the two steps
    experts = [pipe.transformer, perturbed(copy.deepcopy(pipe.transformer), 1)]
    wrapper = TimestepExperts.from_experts(experts, [boundary])
    student = diffusers.StableDiffusion3Pipeline(**{**pipe.components, "transformer": wrapper})
    student.set_progress_bar_config(disable=True)
    student.save_pretrained(tmp_path)
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, diffusers.StableDiffusion3Pipeline) and isinstance(loaded.transformer, TimestepExperts)

    def sample(p: Any) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return p(prompt=["a red circle", "the dot"], num_inference_steps=2, generator=gen, output_type="pt").images

    images = sample(student)
    assert images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(sample(loaded), images, rtol=0, atol=0)
    assert not torch.allclose(sample(pipe), images, atol=1e-4)  # expert 1 took the second step


@pytest.mark.parametrize("name", ["DiTTransformer2DModel", "FluxTransformer2DModel"])
@torch.no_grad()
def test_denoiser_over_experts_is_the_chosen_expert(name: str) -> None:
    """Flow time t: model timestep 1000 t (DiT, learned sigma dropped) or t (Flux, packed)."""
    tiny = TINY_MODELS[name]
    experts = make_experts(tiny, 2)
    boundary = model_units(tiny, [400.0])
    wrapper = TimestepExperts.from_experts(experts, boundary)
    assert backbone_for(wrapper) == backbone_for(experts[0])
    denoise = Denoiser(wrapper, Flow(), "flow")
    refs = [Denoiser(e, Flow(), "flow") for e in experts]
    x, cond = torch.randn(4, *tiny.shape), tiny.cond(4)
    for t, k in ((0.9, 0), (0.3, 1), (0.1, 1)):
        x0 = denoise(x, torch.tensor(t), cond)
        assert torch.equal(x0, refs[k](x, torch.tensor(t), cond))
        assert not torch.allclose(x0, refs[1 - k](x, torch.tensor(t), cond), atol=1e-3)
    t = torch.tensor([0.9, 0.1, 0.3, 0.95])
    x0, by_expert = denoise(x, t, cond), [r(x, t, cond) for r in refs]
    for i, k in enumerate([0, 1, 1, 0]):
        torch.testing.assert_close(x0[i], by_expert[k][i], rtol=1e-5, atol=1e-5)


def test_loads_in_a_fresh_process_after_importing_fewstep_experts(tmp_path: Path) -> None:
    """diffusers resolves ["fewstep.export.experts", "TimestepExperts"] only from modules already imported."""
    from fewstep.worlds.digits.train import make_teacher_model

    _digits_pipeline(TimestepExperts.from_experts([make_teacher_model() for _ in range(2)], [500.0])).save_pretrained(
        tmp_path
    )
    code = f"""
import fewstep.worlds.digits.pipeline
from diffusers import DiffusionPipeline
try:
    DiffusionPipeline.from_pretrained({str(tmp_path)!r})
except ValueError as err:
    assert "import fewstep.export.experts" in str(err), err
else:
    raise AssertionError("loaded without fewstep.export.experts")
import fewstep.export.experts
print(type(DiffusionPipeline.from_pretrained({str(tmp_path)!r}).transformer).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.strip().splitlines()[-1] == "TimestepExperts"
