"""MCM: the motion representations (identity at init, per frame, telescoping differences), the consistency function's
boundary, mixed inputs, the frame picks, the motion head's EMA target, and training and export on a tiny video Wan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.loading import load_denoiser
from fewstep.objectives.consistency import consistency_output
from fewstep.objectives.motion import MotionHead, frame_differences
from fewstep.recipes.mcm import MCM, MCMConfig
from fewstep.training.data import VideoBatches
from fewstep.training.trainer import TrainConfig, Trainer

FIXED_W = {"w_min": 1.0, "w_max": 1.0}


def test_motion_head_starts_as_the_identity_and_reads_each_frame_alone() -> None:
    torch.manual_seed(0)
    head = MotionHead(4)
    x = torch.randn(2, 4, 5, 6, 6)
    torch.testing.assert_close(head(x), x)  # zero-initialized output conv: the identity
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    y = head(x)
    assert not torch.allclose(y, x)
    x2 = x.clone()
    x2[:, :, 3] += 1.0  # change frame 3 only: only frame 3 of the output moves
    moved = (head(x2) - y).abs().amax(dim=(0, 1, 3, 4))
    assert moved[3] > 0 and torch.all(moved[[0, 1, 2, 4]] == 0)
    # CogVideoX's layout (B, F, C, H, W) gives the same frames
    torch.testing.assert_close(head(x.transpose(1, 2), dim=1), y.transpose(1, 2))


def test_frame_differences_telescope_to_last_minus_first() -> None:
    x = torch.randn(2, 3, 7, 4, 4)
    d = frame_differences(x)
    assert d.shape == (2, 3, 6, 4, 4)
    torch.testing.assert_close(d.sum(2), x[:, :, -1] - x[:, :, 0])
    torch.testing.assert_close(frame_differences(x, 3)[:, :, 1], x[:, :, 4] - x[:, :, 1])
    torch.testing.assert_close(frame_differences(x.transpose(1, 2), 2, dim=1), frame_differences(x, 2).transpose(1, 2))
    with pytest.raises(ValueError, match="frame stride 7"):
        frame_differences(x, 7)


def test_consistency_output_is_the_identity_at_the_boundary(random_video: Path) -> None:
    teacher, _ = load_denoiser(str(random_video))
    x = torch.randn(2, 1, 8, 16, 16)
    cond = {"encoder_hidden_states": torch.zeros(2, 2, 16)}
    torch.testing.assert_close(consistency_output(teacher, x, torch.zeros(2), cond, 4.0), x)


def test_teacher_step_guides_each_sample_only_inside_the_interval(random_video: Path) -> None:
    """Per sample: t outside (lo, hi] takes the conditional step (w = 1), t inside the guided one, as the teacher
    folder's own sampler does (sampling.guidance_at)."""
    from fewstep.objectives.consistency import teacher_ode_step
    from fewstep.worlds.video.data import condition_tokens, null_tokens

    teacher, _ = load_denoiser(str(random_video))
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 16, 16)
    t, s = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.8, 0.4, 0.05])
    cond = {"encoder_hidden_states": condition_tokens(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))}
    uncond = {"encoder_hidden_states": null_tokens(1)}
    limited = teacher_ode_step(teacher, x, t, s, cond, uncond, 3.0, (0.2, 0.85))
    plain = teacher_ode_step(teacher, x, t, s, cond, uncond, 1.0)
    guided = teacher_ode_step(teacher, x, t, s, cond, uncond, 3.0)
    torch.testing.assert_close(limited[[0, 2]], plain[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(limited[1], guided[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided[0], plain[0], atol=1e-3)


def test_mcm_refuses_image_teachers(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    with pytest.raises(FewstepError, match="mcm distils video teachers"):
        MCM(teacher, MCMConfig(**FIXED_W))


def test_frames_are_picked_clip_major_and_real_frames_come_from_the_image_set(random_video: Path) -> None:
    teacher, _ = load_denoiser(str(random_video))
    recipe = MCM(teacher, MCMConfig(**FIXED_W, lora_rank=0))
    clips = torch.randn(3, 1, 8, 16, 16)
    frames = recipe.pick_frames(clips, torch.tensor([5, 1]))
    assert frames.shape == (6, 1, 1, 16, 16)
    torch.testing.assert_close(frames[2, :, 0], clips[1, :, 5])
    torch.testing.assert_close(frames[3, :, 0], clips[1, :, 1])
    batch = VideoBatches(3)(0)
    assert batch.images is not None
    torch.testing.assert_close(recipe.real_frames(batch, batch.x0), batch.images.flatten(0, 1))
    batch.images = None  # no image set: one frame from each half of the training clip (MCM's TSN pick)
    torch.manual_seed(1)
    real = recipe.real_frames(batch, batch.x0)
    assert real.shape == (6, 1, 1, 16, 16)
    for i in range(3):
        first = [f for f in range(4) if torch.equal(real[2 * i, :, 0], batch.x0[i, :, f])]
        second = [f for f in range(4, 8) if torch.equal(real[2 * i + 1, :, 0], batch.x0[i, :, f])]
        assert first and second


def test_mixed_inputs_replace_the_clips_with_the_students_own_samples(random_video: Path) -> None:
    """With pred_x0_portion = 1 the consistency term never reads the batch's clips (the student's one-step samples
    stand in), and with 0 it does."""
    teacher, _ = load_denoiser(str(random_video))
    batch = VideoBatches(4)(0)
    other = VideoBatches(4)(1)
    other.cond, other.images = batch.cond, batch.images  # same conditions and image set, other clips

    def losses(portion: float, b: object) -> torch.Tensor:
        torch.manual_seed(0)
        recipe = MCM(teacher, MCMConfig(**FIXED_W, lora_rank=0, pred_x0_portion=portion, adv_frames=2))
        torch.manual_seed(1)
        return recipe.loss(b, 0)["student"]  # type: ignore[arg-type]

    torch.testing.assert_close(losses(1.0, batch), losses(1.0, other))
    assert not torch.allclose(losses(0.0, batch), losses(0.0, other))


def test_training_steps_the_student_head_and_critic_and_the_head_target_follows(
    random_video: Path, tmp_path: Path
) -> None:
    teacher, _ = load_denoiser(str(random_video))
    frozen = [p.detach().clone() for p in teacher.model.parameters()]
    recipe = MCM(teacher, MCMConfig(**FIXED_W, lr=1e-3, lora_rank=4))
    head_before = [p.detach().clone() for p in recipe.target_head.parameters()]
    critic_before = [p.detach().clone() for p in recipe.disc.heads.parameters()]  # type: ignore[union-attr]
    trainer = Trainer(recipe, TrainConfig(max_steps=2, batch_size=4, progress=False), tmp_path, VideoBatches(4))
    history = trainer.fit()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["student"])) for h in history)
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.model.parameters(), strict=True))
    trained = [n for n, p in recipe.net.backbone.named_parameters() if p.requires_grad]
    assert trained and all("lora" in n for n in trained)  # the LoRA student: only adapters train
    assert recipe.target_backbone is recipe.net.backbone  # MCM's LoRA path: the target is the student itself
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, recipe.disc.heads.parameters(), strict=True))  # type: ignore[union-attr]
    assert any(not torch.equal(a, b) for a, b in zip(head_before, recipe.net.head.parameters(), strict=True))


def test_head_target_is_an_ema_of_the_head(random_video: Path) -> None:
    teacher, _ = load_denoiser(str(random_video))
    recipe = MCM(teacher, MCMConfig(**FIXED_W, lora_rank=0, adv_weight=0.0))
    before = [p.detach().clone() for p in recipe.target_head.parameters()]
    with torch.no_grad():
        for p in recipe.net.head.parameters():
            p.add_(1.0)
    recipe.after_step(0)
    for b, target, live in zip(before, recipe.target_head.parameters(), recipe.net.head.parameters(), strict=True):
        torch.testing.assert_close(target, 0.95 * b + 0.05 * live)


@pytest.mark.parametrize("motion", ["raw", "diff", "hlearn"])
def test_every_motion_representation_trains(random_video: Path, motion: str) -> None:
    teacher, _ = load_denoiser(str(random_video))
    recipe = MCM(teacher, MCMConfig(**FIXED_W, lora_rank=0, motion=motion, adv_weight=0.0))  # type: ignore[arg-type]
    out = recipe.loss(VideoBatches(2)(0), 0)
    assert set(out) == {"student"} and torch.isfinite(out["student"])
    out["student"].backward()


def test_distill_mcm_on_a_video_teacher_exports_a_loadable_student(random_video: Path, tmp_path: Path) -> None:
    from fewstep.distill import run_distill
    from fewstep.loading import load_pipeline
    from fewstep.training.config import resolve_config

    cfg = resolve_config(
        MCMConfig(),
        sets=["w_min=1.0", "w_max=1.0", "lora_rank=0", "train.max_steps=2", "train.batch_size=4",
              "train.progress=false", "plan_steps=[1, 2]"],
    )  # fmt: skip
    folder = run_distill(MCM, cfg, teacher=str(random_video), output=tmp_path / "run", bench=False)
    pipe = load_pipeline(str(folder))
    frames = pipe(class_labels=[3], motions=[1], num_inference_steps=2).frames
    assert frames.shape == (1, 8, 1, 16, 16) and torch.isfinite(frames).all()
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    assert summary["recipe"] == "mcm" and summary["steps"] == 2


@pytest.mark.parametrize("family", ["modelscope", "animatediff"])
def test_mcm_paper_presets_train_a_lora_that_loads_on_the_stock_pipeline(family: str, tmp_path: Path) -> None:
    """MCM's own setting (its ModelScope / AnimateDiff preset: LoRA r64 with the learned motion head, w in LCM's
    [5, 15], mixed inputs and the frame critic), a few steps on a tiny pipeline of that class from prompts; the LoRA
    export loads on the base pipeline without fewstep's help (load_lora_weights on AnimateDiff, peft's adapter on
    ModelScope's UNet3DConditionModel, which has no diffusers LoRA loader), with the exported stock scheduler, and
    the adapter changes the sampled clip."""
    import diffusers
    from families import CALL_KWARGS, FAMILIES

    from fewstep.distill import run_distill
    from fewstep.training.config import presets_dir, resolve_config

    teacher = tmp_path / "teacher"
    FAMILIES[family]().save_pretrained(teacher)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nthe blue square\n")
    size = CALL_KWARGS[family]
    cfg = resolve_config(
        MCMConfig(), presets_dir() / "mcm" / f"{family}.toml",
        sets=["train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "train.mixed_precision=no",
              "train.gradient_checkpointing=false", "train.progress=false", "lr=1e-2", "pred_x0_portion=1.0",
              f"data.prompts={json.dumps(str(prompts))}", "data.teacher_steps=2",
              f"data.height={size['height']}", f"data.width={size['width']}", f"data.num_frames={size['num_frames']}"],
    )  # fmt: skip
    assert cfg.lora_rank == 64 and cfg.adv_weight == 1.0 and cfg.motion == "learn" and cfg.train.max_steps == 2
    folder = run_distill(MCM, cfg, teacher=str(teacher), output=tmp_path / "run", bench=False)
    name = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    assert name != "FewStepScheduler"  # the stock scheduler at its own times

    def clip(adapted: bool) -> torch.Tensor:
        pipe = diffusers.DiffusionPipeline.from_pretrained(teacher)
        pipe.set_progress_bar_config(disable=True)
        if adapted:
            if (folder / "adapter_config.json").is_file():
                from peft import PeftModel

                pipe.unet = PeftModel.from_pretrained(pipe.unet, str(folder))
            else:
                pipe.load_lora_weights(folder)
        pipe.scheduler = getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler")
        out = pipe(prompt=["a red circle"], num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **size)  # fmt: skip
        return out.frames

    assert (folder / "adapter_config.json").is_file() == (family == "modelscope")
    card = (folder / "README.md").read_text()  # the model card's snippet loads the LoRA as above and reads .frames
    assert "pipeline_tag: text-to-video" in card and ").frames" in card
    assert ("pipe.unet = PeftModel.from_pretrained(pipe.unet" in card) == (family == "modelscope")
    student = clip(True)
    assert student.shape == (1, 4, size["num_frames"], 8, 8) and torch.isfinite(student).all()
    with torch.no_grad():
        teacher_clip = clip(False)
    assert not torch.allclose(student, teacher_clip, atol=1e-3)
