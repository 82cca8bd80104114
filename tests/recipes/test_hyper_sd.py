"""Hyper-SD's TSCD stage: segment edges, the DDIM jump to an edge, the loss's exact solution, the progressive stage
schedule with its adversarial stages, the LoRA student, plans, and export / reload on digits and on tiny SD and SD3
pipelines."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.loading import load_denoiser, load_pipeline
from fewstep.objectives.consistency import segment_edge, segment_edges, segment_output
from fewstep.recipes.base import Batch
from fewstep.recipes.hyper_sd import HyperSD, HyperSDConfig
from fewstep.sampling import initial_noise
from fewstep.training.data import DigitsBatches, null_class_of

FIXED_W = {"w_min": 1.0, "w_max": 1.0}
TINY_STAGES = {"stage_steps": (2, 2, 2, 2), "lora_rank": 4}


def test_segment_edges_are_the_k_step_euler_grid_and_each_time_maps_to_the_edge_below(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    edges = segment_edges(teacher.native, 4)  # flow, shift 1: 1, 0.75, 0.5, 0.25, 0
    torch.testing.assert_close(edges, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    t = torch.tensor([1.0, 0.76, 0.75, 0.74, 0.5, 0.26, 0.25, 0.02])
    expected = torch.tensor([0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0])  # an edge opens the segment below it
    torch.testing.assert_close(segment_edge(t, edges), expected)
    torch.testing.assert_close(segment_edge(t, segment_edges(teacher.native, 1)), torch.zeros(8))


class _PointMass:
    """The exact denoiser of data that is one image x0*: x0(x_t, t) = x0* for every input (guided alike), so that the
    probability-flow ODE's trajectories are the straight lines alpha_t x0* + sigma_t eps and DDIM steps are exact."""

    def __init__(self, native: Any, x0: torch.Tensor, scale: float = 1.0):
        self.native, self.x0, self.scale = native, x0, scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self.scale * self.x0.expand_as(x)

    def guided(self, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, w: Any) -> torch.Tensor:
        return self.x0.expand_as(x)


@pytest.mark.parametrize("k", [8, 4, 2, 1])
def test_tscd_loss_vanishes_when_student_and_target_are_the_exact_solution(random_digits: Path, k: int) -> None:
    """On point-mass data the teacher's DDIM step is exact and f(x_t, t -> e) = alpha_e x0* + sigma_e eps for every t
    of the segment: the student at (x_t, t) and the target at (x_s, s) meet exactly at the edge, including where s is
    the edge (the boundary branch). A student off the solution (x0 scaled by 0.9) gives a positive loss."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = HyperSD(teacher, HyperSDConfig(**FIXED_W, segments=(k,), stage_steps=(1,), lora_rank=4, adv_weight=0.0))
    x0 = torch.randn(1, 1, 8, 8).expand(512, 1, 8, 8).contiguous()
    batch = Batch(x0=x0, cond={"class_labels": torch.zeros(512, dtype=torch.long)}, uncond={})
    exact = _PointMass(teacher.native, x0[:1])
    recipe.teacher, recipe.target, recipe.student = exact, exact, exact  # type: ignore[assignment]
    assert recipe.loss(batch, 0)["student"].item() < 1e-10
    recipe.student = _PointMass(teacher.native, x0[:1], scale=0.9)  # type: ignore[assignment]
    assert recipe.loss(batch, 0)["student"].item() > 1e-4


def test_jump_to_its_own_time_is_the_identity_and_to_t_min_the_x0_estimate(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    x, cond = torch.randn(3, 1, 8, 8), {"class_labels": torch.arange(3)}
    t = torch.tensor([0.9, 0.5, 0.1])
    torch.testing.assert_close(segment_output(teacher, x, t, t, cond), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(segment_output(teacher, x, t, torch.zeros(3), cond), teacher(x, t, cond))


def test_stages_run_progressively_and_the_adversarial_term_joins_the_last_two(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = HyperSD(teacher, HyperSDConfig(**FIXED_W, **TINY_STAGES))
    assert [recipe.stage(s) for s in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]  # the last stage runs on
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    keys = [set(recipe.loss(batch, s)) for s in (0, 2, 4, 6)]
    assert keys == [{"student"}, {"student"}, {"student", "critic"}, {"student", "critic"}]
    trainable = [n for n, p in recipe.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and recipe.target_model is recipe.model
    no_adv = HyperSD(teacher, HyperSDConfig(**FIXED_W, **TINY_STAGES, adv_weight=0.0))
    assert no_adv.disc is None and set(no_adv.loss(batch, 6)) == {"student"}


def test_bad_stage_settings_are_one_line_errors(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    with pytest.raises(FewstepError, match="one stage_steps entry per segments entry"):
        HyperSD(teacher, HyperSDConfig(segments=(8, 4), stage_steps=(10,)))
    with pytest.raises(FewstepError, match="non-increasing"):
        HyperSD(teacher, HyperSDConfig(segments=(2, 4), stage_steps=(1, 1)))
    with pytest.raises(FewstepError, match=r"lora_extra_targets \['nope'\] name no Linear or Conv2d layer"):
        HyperSD(teacher, HyperSDConfig(lora_rank=4, lora_extra_targets=("norm1.linear", "nope")))


def test_plans_are_the_segment_edges_with_tcds_gamma(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    plans = HyperSD(teacher, HyperSDConfig(**FIXED_W, lora_rank=4)).plan()
    assert sorted(plans) == [1, 2, 4, 8]
    assert plans[4].times == pytest.approx((1.0, 0.75, 0.5, 0.25))
    assert plans[8].times == pytest.approx(tuple(1 - i / 8 for i in range(8)))
    assert {p.gamma for p in plans.values()} == {0.3}


@pytest.mark.parametrize("extra", [(), ("norm1.linear", "proj_out_1", "proj_out_2")])
def test_lora_student_folder_loads_as_a_pipeline_with_its_adapter_merged(
    random_digits: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """The exported LoRA folder names its base; load_pipeline gives the base with the adapter merged (the trained
    student's outputs) and the student's scheduler, so bench and sample take the folder as they take a pipeline.
    With ``lora_extra_targets`` the DiT's time modulations and output layers carry adapters too and survive the
    round trip."""
    from fewstep.distill import run_distill
    from fewstep.loading import LORA_BASE, resolve_source
    from fewstep.training.checkpoint import load_checkpoint
    from fewstep.training.config import merge_into

    run = {"train": {"max_steps": 4, "batch_size": 4, "progress": False}}
    cfg = merge_into(HyperSDConfig(**FIXED_W, **TINY_STAGES, segments=(2, 1), lr=1e-2), run)
    cfg = merge_into(cfg, {"stage_steps": [2, 2], "lora_extra_targets": list(extra)})
    out = run_distill(HyperSD, cfg, teacher=str(random_digits), output=tmp_path / "run", bench=False)
    assert (out / LORA_BASE).is_file() and resolve_source(str(out)) == str(out)
    pipe = load_pipeline(str(out))
    assert type(pipe.scheduler).__name__ == "FewStepScheduler" and pipe.scheduler.config.gamma == 0.3
    teacher, _ = load_denoiser(str(random_digits))
    recipe = HyperSD(teacher, cfg)
    _, state = load_checkpoint(tmp_path / "run" / "checkpoints")
    recipe.model.load_state_dict(state["ema"]["student"])
    adapted = {
        n.removesuffix(".lora_A.default") for n, _ in recipe.model.named_modules() if n.endswith("lora_A.default")
    }
    assert all(any(n.endswith(e) for n in adapted) for e in extra) and any(n.endswith("to_q") for n in adapted)
    assert any(n.endswith("norm1.linear") for n in adapted) == bool(extra)
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 200.0]), torch.tensor([1, 2])
    expected = recipe.model(x, timestep=t, class_labels=labels).sample
    base = load_pipeline(str(random_digits)).transformer(x, timestep=t, class_labels=labels).sample
    assert not torch.allclose(expected, base)  # the adapter was trained
    merged = pipe.transformer(x, timestep=t, class_labels=labels).sample
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    # the model card's snippet, as a user pastes it: fewstep loads the digits world's classes, not prompts
    card = (out / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "model-card", "exec"), namespace)
    assert namespace["images"].shape == (4, 1, 8, 8) and torch.isfinite(namespace["images"]).all()
    (out / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FewstepError, match="could not load the LoRA student"):
        load_pipeline(str(out))


@pytest.mark.parametrize("teacher", ["sd_folder", "sd3_folder", "sdxl"])
def test_every_stage_distills_exports_and_samples_at_1_2_4_and_8_steps(
    teacher: str, tmp_path: Path, request: pytest.FixtureRequest, tiny_clip_spec: str
) -> None:
    """k = 8, 4, 2, 1 (the adversarial term in the last two, at PCM's weight), the feedback stage with an aesthetic
    head on CLIP embeddings of the VAE-decoded x0, and the one-step score-distillation stage, one step each, on tiny
    SD, SD3 and SDXL teachers; the LoRA folder reloads and samples at 1, 2, 4, 8."""
    from families import FAMILIES

    from fewstep.distill import run_distill
    from fewstep.training.config import merge_into

    if teacher == "sdxl":
        source = tmp_path / "sdxl"
        FAMILIES["sdxl"]().save_pretrained(source)
    else:
        source = request.getfixturevalue(teacher)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nthe blue square\n")
    head = tmp_path / "aesthetic.pt"  # a linear head on the tiny CLIP's 16-d embeddings
    torch.save({"weight": torch.randn(1, 16), "bias": torch.zeros(1)}, head)
    run = {
        "train": {"max_steps": 6, "batch_size": 2, "progress": False, "checkpoint_every": 2},
        "data": {"teacher_steps": 2, "teacher_guidance": 2.0, "prompts": str(prompts)},
        "stage_steps": [1, 1, 1, 1],
        "dmd_steps": 1,
        "fake_lora_rank": 4,
        "reward": f"aesthetic:{head}",
        "reward_clip": tiny_clip_spec,
        "reward_steps": 1,
        "reward_plan_steps": 2,
    }
    cfg = merge_into(HyperSDConfig(lora_rank=4), run)
    out = run_distill(HyperSD, cfg, teacher=str(source), output=tmp_path / "run")
    pipe = load_pipeline(str(out))
    # on the VP teachers the plans take TCD's own rule and export stock TCDScheduler, run with the card's eta
    tcd = teacher in ("sd_folder", "sdxl")
    assert type(pipe.scheduler).__name__ == ("TCDScheduler" if tcd else "FewStepScheduler")
    assert ("eta=0.3" in (out / "README.md").read_text()) == tcd
    for steps in (1, 2, 4, 8):
        eta = {"eta": 0.3} if tcd else {}
        images = pipe(
            prompt=["a red circle"], num_inference_steps=steps, guidance_scale=1.0, output_type="pt", **eta
        ).images
        assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    if tcd:  # plain diffusers: base pipeline, load_lora_weights, the folder's TCDScheduler, eta from the card's table
        import json

        from diffusers import DiffusionPipeline, TCDScheduler

        from fewstep.export.scheduling_fewstep import FewStepScheduler

        training = json.loads((out.parent / "training.json").read_text())
        plain = DiffusionPipeline.from_pretrained(source)
        plain.load_lora_weights(out)
        plain.set_progress_bar_config(disable=True)
        for steps in (2, 4):
            kwargs = {"prompt": ["a red circle"], "num_inference_steps": steps, "guidance_scale": 1.0}
            plain.scheduler = TCDScheduler.from_pretrained(out, subfolder="scheduler")
            stock = plain(**kwargs, eta=0.3, generator=torch.Generator().manual_seed(0), output_type="latent")[0]
            plan = {str(steps): training["plans"][str(steps)]}
            plain.scheduler = FewStepScheduler.from_config(plain.scheduler.config, rule="tcd", gamma=0.3, plan=plan)
            ours = plain(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent")[0]
            torch.testing.assert_close(stock, ours, rtol=1e-5, atol=1e-5)


def test_a_missing_reward_model_fails_before_training(random_digits: Path, tmp_path: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    with pytest.raises(FewstepError, match="reward model 'nowhere' not found"):
        HyperSD(teacher, HyperSDConfig(**FIXED_W, **TINY_STAGES, reward="nowhere", reward_steps=1))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FewstepError, match="does not load"):
        HyperSD(teacher, HyperSDConfig(**FIXED_W, **TINY_STAGES, reward=str(tmp_path), reward_steps=1))
    with pytest.raises(FewstepError, match="needs a reward model"):
        HyperSD(teacher, HyperSDConfig(**FIXED_W, **TINY_STAGES, reward_steps=1))


def test_feedback_stage_follows_tscd_and_its_loss_raises_the_reward(random_digits: Path) -> None:
    """The feedback stage's loss is the last TSCD loss minus reward_weight times the scorer's reward of late x0
    estimates: a few Adam steps on it (reward-dominated) raise the reward measured on the same draws."""
    teacher, _ = load_denoiser(str(random_digits))
    cfg = HyperSDConfig(
        **FIXED_W, segments=(1,), stage_steps=(0,), reward="digits", reward_steps=10, reward_weight=10.0,
        lora_rank=4, adv_weight=0.0,
    )  # fmt: skip
    recipe = HyperSD(teacher, cfg)
    assert [kind for kind, _, _ in recipe.stages] == ["tscd", "reward"] and recipe.stage(0) == 1
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=16)(0)

    def measured() -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return float(recipe.late_reward(batch).mean())

    before = measured()
    opt = torch.optim.Adam([p for p in recipe.model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        torch.manual_seed(0)
        opt.zero_grad()
        recipe.loss(batch, 0)["student"].backward()
        opt.step()
    assert measured() > before + 0.1


def test_score_distillation_stage_comes_last_and_its_gradient_vanishes_when_fake_equals_teacher(
    random_digits: Path,
) -> None:
    """DMD's gradient is (x0_fake - x0_real) / normalizer: with the fake score a fresh copy of the teacher and the
    teacher unguided it is exactly 0; guided (w 3) it is not."""
    teacher, _ = load_denoiser(str(random_digits))
    stages = {"segments": (2, 1), "stage_steps": (1, 1), "lora_rank": 4, "adv_weight": 0.0}
    recipe = HyperSD(teacher, HyperSDConfig(**FIXED_W, **stages, dmd_steps=5))
    assert [kind for kind, _, _ in recipe.stages] == ["tscd", "tscd", "dmd"]
    assert set(recipe.trainable()) == {"student", "fake"}
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=8)(0)
    out = recipe.loss(batch, 2)
    assert set(out) == {"student", "fake"} and torch.isfinite(out["fake"])
    assert recipe.dmd_losses(batch)["dmd"].item() == 0.0
    guided = HyperSD(teacher, HyperSDConfig(w_min=3.0, w_max=3.0, **stages, dmd_steps=5))
    assert guided.dmd_losses(batch)["dmd"].item() > 0


def test_a_gamma_per_step_count_reaches_the_plans_the_exported_scheduler_and_the_card(
    random_digits: Path, tmp_path: Path
) -> None:
    """plan_gammas gives each step count its own gamma: FewStepScheduler's ``gammas`` runs an n-step loop exactly as
    a scheduler whose one gamma is gammas[n] does, and the model card states each step count's gamma."""
    from fewstep.distill import run_distill
    from fewstep.export.pipeline import _RandomModel, fewstep_scheduler, run_loop
    from fewstep.training.config import merge_into

    teacher, _ = load_denoiser(str(random_digits))
    cfg = HyperSDConfig(**FIXED_W, **TINY_STAGES, plan_gammas=(1.0, 0.3, 0.5, 0.7))
    plans = HyperSD(teacher, cfg).plan()
    assert {n: p.gamma for n, p in plans.items()} == {1: 1.0, 2: 0.3, 4: 0.5, 8: 0.7}
    mixed = fewstep_scheduler(plans, teacher.prediction)
    assert mixed.config.gammas == {"2": 0.3, "4": 0.5, "8": 0.7}
    model, noise = _RandomModel((2, 1, 3, 3)), torch.randn(2, 1, 3, 3)
    for n, gamma in ((2, 0.3), (4, 0.5), (8, 0.7)):
        alone = fewstep_scheduler({m: dataclasses.replace(p, gamma=gamma) for m, p in plans.items()}, "flow")
        torch.testing.assert_close(run_loop(mixed, n, model, noise), run_loop(alone, n, model, noise))
    assert not torch.allclose(run_loop(mixed, 4, model, noise), run_loop(mixed.__class__.from_config(
        {**mixed.config, "gammas": None}), 4, model, noise))  # fmt: skip
    with pytest.raises(FewstepError, match="one plan_gammas entry per plan_steps entry"):
        HyperSD(teacher, HyperSDConfig(**FIXED_W, **TINY_STAGES, plan_gammas=(1.0,)))
    run = {"train": {"max_steps": 1, "batch_size": 4, "progress": False}}
    out = run_distill(HyperSD, merge_into(cfg, run), teacher=str(random_digits), output=tmp_path / "run", bench=False)
    card = (out / "README.md").read_text()
    assert "| gamma (TCD's eta) |" in card and "| 1, 0.75, 0.5, 0.25 | 0.5 |" in card  # the 4-step row and its gamma


def _dmd_recipe(teacher: Any, **kw: Any) -> HyperSD:
    stages = {"segments": (2, 1), "stage_steps": (1, 1), "lora_rank": 4, "adv_weight": 0.0}
    recipe = HyperSD(teacher, HyperSDConfig(**{**FIXED_W, **stages, "dmd_steps": 5, **kw}))
    with torch.no_grad():  # a LoRA that moves the student off the teacher, so that every sampler's output differs
        for name, p in recipe.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return recipe


def _one_step_dmd_by_hand(recipe: HyperSD, batch: Any, w: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0_G, DMD loss, fake-score loss) of ``dmd_plans = (1,)`` written out, drawing in the recipe's order from the
    current RNG state: x0_G = f(z, t_max), the teacher guided at ``w`` as the real score, the first fake score."""
    from fewstep import batch_random
    from fewstep.objectives.dmd import distribution_matching_loss, fake_score_loss, uniform_times
    from fewstep.sampling import initial_noise

    native, cfg, cond = recipe.teacher.native, recipe.cfg, batch.cond
    b = batch.x0.shape[0]
    t_max = torch.full((b,), native.t_max)
    x0_gen = recipe.student(initial_noise(native, native.t_max, batch_random.randn_like(batch.x0)), t_max, cond)
    real = lambda x, t: recipe.teacher.guided(x, t, cond, batch.uncond, w)  # noqa: E731
    fake = lambda x, t: recipe.fakes[0](x, t, cond)  # noqa: E731
    t = uniform_times(native, b, cfg.dmd_t_min, cfg.dmd_t_max)
    dmd, _ = distribution_matching_loss(x0_gen, t, native, real, fake)
    t_f = uniform_times(native, b, cfg.dmd_t_min, cfg.dmd_t_max)
    return x0_gen, dmd, fake_score_loss(x0_gen, t_f, native, fake, weighting=cfg.fake_weighting)


def test_one_step_score_distillation_is_dmd_on_the_sample_from_pure_noise(random_digits: Path) -> None:
    """``dmd_plans = (1,)`` (the paper's): the losses equal DMD written out on x0_G = f(z, t_max) with the teacher as
    the real score, draw for draw."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = _dmd_recipe(teacher, w_min=2.0, w_max=2.0)
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=6)(0)
    torch.manual_seed(3)
    losses = recipe.dmd_losses(batch)
    dmd, fake_loss = losses["dmd"], losses["fake"]
    assert set(losses) == {"dmd", "fake"}
    torch.manual_seed(3)
    _, expected, expected_fake = _one_step_dmd_by_hand(recipe, batch, 2.0)
    assert dmd.item() > 0
    torch.testing.assert_close(dmd, expected, rtol=0, atol=0)
    torch.testing.assert_close(fake_loss, expected_fake, rtol=0, atol=0)


@pytest.mark.parametrize(("plan_rows", "rows_of"), [((), ([0, 2, 4], [1, 3, 5])), ((2, 1), ([0, 1, 3, 4], [2, 5]))])
def test_score_distillation_over_several_samplers_reads_each_samplers_output_on_its_rows(
    random_digits: Path, monkeypatch: pytest.MonkeyPatch, plan_rows: tuple[int, ...], rows_of: tuple[list[int], ...]
) -> None:
    """``dmd_plans = (1, 4)``: rows 0, 2, 4 hold the one-step sample and rows 1, 3, 5 the exported 4-step sampler's
    output (its gamma and times; the backward simulation is ``sampling.plan_states``, tested in test_sampling), each
    with its rows' classes, and with ``dmd_fake_per_plan`` each sampler's samples train and are read by their own
    fake score. ``dmd_plan_rows = (2, 1)`` deals two rows of every three to the one-step sampler."""
    import fewstep.recipes.hyper_sd as module

    teacher, _ = load_denoiser(str(random_digits))
    recipe = _dmd_recipe(
        teacher, dmd_plans=(1, 4), dmd_fake_per_plan=True, plan_gammas=(1.0, 0.3, 0.5, 0.7), dmd_plan_rows=plan_rows
    )
    assert isinstance(recipe.fake_nets, torch.nn.ModuleList) and len(recipe.fake_nets) == 2
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=6)(0)
    labels = batch.cond["class_labels"]
    simulated: list[Any] = []
    outputs: list[torch.Tensor] = []
    fakes_read: list[tuple[int, torch.Tensor]] = []
    real_plan_states, real_dml = module.plan_states, module.distribution_matching_loss

    def recording_plan_states(denoise: Any, plans: Any, noises: Any, ks: Any) -> list[torch.Tensor]:
        states = real_plan_states(denoise, plans, noises, ks)
        simulated.append((list(plans), list(ks), [n.clone() for n in noises], [x.clone() for x in states]))
        return states

    def recording_dml(x0_gen: torch.Tensor, t: torch.Tensor, schedule: Any, real: Any, fake: Any, **kw: Any) -> Any:
        outputs.append(x0_gen.detach().clone())
        return real_dml(x0_gen, t, schedule, real, fake, **kw)

    def reading(j: int, f: Any) -> Any:
        def read(x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
            fakes_read.append((j, cond["class_labels"].clone()))
            return f(x, t, cond)

        return read

    monkeypatch.setattr(module, "plan_states", recording_plan_states)
    monkeypatch.setattr(module, "distribution_matching_loss", recording_dml)
    monkeypatch.setattr(recipe, "fakes", [reading(j, f) for j, f in enumerate(recipe.fakes)])
    torch.manual_seed(0)
    fake_loss = recipe.dmd_losses(batch)["fake"]
    ((plans, ks, noises, states),) = simulated
    assert plans == [recipe.plan()[1], recipe.plan()[4]] and plans[1].gamma == 0.5 and ks == [0, 3]
    assert [len(z) for z in noises] == [len(rows) for rows in rows_of]
    assert torch.equal(states[0], initial_noise(teacher.native, plans[0].times[0], noises[0]))
    assert not torch.allclose(states[1], initial_noise(teacher.native, plans[1].times[0], noises[1]))  # simulated
    (x0_gen,) = outputs
    parts = x0_gen.split([len(rows) for rows in rows_of])
    for j, (plan, k, state, gen) in enumerate(zip(plans, ks, states, parts, strict=True)):
        t = torch.full((len(state),), plan.times[k])
        with torch.no_grad():
            expected = recipe.student(state, t, {"class_labels": labels[rows_of[j]]})
        torch.testing.assert_close(gen, expected, rtol=1e-5, atol=1e-5)  # one batched forward against one per part
    assert not torch.allclose(parts[0][: len(parts[1])], parts[1])  # the two samplers' outputs differ
    # each fake read (for DMD, then for its own loss) on its sampler's rows only
    per_part = [(j, labels[rows].tolist()) for j, rows in enumerate(rows_of)]
    assert [(j, c.tolist()) for j, c in fakes_read] == 2 * per_part
    fake_loss.backward()
    for net in recipe.fake_nets:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_score_distillation_over_several_samplers_draws_per_sample_noise_whatever_the_process_count(
    random_digits: Path,
) -> None:
    """Every draw of the stage is per part, so two processes' slices (``batch_random.batch_slice``) reproduce the
    whole batch's losses: their mean equals the one process's (the samplers' rows dealt as on one process)."""
    from fewstep import batch_random
    from fewstep.training.parallel import slice_batch

    teacher, _ = load_denoiser(str(random_digits))
    plans = {"dmd_plans": (1, 2, 4), "dmd_fake_per_plan": True, "plan_gammas": (1.0, 0.3, 0.5, 0.7)}
    recipe = _dmd_recipe(teacher, w_min=2.0, w_max=2.0, **plans)  # guided, so that the real score is not the fake
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=12)(0)
    torch.manual_seed(5)
    whole = recipe.dmd_losses(batch)
    halves = []
    for i in range(2):
        torch.manual_seed(5)
        with batch_random.batch_slice(i, 2):
            halves.append(recipe.dmd_losses(slice_batch(batch, i, 2)))
    assert whole["dmd"] > 0
    for name in ("dmd", "fake"):
        torch.testing.assert_close((halves[0][name] + halves[1][name]) / 2, whole[name], rtol=1e-4, atol=1e-7)


def test_bad_score_distillation_samplers_are_one_line_errors(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    with pytest.raises(FewstepError, match=r"dmd_plans has \[3\], not in plan_steps"):
        _dmd_recipe(teacher, dmd_plans=(1, 3))
    with pytest.raises(FewstepError, match="dmd_plans is empty"):
        _dmd_recipe(teacher, dmd_plans=())
    recipe = _dmd_recipe(teacher, dmd_plans=(1, 2, 4, 8))
    with pytest.raises(FewstepError, match="at least 4 samples per process, got 3"):
        recipe.dmd_losses(DigitsBatches(null_class_of(teacher.model), batch_size=3)(0))
    with pytest.raises(FewstepError, match=r"one dmd_plan_rows entry per dmd_plans entry"):
        _dmd_recipe(teacher, dmd_plans=(1, 2), dmd_plan_rows=(3,))
    with pytest.raises(FewstepError, match="fake_steps must be at least 1, got 0"):
        _dmd_recipe(teacher, fake_steps=0)


def test_with_fake_steps_the_student_steps_every_kth_iteration_of_score_distillation_only(random_digits: Path) -> None:
    """DMD2's two time-scale rule (``fake_steps = 2``; stages: TSCD iterations 0 and 1, then score distillation): the
    TSCD stages step the student every iteration; in score distillation, iterations 2, 4 step both networks and 3, 5
    the fake score alone, with no gradient reaching the student and its EMA target left where it was."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = _dmd_recipe(teacher, fake_steps=2, lora_target="ema")
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    assert [set(recipe.loss(batch, step)) for step in range(6)] == [{"student"}] * 2 + [
        {"student", "fake"},
        {"fake"},
    ] * 2
    recipe.loss(batch, 3)["fake"].backward()
    assert all(p.grad is None for p in recipe.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.fake_nets.parameters())
    with torch.no_grad():
        for p in recipe.model.parameters():
            p.add_(0.01)
    before = [p.clone() for p in recipe.target_model.parameters()]
    recipe.after_step(3)
    assert all(torch.equal(a, b) for a, b in zip(before, recipe.target_model.parameters(), strict=True))
    recipe.after_step(4)
    assert not all(torch.equal(a, b) for a, b in zip(before, recipe.target_model.parameters(), strict=True))


def test_dmd_lr_is_the_students_rate_in_score_distillation_only(random_digits: Path) -> None:
    """Stages: TSCD iterations 0 and 1, then score distillation. ``dmd_lr`` scales the student's rate there and
    nowhere else; the fake score keeps ``fake_lr``; 0 leaves one rate for every stage."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = _dmd_recipe(teacher, lr=1e-4, dmd_lr=3e-4)
    assert [recipe.lr_scale("student", step) for step in range(4)] == pytest.approx([1.0, 1.0, 3.0, 3.0])
    assert [recipe.lr_scale("fake", step) for step in range(4)] == [1.0] * 4
    assert [_dmd_recipe(teacher, lr=1e-4).lr_scale("student", step) for step in range(4)] == [1.0] * 4


@pytest.mark.parametrize(("tscd_weight", "expected"), [(1.0, 2.0 + 3.0), (0.5, 1.0 + 3.0), (0.0, 3.0)])
def test_score_distillation_weights_the_tscd_term_by_dmd_tscd_weight_and_skips_it_at_zero(
    random_digits: Path, tscd_weight: float, expected: float
) -> None:
    """The student's loss in score distillation is dmd_tscd_weight * TSCD + dmd_weight * DMD; at weight 0 the TSCD
    term is not computed at all (its forwards are the saving), while the TSCD stages before it are untouched."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = _dmd_recipe(teacher, dmd_tscd_weight=tscd_weight)
    calls: list[int] = []

    def tscd(batch: Any, k: int) -> dict[str, torch.Tensor]:
        calls.append(k)
        return {"student": torch.tensor(2.0)}

    recipe.tscd_loss = tscd  # type: ignore[method-assign]
    recipe.dmd_losses = lambda batch, student=True: {"dmd": torch.tensor(3.0), "fake": torch.tensor(5.0)}  # type: ignore[method-assign]
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    assert recipe.loss(batch, 0)["student"].item() == 2.0  # a TSCD stage
    out = recipe.loss(batch, 2)  # score distillation
    assert out["student"].item() == expected and out["fake"].item() == 5.0
    assert calls == [2] + ([1] if tscd_weight > 0 else [])


def test_the_gan_beside_dmd_is_ladd_on_the_one_step_sample_against_real_x0_and_its_critic_steps_every_iteration(
    random_digits: Path,
) -> None:
    """``dmd_adv_weight`` (DMD2's GAN branch): "generator" and "critic" equal the hinge losses of the teacher-feature
    discriminator on x0_G = f(z, t_max) against the batch's real x0, draw for draw; the student's loss gains
    dmd_adv_weight * generator; the critic steps in the fake-only iterations too, and not in TSCD stages (where
    ``adv_weight`` is 0); the critic's gradient reaches the heads and not the LoRA, the generator's the LoRA."""
    from fewstep.objectives.adversarial import discriminator_times, ladd_losses

    teacher, _ = load_denoiser(str(random_digits))
    recipe = _dmd_recipe(teacher, dmd_adv_weight=0.25, fake_steps=2)
    assert recipe.disc is not None and set(recipe.trainable()) == {"student", "fake", "critic"}
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=6)(0)
    torch.manual_seed(3)
    losses = recipe.dmd_losses(batch)
    torch.manual_seed(3)
    x0_gen, _, _ = _one_step_dmd_by_hand(recipe, batch, 1.0)
    cfg, cond = recipe.cfg, batch.cond
    t_d = discriminator_times(teacher.native, 6, cfg.adv_p_mean, cfg.adv_p_std, cfg.adv_p_sigma_data)
    generator, critic = ladd_losses(recipe.disc, x0_gen, batch.x0, t_d, cond)
    torch.testing.assert_close(losses["generator"], generator, rtol=0, atol=0)
    torch.testing.assert_close(losses["critic"], critic, rtol=0, atol=0)
    lora = [p for n, p in recipe.model.named_parameters() if "lora" in n]
    losses["critic"].backward()
    assert all(p.grad is not None for p in recipe.disc.heads.parameters()) and all(p.grad is None for p in lora)
    losses["generator"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)

    assert [set(recipe.loss(batch, step)) for step in range(4)] == [{"student"}] * 2 + [
        {"student", "fake", "critic"},
        {"fake", "critic"},
    ]
    recipe.tscd_loss = lambda batch, k: {"student": torch.tensor(2.0)}  # type: ignore[method-assign]
    stub = {
        "dmd": torch.tensor(3.0),
        "fake": torch.tensor(5.0),
        "generator": torch.tensor(7.0),
        "critic": torch.tensor(11.0),
    }
    recipe.dmd_losses = lambda batch, student=True: stub  # type: ignore[method-assign]
    out = recipe.loss(batch, 2)
    assert out["student"].item() == 2.0 + 3.0 + 0.25 * 7.0 and out["critic"].item() == 11.0


def test_dmd2s_classifier_rides_on_each_samplers_fake_score_and_its_loss_trains_that_fake(random_digits: Path) -> None:
    """``dmd_adv_features = "fake"`` (DMD2's own classifier): heads on the fake score's features; "generator" and the
    critic equal ``score_gan_losses`` on x0_G = f(z, t_max) against the batch's real x0, draw for draw; the critic's
    loss times ``dmd_adv_critic_weight`` is inside "fake" (no "critic" group), so it trains the heads and the fake
    backbone and not the LoRA; the generator's reaches the LoRA; one set of heads per fake score."""
    from fewstep.objectives.adversarial import discriminator_times, score_gan_losses

    teacher, _ = load_denoiser(str(random_digits))
    recipe = _dmd_recipe(
        teacher, dmd_adv_weight=0.25, dmd_adv_features="fake", dmd_adv_critic_weight=0.5, fake_steps=2
    )
    assert recipe.disc is None and set(recipe.trainable()) == {"student", "fake"}
    assert [d.teacher for d in recipe.fake_discs] == recipe.fakes
    fake_group = set(recipe.trainable()["fake"].parameters())
    heads = list(recipe.fake_discs[0].heads.parameters())
    assert set(heads) <= fake_group and set(recipe.fakes[0].model.parameters()) <= fake_group
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=6)(0)
    torch.manual_seed(3)
    losses = recipe.dmd_losses(batch)
    torch.manual_seed(3)
    x0_gen, _, fake_loss = _one_step_dmd_by_hand(recipe, batch, 1.0)
    cfg = recipe.cfg
    t_d = discriminator_times(teacher.native, 6, cfg.adv_p_mean, cfg.adv_p_std, cfg.adv_p_sigma_data)
    generator, critic = score_gan_losses(recipe.fake_discs[0], x0_gen, batch.x0, t_d, batch.cond)
    assert set(losses) == {"dmd", "fake", "generator"}
    torch.testing.assert_close(losses["generator"], generator, rtol=0, atol=0)
    torch.testing.assert_close(losses["fake"], fake_loss + 0.5 * critic, rtol=0, atol=0)
    lora = [p for n, p in recipe.model.named_parameters() if "lora" in n]
    losses["fake"].backward(retain_graph=True)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads) and all(p.grad is None for p in lora)
    losses["generator"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert [set(recipe.loss(batch, step)) for step in range(4)] == [{"student"}] * 2 + [
        {"student", "fake"},
        {"fake"},
    ]
    per_plan = _dmd_recipe(
        teacher, dmd_adv_weight=0.25, dmd_adv_features="fake", dmd_plans=(1, 2), dmd_fake_per_plan=True
    )
    assert [d.teacher for d in per_plan.fake_discs] == per_plan.fakes and len(per_plan.fakes) == 2
