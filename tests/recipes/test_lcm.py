"""The LCM recipe: boundary condition, target-network EMA, the plan's times, LoRA variant, and a training step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.loading import load_denoiser
from fewstep.recipes import lcm as lcm_module
from fewstep.recipes.lcm import LCM, LCMConfig, with_times
from fewstep.training.data import DigitsBatches, null_class_of
from fewstep.training.trainer import TrainConfig, Trainer

FIXED_W = {"w_min": 1.0, "w_max": 1.0}


def test_consistency_function_is_the_identity_at_the_boundary(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = LCM(teacher, LCMConfig(**FIXED_W))
    x = torch.randn(3, 1, 8, 8)
    cond = {"class_labels": torch.arange(3)}
    t0 = torch.zeros(3)
    torch.testing.assert_close(recipe.f(recipe.student, x, t0, cond), x)
    t = torch.full((3,), 0.5)  # away from it, f is the x0 estimate up to c_skip ~ 1e-8
    torch.testing.assert_close(recipe.f(recipe.student, x, t, cond), recipe.student(x, t, cond), atol=1e-6, rtol=0)


def test_plan_takes_every_kth_grid_time_as_lcm_scheduler(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    plans = LCM(teacher, LCMConfig(**FIXED_W)).plan()
    # flow teacher without shift: the 50-point grid is 1, 0.98, ...; indices floor(linspace(0, 50, n)) as LCMScheduler
    assert plans[1].times == pytest.approx((1.0,))
    assert plans[2].times == pytest.approx((1.0, 0.5))
    assert plans[4].times == pytest.approx((1.0, 0.76, 0.5, 0.26))
    assert all(p.gamma == 1.0 for p in plans.values())


def test_with_times_adds_off_grid_times_inside_the_range_and_keeps_the_grid_descending() -> None:
    grid = torch.tensor([1.0, 0.5, 0.0])
    got = with_times(grid, [0.75, 0.5, 1.0, 0.25, 0.75, 2.0, -1.0])
    assert got.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert with_times(grid, [0.5 + 1e-8]) is grid  # already a point: unchanged


def test_the_consistency_loss_trains_at_every_time_the_stock_plans_visit(
    random_digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FluxPipeline-style uniform sigmas put the 4-step plan at 0.75 and 0.25, between the 50-point grid's points: the
    training grid gains exactly those two (a pair of neighbours now ends or starts there); LCMScheduler's VP times
    are grid points already, and ``plan_times_on_grid = false`` keeps LCM's grid as it is."""
    from fewstep.distill import prepare_teacher

    denoiser, pipe = load_denoiser(str(random_digits))
    cfg = LCMConfig(**FIXED_W)
    teacher = prepare_teacher(pipe, denoiser, cfg)
    recipe = LCM(teacher, cfg)
    assert recipe.plan()[4].times == pytest.approx((1.0, 0.75, 0.5, 0.25))
    added = sorted(set(recipe.train_grid.tolist()) - set(recipe.grid.tolist()))
    assert added == pytest.approx([0.25, 0.75]) and len(recipe.train_grid) == len(recipe.grid) + 2
    assert torch.all(recipe.train_grid[:-1] > recipe.train_grid[1:])
    visited = {round(t, 6) for p in recipe.plan().values() for t in p.times}
    assert visited <= {round(t, 6) for t in recipe.train_grid.tolist()}
    draws: list[torch.Tensor] = []
    monkeypatch.setattr(
        lcm_module, "teacher_ode_step", lambda den, x, t, s, *a: (draws.append(torch.stack([t, s])), x)[1]
    )
    torch.manual_seed(0)  # the recipe's draws come from the global generator
    recipe.loss(DigitsBatches(null_class_of(teacher.model), batch_size=256)(0), 0)
    t, s = draws[0]
    assert bool(((t - 0.75).abs() < 1e-6).any()) and bool(((s - 0.25).abs() < 1e-6).any())
    assert torch.equal(LCM(teacher, LCMConfig(**FIXED_W, plan_times_on_grid=False)).train_grid, recipe.grid)


def test_lcm_schedulers_vp_times_are_grid_points_already(sd_folder: Path) -> None:
    from fewstep.distill import prepare_teacher

    denoiser, pipe = load_denoiser(str(sd_folder))
    cfg = LCMConfig(**FIXED_W)
    recipe = LCM(prepare_teacher(pipe, denoiser, cfg), cfg)
    assert recipe.plan()[4].times == pytest.approx((999, 759, 499, 259))  # LCMScheduler's own
    assert torch.equal(recipe.train_grid, recipe.grid)


def test_training_moves_the_student_and_the_target_follows_by_ema(random_digits: Path, tmp_path: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    frozen = [p.detach().clone() for p in teacher.model.parameters()]
    recipe = LCM(teacher, LCMConfig(**FIXED_W, lr=1e-3))
    target_before = [p.detach().clone() for p in recipe.target_model.parameters()]
    data = DigitsBatches(null_class_of(teacher.model), batch_size=8)
    trainer = Trainer(recipe, TrainConfig(max_steps=1, batch_size=8, progress=False), tmp_path, data)
    history = trainer.fit()
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["student"]))
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.model.parameters(), strict=True))
    mu = recipe.cfg.target_ema
    for before, target, live in zip(target_before, recipe.target_model.parameters(), recipe.model.parameters(),
                                    strict=True):  # fmt: skip
        torch.testing.assert_close(target, mu * before + (1 - mu) * live)
    assert any(not torch.equal(a, b) for a, b in zip(target_before, recipe.model.parameters(), strict=True))


def test_lora_variant_trains_only_the_adapter_and_has_no_separate_target(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = LCM(teacher, LCMConfig(**FIXED_W, lora_rank=4))
    trainable = [n for n, p in recipe.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert recipe.target_model is recipe.model and recipe.is_lora
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    recipe.loss(batch, 0)["student"].backward()
    assert all(p.grad is None for n, p in recipe.model.named_parameters() if "lora_" not in n)


def test_sampled_guidance_needs_a_backbone_that_embeds_it(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    with pytest.raises(FewstepError, match="cannot embed the guidance scale"):
        LCM(teacher, LCMConfig(w_min=2.0, w_max=4.0))


def test_distill_resume_repeats_the_uninterrupted_run(random_digits: Path, tmp_path: Path) -> None:
    """A run stopped at a checkpoint and resumed gives the same loss sequence as one run straight through."""
    import json

    from fewstep.distill import run_distill
    from fewstep.training.config import merge_into

    def cfg(steps: int) -> LCMConfig:
        train = {"max_steps": steps, "batch_size": 4, "checkpoint_every": 2, "progress": False}
        return merge_into(LCMConfig(**FIXED_W, lr=1e-3), {"train": train})

    straight, parts = tmp_path / "straight", tmp_path / "parts"
    run_distill(LCM, cfg(4), teacher=str(random_digits), output=straight, bench=False)
    run_distill(LCM, cfg(2), teacher=str(random_digits), output=parts, bench=False)
    with pytest.raises(FewstepError, match="already holds checkpoints"):
        run_distill(LCM, cfg(4), teacher=str(random_digits), output=parts, bench=False)
    run_distill(LCM, cfg(4), teacher=str(random_digits), output=parts, resume="", bench=False)
    a = json.loads((straight / "checkpoints" / "losses.json").read_text())
    b = json.loads((parts / "checkpoints" / "losses.json").read_text())
    assert [h["step"] for h in b] == [0, 1, 2, 3]
    assert [h["student"] for h in a] == [h["student"] for h in b]


def test_gradient_checkpointing_gives_the_same_step(random_digits: Path, tmp_path: Path) -> None:
    """Recomputing activations in backward changes memory, not the result."""
    results = []
    for checkpointing in (False, True):
        teacher, _ = load_denoiser(str(random_digits))
        recipe = LCM(teacher, LCMConfig(**FIXED_W, lr=1e-3))
        data = DigitsBatches(null_class_of(teacher.model), batch_size=8)
        cfg = TrainConfig(max_steps=2, batch_size=8, progress=False, gradient_checkpointing=checkpointing)
        trainer = Trainer(recipe, cfg, tmp_path / str(checkpointing), data)
        assert recipe.model.gradient_checkpointing is checkpointing
        results.append((trainer.fit(), [p.detach().clone() for p in recipe.model.parameters()]))
    (h0, w0), (h1, w1) = results
    assert [h["student"] for h in h0] == pytest.approx([h["student"] for h in h1], rel=1e-5)
    for a, b in zip(w0, w1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_image_free_digits_run_trains_on_cached_teacher_samples(random_digits: Path, tmp_path: Path) -> None:
    from fewstep.distill import training_data
    from fewstep.training.config import merge_into
    from fewstep.training.data import PromptBatches

    run = {
        "train": {"max_steps": 1, "batch_size": 4, "progress": False},
        "data": {"image_free": True, "num_teacher_samples": 20, "teacher_steps": 2, "teacher_guidance": 1.0},
    }
    cfg = merge_into(LCMConfig(**FIXED_W), run)
    teacher, pipe = load_denoiser(str(random_digits))
    data = training_data(pipe, teacher, str(random_digits), cfg, tmp_path / "cache")
    assert isinstance(data, PromptBatches) and data.x0.shape == (20, 1, 8, 8)
    batch = data(0)
    assert batch.x0.shape == (4, 1, 8, 8) and batch.cond["class_labels"].shape == (4,)
    again = training_data(pipe, teacher, str(random_digits), cfg, tmp_path / "cache")  # from the cache
    assert torch.equal(again.x0, data.x0) and len(list((tmp_path / "cache").iterdir())) == 1
    # the samples are the teacher's: its Euler sampler from the same seeded noise gives the same images
    from fewstep.sampling import euler_sample, euler_times

    noise = torch.randn((20, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = data.cond["class_labels"]
    with torch.no_grad():
        ref = euler_sample(lambda x, t: teacher(x, t, {"class_labels": labels}), teacher.native, noise,
                           euler_times(teacher.native, 2))  # fmt: skip
    torch.testing.assert_close(data.x0, ref.clamp(-1, 1))


def test_lora_on_a_pipeline_without_a_lora_loader_exports_a_peft_adapter(random_digits: Path, tmp_path: Path) -> None:
    """DigitsPipeline (like PixArt's pipelines) has no load_lora_weights: the LoRA goes out as peft's own adapter
    folder, and peft.PeftModel.from_pretrained on the base transformer gives the trained student's outputs."""
    from peft import PeftModel

    from fewstep.distill import run_distill
    from fewstep.loading import load_pipeline
    from fewstep.training.checkpoint import load_checkpoint
    from fewstep.training.config import merge_into

    cfg = merge_into(LCMConfig(**FIXED_W, lora_rank=4, lr=1e-2), {"train": {"max_steps": 2, "progress": False}})
    out = run_distill(LCM, cfg, teacher=str(random_digits), output=tmp_path / "run", bench=False)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    teacher, _ = load_denoiser(str(random_digits))
    recipe = LCM(teacher, cfg)
    _, state = load_checkpoint(tmp_path / "run" / "checkpoints")
    recipe.model.load_state_dict(state["ema"]["student"])
    base = load_pipeline(str(random_digits)).transformer
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 200.0]), torch.tensor([1, 2])
    before = base(x, timestep=t, class_labels=labels).sample
    loaded = PeftModel.from_pretrained(base, str(out))
    after = loaded(x, timestep=t, class_labels=labels).sample
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, recipe.model(x, timestep=t, class_labels=labels).sample, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset_like,expected", [({}, -0.6 - math.log(0.5)), ({"adv_p_sigma_data": 1.0}, -0.6)])
def test_adversarial_times_mean_sana_sprints_ratio_unless_a_preset_says_otherwise(
    random_digits: Path, monkeypatch: pytest.MonkeyPatch, preset_like: dict[str, float], expected: float
) -> None:
    """PCM's adversarial term draws t_D with SANA-Sprint's LADD numbers, exp(N(-0.6, 1)) stated for data of std 0.5:
    a median noise-to-signal ratio e^-0.6 / 0.5 on the data as given. The digits preset keeps the ratio it was tuned
    with (e^-0.6, adv_p_sigma_data 1)."""
    import fewstep.recipes.lcm as lcm_module

    seen: list[torch.Tensor] = []
    original = lcm_module.discriminator_times

    def record(*args: object, **kwargs: object) -> torch.Tensor:
        t = original(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(t)
        return t

    monkeypatch.setattr(lcm_module, "discriminator_times", record)
    teacher, _ = load_denoiser(str(random_digits))
    recipe = LCM(teacher, LCMConfig(**FIXED_W, adv_weight=0.5, **preset_like))
    torch.manual_seed(0)
    recipe.loss(DigitsBatches(null_class_of(teacher.model), batch_size=1024)(0), 0)
    native = teacher.native
    assert float(torch.log(native.ratio(seen[0].double())).median()) == pytest.approx(expected, abs=0.12)


def test_digits_preset_states_its_adversarial_ratio() -> None:
    from fewstep.recipes import resolve
    from fewstep.training.config import presets_dir, resolve_config

    cfg = resolve_config(resolve("lcm").Config(), presets_dir() / "lcm" / "digits.toml")
    assert cfg.adv_p_sigma_data == 1.0  # the ratio its measured runs used; SANA-Sprint's would be 0.5
