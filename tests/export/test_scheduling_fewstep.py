"""Tests of fewstep/export/scheduling_fewstep.py by identity: diffusers' DDIMScheduler (gamma = 0) and SCMScheduler
(gamma = 1) step for step, the exact denoiser of a point mass, the re-noise rule written two ways, config round trips
and reading stock schedulers' configs. No recorded numbers: every expected value is computed another way.
"""

from __future__ import annotations

import math

import diffusers
import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    SCMScheduler,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor

from fewstep.export.scheduling_fewstep import FewStepScheduler
from fewstep.schedules import (
    VP,
    Coeffs,
    Flow,
    append_dims,
    ddim_step,
    forward_transition,
    from_x0,
    schedule_from_diffusers_config,
    to_x0,
)

SHAPE = (2, 3, 4, 4)

# (schedule config, prediction type): every kind, and prediction types other than the schedule's native one
CASES = [
    ({"kind": "flow", "shift": 1.0}, "flow"),
    ({"kind": "flow", "shift": 3.0}, "v_prediction"),
    ({"kind": "vp"}, "epsilon"),
    ({"kind": "vp", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}, "v_prediction"),
    ({"kind": "vp"}, "sample"),
    ({"kind": "vp"}, "flow"),
    ({"kind": "trigflow", "sigma_data": 0.5}, "trigflow"),
    ({"kind": "edm"}, "epsilon"),
    ({"kind": "edm"}, "sample"),
    # zero terminal SNR: the first evaluation is at alpha = 0, where epsilon cannot give x0 (test_schedules.py)
    ({"kind": "vp", "rescale_betas_zero_snr": True}, "v_prediction"),
    ({"kind": "vp", "rescale_betas_zero_snr": True, "snr_shift_scale": 3.0}, "flow"),
    ({"kind": "vp", "rescale_betas_zero_snr": True}, "sample"),
]
CASE_IDS = [f"{s['kind']}{'-zero-snr' if s.get('rescale_betas_zero_snr') else ''}-{p}" for s, p in CASES]

# an explicit beta list that no beta_schedule gives: DDPM's linear betas with a slow ripple
TRAINED = (
    torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64) * (1 + 0.1 * torch.sin(torch.arange(1000) / 50))
).tolist()
ZSNR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True}
# THUDM/CogVideoX-2b's scheduler_config.json (tests/test_schedules.py has both CogVideoX models')
COGVIDEOX_2B = {
    "_class_name": "CogVideoXDDIMScheduler",
    **ZSNR,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}
MIXED = (0, 3, 6, 7)  # one case per kind


def coeffs_at(scheduler: FewStepScheduler, t: torch.Tensor, like: torch.Tensor) -> Coeffs:
    c = scheduler.schedule.coeffs(append_dims(torch.as_tensor(t, dtype=torch.float64), like.ndim))
    return Coeffs(*(v.to(like.dtype) for v in c))


def point_mass_output(scheduler: FewStepScheduler, x_star: torch.Tensor, x_t: torch.Tensor, timestep) -> torch.Tensor:
    """The exact model output for data = {x_star}, read back from the model-unit timestep a pipeline passes."""
    t = scheduler.schedule.from_model_timestep(torch.as_tensor(timestep, dtype=torch.float64))
    c = coeffs_at(scheduler, t, x_t)
    return from_x0(x_star.expand_as(x_t), x_t, c, scheduler.config.prediction_type)


@pytest.mark.parametrize("schedule,prediction", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_deterministic_sampling_of_a_point_mass_is_exact(schedule, prediction, steps):
    scheduler = FewStepScheduler(schedule=schedule, prediction_type=prediction, gamma=0.0)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x_star = torch.randn(SHAPE[1:], generator=g, dtype=torch.float64)
    x = scheduler.init_noise_sigma * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    c_T = coeffs_at(scheduler, scheduler.times[0], x)
    eps = (x - c_T.alpha * x_star) / c_T.sigma  # the noise every later DDIM step must keep
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(point_mass_output(scheduler, x_star, x, timestep), timestep, x).prev_sample
        if i + 1 < steps:  # on the straight line through (x_star, eps), at the next time
            c = coeffs_at(scheduler, scheduler.times[i + 1], x)
            torch.testing.assert_close(x, c.alpha * x_star + c.sigma * eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, x_star.expand_as(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule,prediction", CASES, ids=CASE_IDS)
def test_gamma_one_renoises_with_fresh_noise_only(schedule, prediction):
    scheduler = FewStepScheduler(schedule=schedule, prediction_type=prediction, gamma=1.0)
    scheduler.set_timesteps(4)
    x = scheduler.init_noise_sigma * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    res = scheduler.step(out, scheduler.timesteps[1], x, generator=torch.Generator().manual_seed(3))
    x0 = to_x0(out, x, coeffs_at(scheduler, scheduler.times[1], x), prediction)
    z = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(3))
    c = coeffs_at(scheduler, scheduler.times[2], x)
    torch.testing.assert_close(res.pred_original_sample, x0)
    torch.testing.assert_close(res.prev_sample, c.alpha * x0 + c.sigma * z)
    assert scheduler.step_index == 2
    # the last step returns the data estimate itself
    scheduler.set_timesteps(4)  # the step index is looked up again from the timestep
    last = scheduler.step(out, scheduler.timesteps[3], x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        last.prev_sample, to_x0(out, x, coeffs_at(scheduler, scheduler.times[3], x), prediction)
    )


@pytest.mark.parametrize(
    "schedule,prediction", [CASES[i] for i in (0, 3, 6, 7)], ids=[CASE_IDS[i] for i in (0, 3, 6, 7)]
)
@pytest.mark.parametrize("gamma", [0.3, 0.8])
def test_intermediate_gamma_is_ddim_to_s_then_forward_process(schedule, prediction, gamma):
    """TCD's form (DDIM to s with sigma_s/alpha_s = (1 - gamma) sigma_next/alpha_next, then x_next | x_s on the same
    schedule) and the closed form alpha x0 + sigma ((1 - gamma) eps_hat + sqrt(1 - (1 - gamma)^2) z) agree."""
    scheduler = FewStepScheduler(schedule=schedule, prediction_type=prediction, gamma=gamma)
    scheduler.set_timesteps(2)
    x = scheduler.init_noise_sigma * torch.randn(
        SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    prev = scheduler.step(out, scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(3)).prev_sample
    z = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    c_t, c_next = coeffs_at(scheduler, scheduler.times[0], x), coeffs_at(scheduler, scheduler.times[1], x)
    x0 = to_x0(out, x, c_t, prediction)
    s = scheduler.schedule.time_at_ratio((1 - gamma) * scheduler.schedule.ratio(scheduler.times[1]))
    assert 0 < s < scheduler.times[1]
    c_s = coeffs_at(scheduler, s, x)
    torch.testing.assert_close(prev, forward_transition(ddim_step(x0, x, c_t, c_s), c_s, c_next, z))
    eps_hat = (x - c_t.alpha * x0) / c_t.sigma
    mix = (1 - gamma) * eps_hat + math.sqrt(1 - (1 - gamma) ** 2) * z
    torch.testing.assert_close(prev, c_next.alpha * x0 + c_next.sigma * mix)


def assert_gamma_zero_matches(ddim, steps: int) -> None:
    """FewStepScheduler read from a DDIM-type scheduler's config, on its timesteps with gamma = 0, steps as it does."""
    ddim.set_timesteps(steps)
    plan = {str(steps): [float(t) for t in ddim.timesteps]}
    ours = FewStepScheduler.from_config(ddim.config, gamma=0.0, plan=plan)
    ours.set_timesteps(steps)
    torch.testing.assert_close(ours.timesteps, ddim.timesteps.float())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    g_state = g.get_state()
    for i, t in enumerate(ddim.timesteps):
        out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10 + i))
        expected = ddim.step(out, t, x, eta=0.0)
        got = ours.step(out, ours.timesteps[i], x, generator=g)
        torch.testing.assert_close(got.pred_original_sample, expected.pred_original_sample, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.prev_sample, expected.prev_sample, rtol=1e-4, atol=1e-5)
        x = expected.prev_sample
    assert torch.equal(g.get_state(), g_state)  # deterministic: no noise drawn


# 999, 749, 499, 249: steps of 1000 // n, as DDIM's prev_timestep assumes
DDIM_GRID = {"set_alpha_to_one": True, "clip_sample": False, "timestep_spacing": "trailing"}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_gamma_zero_matches_diffusers_ddim(prediction, steps):
    assert_gamma_zero_matches(
        DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction, **DDIM_GRID), steps
    )


STOCK_DDIM = {
    "ddim-trained-betas": lambda: DDIMScheduler(trained_betas=TRAINED, prediction_type="v_prediction", **DDIM_GRID),
    "ddim-zero-snr": lambda: DDIMScheduler(**ZSNR, prediction_type="v_prediction", **DDIM_GRID),
    "cogvideox-2b": lambda: CogVideoXDDIMScheduler.from_config(COGVIDEOX_2B),
}


@pytest.mark.parametrize("stock", list(STOCK_DDIM))
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_gamma_zero_matches_diffusers_ddim_on_every_vp_table(stock, steps):
    """Explicit betas, zero terminal SNR (the first step starts at alpha = 0) and CogVideoX's shifted table."""
    assert_gamma_zero_matches(STOCK_DDIM[stock](), steps)


@pytest.mark.parametrize("steps,intermediate", [(1, None), (2, 1.3), (3, None), (4, None)])
def test_trigflow_gamma_one_matches_diffusers_scm(steps, intermediate):
    scm = SCMScheduler(sigma_data=0.5)
    scm.set_timesteps(steps, intermediate_timesteps=intermediate)  # n + 1 times ending at 0; the pipeline skips 0
    plan = {str(steps): [float(t) for t in scm.timesteps[:-1]]}
    ours = FewStepScheduler.from_config(scm.config, plan=plan)
    assert ours.config.gamma == 1.0
    ours.set_timesteps(steps)
    torch.testing.assert_close(ours.timesteps, scm.timesteps[:-1])
    g_ours, g_scm = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x = 0.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for i in range(steps):
        F = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10 + i))
        # SCMScheduler takes sigma_d * F (SanaSprintPipeline scales the transformer's F before step); fewstep's
        # "trigflow" output is F itself (Lu & Song, 2024: x0 = cos(t) x_t - sin(t) sigma_d F)
        expected = scm.step(0.5 * F, scm.timesteps[i], x, generator=g_scm)
        got = ours.step(F, ours.timesteps[i], x, generator=g_ours)
        torch.testing.assert_close(got.pred_original_sample, expected.pred_original_sample)
        torch.testing.assert_close(got.prev_sample, expected.prev_sample)
        x = expected.prev_sample


@pytest.mark.parametrize("saved", [False, True], ids=["in-memory", "saved"])
@pytest.mark.parametrize(
    "foreign,kind,prediction,key,value",
    [
        (lambda: DDPMScheduler(prediction_type="v_prediction"), "vp", "v_prediction", "beta_schedule", "linear"),
        (lambda: DDIMScheduler(beta_schedule="scaled_linear"), "vp", "epsilon", "beta_schedule", "scaled_linear"),
        (lambda: LCMScheduler(beta_end=0.015), "vp", "epsilon", "beta_end", 0.015),
        (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), "flow", "flow", "shift", 3.0),
        (lambda: SCMScheduler(sigma_data=0.7), "trigflow", "trigflow", "sigma_data", 0.7),
        (lambda: DDIMScheduler(trained_betas=TRAINED), "vp", "epsilon", "trained_betas", TRAINED),
        (
            lambda: LCMScheduler(**ZSNR, prediction_type="v_prediction"),
            "vp",
            "v_prediction",
            "rescale_betas_zero_snr",
            1,
        ),
        (lambda: CogVideoXDPMScheduler.from_config(COGVIDEOX_2B), "vp", "v_prediction", "snr_shift_scale", 3.0),
    ],
    ids=["ddpm", "ddim", "lcm", "flow-match", "scm", "ddim-trained-betas", "lcm-zero-snr", "cogvideox-dpm"],
)
def test_from_config_reads_foreign_schedulers(tmp_path, saved, foreign, kind, prediction, key, value):
    """FewStepScheduler keeps the stock scheduler's schedule: for VP its alphas_cumprod, to float32's rounding."""
    config = foreign().config
    if saved:  # as pipe.scheduler.config of a loaded pipeline: carries _class_name
        foreign().save_config(tmp_path)
        config = FewStepScheduler.load_config(tmp_path)
        assert config["_class_name"] != "FewStepScheduler"
    ours = FewStepScheduler.from_config(config, gamma=0.25)
    assert ours.config.schedule["kind"] == kind and ours.schedule.kind == kind
    assert ours.config.schedule[key] == value
    assert ours.config.prediction_type == prediction
    assert ours.config.gamma == 0.25
    assert FewStepScheduler.from_config(ours.config).config.schedule == ours.config.schedule  # own config: kept
    if kind == "vp":
        ref = foreign().alphas_cumprod.double()
        torch.testing.assert_close(ours.schedule.alphas_cumprod, ref, rtol=1e-4, atol=1e-9)


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_compatibles_lists_itself_and_the_stock_schedulers():
    names = [c.__name__ for c in FewStepScheduler().compatibles]
    assert names[0] == "FewStepScheduler" and sorted(names[1:]) == sorted(FewStepScheduler._compatibles)


def non_default_stock(cls):
    """cls with a schedule other than its default (and trailing timesteps where it has the key)."""
    schedule, _ = schedule_from_diffusers_config(cls())
    if isinstance(schedule, VP):
        kwargs: dict = {"beta_schedule": "scaled_linear", "beta_start": 0.0009, "beta_end": 0.013}
    else:
        kwargs = {"shift": 3.0} if isinstance(schedule, Flow) else {"sigma_data": 0.7}
    if "timestep_spacing" in cls().config:
        kwargs["timestep_spacing"] = "trailing"
    return cls(**kwargs)


@pytest.mark.parametrize("name", FewStepScheduler._compatibles)
def test_every_compatible_scheduler_swaps_in_and_back(tmp_path, name):
    """What ``_compatibles`` promises, for each class it lists: FewStepScheduler.from_config(stock.config) (in memory
    and from a saved folder) keeps the stock schedule and prediction type, and samples; Stock.from_config of that
    config gives the stock scheduler back, its config and table unchanged."""
    cls = getattr(diffusers, name)
    stock = non_default_stock(cls)
    stock.save_config(tmp_path / "stock")
    expected, prediction = schedule_from_diffusers_config(stock)
    for config in (stock.config, FewStepScheduler.load_config(tmp_path / "stock")):
        ours = FewStepScheduler.from_config(config)
        assert ours.schedule == expected and ours.config.prediction_type == prediction
        if isinstance(expected, VP):
            ref = stock.alphas_cumprod.double()
            torch.testing.assert_close(ours.schedule.alphas_cumprod, ref, rtol=1e-4, atol=1e-9)
        ours.set_timesteps(2)
        x = ours.init_noise_sigma * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in ours.timesteps:
            x = ours.step(0.1 * x, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.isfinite(x).all()

        back = cls.from_config(ours.config)  # it also carries FewStepScheduler's keys, as diffusers' swaps do
        assert {k: back.config[k] for k in _public(stock.config)} == _public(stock.config)
        if isinstance(expected, VP):
            assert torch.equal(back.alphas_cumprod, stock.alphas_cumprod)


def test_explicit_betas_survive_save_and_swap(tmp_path):
    """A FewStepScheduler read from a config with trained_betas and zero terminal SNR writes them to its JSON, reads
    them back, and a stock scheduler loaded from its folder has the original table."""
    ddim = DDIMScheduler(trained_betas=TRAINED, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ours = FewStepScheduler.from_config(ddim.config, gamma=0.5, plan={"2": [999.0, 499.0]})
    ours.save_config(tmp_path)
    loaded = FewStepScheduler.from_pretrained(tmp_path)
    assert loaded.schedule == ours.schedule and loaded.schedule.trained_betas == tuple(TRAINED)
    assert _public(loaded.config) == _public(ours.config)
    assert torch.equal(LCMScheduler.from_pretrained(tmp_path).alphas_cumprod, ddim.alphas_cumprod)


def test_save_load_round_trip(tmp_path):
    scheduler = FewStepScheduler(
        schedule=VP(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
        prediction_type="v_prediction",
        plan={2: (999, 400.5)},  # non-JSON forms are stored canonically, so the saved file reads back equal
        gamma=0.4,
        t_min=1.0,
    )
    scheduler.save_config(tmp_path)
    loaded = FewStepScheduler.from_pretrained(tmp_path)
    assert _public(loaded.config) == _public(scheduler.config)
    assert _public(FewStepScheduler.from_config(scheduler.config).config) == _public(scheduler.config)
    for steps in (2, 3):
        outs = []
        for s in (scheduler, loaded):
            s.set_timesteps(steps)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
            for i, t in enumerate(s.timesteps):
                x = s.step(torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)), t, x, generator=g)[0]
            outs.append(x)
        assert torch.equal(*outs)


def test_set_timesteps():
    scheduler = FewStepScheduler(schedule={"kind": "flow", "shift": 3.0}, plan={"2": [1.0, 0.6]})
    for bad in (0, -1):
        with pytest.raises(ValueError):
            scheduler.set_timesteps(bad)
    scheduler.set_timesteps(2)  # from the plan
    torch.testing.assert_close(scheduler.times, torch.tensor([1.0, 0.6], dtype=torch.float64))
    assert scheduler.timesteps.dtype == torch.float32
    torch.testing.assert_close(scheduler.timesteps, torch.tensor([1000.0, 600.0]))
    scheduler.set_timesteps(4)  # not in the plan: SD3's shifted grid, as FlowMatchEulerDiscreteScheduler gives
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(scheduler.times.float(), reference.sigmas[:-1])
    with pytest.raises(ValueError):
        FewStepScheduler(plan={"2": [0.6, 1.0]})  # not decreasing


def test_init_noise_sigma_and_add_noise_match_diffusers():
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = FewStepScheduler.from_config(ddpm.config)
    assert math.isclose(ours.init_noise_sigma, ddpm.init_noise_sigma, rel_tol=1e-6)  # unit variance at T
    assert FewStepScheduler(schedule={"kind": "trigflow", "sigma_data": 0.7}).init_noise_sigma == pytest.approx(0.7)
    edm = EDMEulerScheduler(sigma_max=80.0)
    ours_edm = FewStepScheduler(schedule={"kind": "edm", "sigma_max": 80.0})
    assert ours_edm.init_noise_sigma == pytest.approx(edm.init_noise_sigma)
    assert FewStepScheduler().init_noise_sigma == 1.0 and len(ours) == 1000
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    timesteps = torch.tensor([0, 999])
    torch.testing.assert_close(ours.add_noise(x0, eps, timesteps), ddpm.add_noise(x0, eps, timesteps))


def test_drop_in_replacement_in_ddpm_pipeline():
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    scheduler = FewStepScheduler.from_config(DDPMScheduler().config, gamma=0.5)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    assert {FewStepScheduler, DDPMScheduler, DDIMScheduler} <= set(pipe.scheduler.compatibles)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np")

    g = torch.Generator().manual_seed(0)  # the same loop by hand
    x = randn_tensor((2, 1, 8, 8), generator=g)
    scheduler.set_timesteps(2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=g).prev_sample
    expected = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    torch.testing.assert_close(torch.from_numpy(images.images), torch.from_numpy(expected))


def test_flux_style_sigmas_and_explicit_timesteps():
    """Pipelines that pass sigmas= (and mu=) through diffusers' retrieve_timesteps get those times unless the
    student's plan for that step count exists, which wins."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    sigmas = np.linspace(1.0, 1 / 4, 4)
    free = FewStepScheduler(schedule={"kind": "flow"})
    timesteps, n = retrieve_timesteps(free, 4, "cpu", sigmas=sigmas, mu=0.5)
    assert n == 4 and torch.allclose(timesteps, torch.tensor(sigmas * 1000, dtype=torch.float32))
    planned = FewStepScheduler(schedule={"kind": "flow"}, plan={"4": [1.0, 0.8, 0.5, 0.2]})
    timesteps, _ = retrieve_timesteps(planned, 4, "cpu", sigmas=sigmas, mu=0.5)
    assert torch.allclose(timesteps, torch.tensor([1000.0, 800.0, 500.0, 200.0]))
    vp = FewStepScheduler(schedule={"kind": "vp"}, prediction_type="epsilon")
    vp.set_timesteps(timesteps=[999, 499])
    assert vp.times.tolist() == [999.0, 499.0] and vp.num_inference_steps == 2
    with pytest.raises(ValueError):
        vp.set_timesteps(sigmas=[1.0, 0.5])  # ambiguous on VP
    with pytest.raises(ValueError):
        free.set_timesteps(timesteps=[500, 900])  # not decreasing


def test_dynamic_shifting_follows_flow_match_euler():
    """Flux-style configs: with sigmas and mu from the pipeline, gamma = 0 reproduces FlowMatchEuler exactly."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    stock = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    ours = FewStepScheduler.from_config(stock.config, gamma=0.0)
    assert ours.config["use_dynamic_shifting"] is True
    sigmas = np.linspace(1.0, 1 / 4, 4)
    t_stock, _ = retrieve_timesteps(stock, 4, "cpu", sigmas=sigmas, mu=0.9)
    t_ours, _ = retrieve_timesteps(ours, 4, "cpu", sigmas=sigmas, mu=0.9)
    torch.testing.assert_close(t_ours, t_stock.float(), rtol=1e-5, atol=1e-3)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    x_stock = x_ours = x
    for t in t_stock:  # the same model output every step: the two samplers must stay together
        x_stock = stock.step(out, t, x_stock, return_dict=False)[0]
        x_ours = ours.step(out, t, x_ours, return_dict=False)[0]
    torch.testing.assert_close(x_ours, x_stock, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mu"):
        ours.set_timesteps(4)


def test_sigmas_are_the_stock_schedulers_own_for_the_same_times() -> None:
    """Pipelines read ``scheduler.sigmas`` (WanPipeline's cache context): flow times on a Flow schedule, as
    FlowMatchEulerDiscreteScheduler has them; the noise-to-signal ratio on VP, as EulerDiscreteScheduler has it."""
    import diffusers

    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = FewStepScheduler.from_config(flow.config)
    flow.set_timesteps(4)
    ours.set_timesteps(timesteps=flow.timesteps.tolist())
    torch.testing.assert_close(ours.sigmas, flow.sigmas)

    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing")
    ours = FewStepScheduler.from_config(euler.config)
    euler.set_timesteps(4)
    ours.set_timesteps(timesteps=euler.timesteps.tolist())
    torch.testing.assert_close(ours.sigmas, euler.sigmas, rtol=1e-4, atol=1e-5)


def test_tcd_rule_outputs_match_tcd_schedulers_pair_at_every_step() -> None:
    """Under TCD's rule both outputs of step() are TCDScheduler's: (prev_sample, pred_noised_sample), the latter the
    final sample on the last step, which PixArt's one-step loop returns (``step(...)[1]``)."""
    tcd = diffusers.TCDScheduler()
    ours = FewStepScheduler.from_config(tcd.config, rule="tcd", gamma=0.0, plan={"1": [999.0], "2": [999.0, 499.0]})
    x, out = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for n in (1, 2):
        tcd.set_timesteps(n)
        ours.set_timesteps(n)
        for t_tcd, t_ours in zip(tcd.timesteps, ours.timesteps, strict=True):
            a = tcd.step(out, t_tcd, x, eta=0.0, return_dict=False)
            b = ours.step(out, t_ours, x, return_dict=False)
        torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)
