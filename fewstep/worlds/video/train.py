"""Our own training script for the video world's teacher (``fewstep teacher train --world video``), run by the Trainer
so that it checkpoints and resumes like every distillation run.

Teacher: a class- and motion-conditional rectified-flow WanTransformer3DModel (the DCM backbone), x_t = (1 - t) x0 +
t eps, trained to predict the velocity eps - x0 with t ~ U(0, 1) and timestep = 1000 t; AdamW with linear warm-up
and cosine decay, gradient clipping 1, EMA 0.999, 10% of conditions replaced by the null tokens for classifier-free
guidance: the digits teacher's recipe (``worlds/digits/train.py``) on fresh random clips every step.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from torch import Tensor, nn

from ...recipes.base import Batch, OptimizerSpec, Recipe
from ...schedules import Flow, append_dims
from ...training.data import VideoBatches
from ...training.trainer import TrainConfig, Trainer
from .. import TEACHER_GUIDANCE_INTERVAL
from .data import COND_DIM, random_clips
from .pipeline import VideoDigitsPipeline


@dataclass(frozen=True)
class VideoTeacherConfig:
    steps: int = 6000
    max_minutes: float = 58.0  # the budget is 60 minutes on 2 cores; the run checkpoints and stops at this
    batch_size: int = 32
    lr: float = 1e-3  # single-frame pilots (data.py, start_positions): 1e-3 learnt classes faster than 3e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_drop: float = 0.1
    checkpoint_every: int = 250
    seed: int = 0


def make_video_teacher_model() -> WanTransformer3DModel:
    """Wan on 1-channel 8x16x16 clips: patch (1, 4, 4) (16 tokens per frame, 128 in all), 6 layers of 4 heads x 32,
    a 16-d "text" input for the two condition tokens (1.7M params)."""
    return WanTransformer3DModel(
        patch_size=(1, 4, 4),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=1,
        out_channels=1,
        text_dim=COND_DIM,
        freq_dim=64,
        ffn_dim=512,
        num_layers=6,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def video_teacher_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


class FlowPretraining(Recipe):
    """Flow matching of a network from scratch (the teacher's own training, not a distillation): Lipman et al. (2023)
    with the rectified-flow path of Liu et al. (2023), conditions dropped to the null tokens at rate ``label_drop``."""

    name = "video-teacher"

    def __init__(self, model: nn.Module, lr: float, label_drop: float):
        self.model, self.lr, self.label_drop = model, lr, label_drop
        self.flow = Flow()

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.model}

    def optimizer(self, name: str) -> OptimizerSpec:
        return OptimizerSpec(lr=self.lr)

    def loss(self, batch: Batch, step: int) -> dict[str, Tensor]:
        x0, tokens = batch.x0, batch.cond["encoder_hidden_states"]
        assert x0 is not None
        n = x0.shape[0]
        drop = torch.rand(n) < self.label_drop
        tokens = torch.where(append_dims(drop, tokens.ndim), batch.uncond["encoder_hidden_states"].expand_as(tokens),
                             tokens)  # fmt: skip
        eps = torch.randn_like(x0)
        t = torch.rand(n)
        x_t = self.flow.add_noise(x0, eps, t)
        v = self.model(x_t, timestep=self.flow.to_model_timestep(t), encoder_hidden_states=tokens).sample
        c = self.flow.coeffs(append_dims(t, x0.ndim))
        return {"student": F.mse_loss(v, c.d_alpha * x0 + c.d_sigma * eps)}  # velocity eps - x0


def train_video_teacher(
    output: Path, run_dir: Path, cfg: VideoTeacherConfig = VideoTeacherConfig(), resume: bool = False,
    progress: bool = True,
) -> Path:  # fmt: skip
    """Train the video teacher (checkpoints under ``run_dir/checkpoints``; ``resume`` continues from the newest) and
    save its EMA weights as a VideoDigitsPipeline folder at ``output``."""
    torch.manual_seed(cfg.seed)
    model = make_video_teacher_model()
    recipe = FlowPretraining(model, cfg.lr, cfg.label_drop)
    train = TrainConfig(
        max_steps=cfg.steps, max_minutes=cfg.max_minutes, batch_size=cfg.batch_size, grad_clip=cfg.grad_clip,
        lr_warmup_steps=cfg.warmup_steps, lr_decay="cosine", ema_decay=cfg.ema_decay,
        checkpoint_every=cfg.checkpoint_every, seed=cfg.seed, progress=progress,
    )  # fmt: skip
    trainer = Trainer(recipe, train, run_dir, VideoBatches(cfg.batch_size, cfg.seed))
    if resume:
        trainer.resume()
    start, first = time.perf_counter(), trainer.step
    trainer.fit()
    pipe = VideoDigitsPipeline(
        transformer=trainer.ema["student"],
        scheduler=video_teacher_scheduler(),
        guidance_interval=TEACHER_GUIDANCE_INTERVAL["video"],
    )
    pipe.save_pretrained(output)
    minutes = (time.perf_counter() - start) / 60
    (output / "TRAINING.md").write_text(
        f"Trained by `fewstep teacher train --world video --what teacher` with {dataclasses.asdict(cfg)}: "
        f"steps {first}..{trainer.step} in {minutes:.1f} min on this machine.\n"
    )
    return output


@dataclass(frozen=True)
class VideoEvaluatorConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


def train_video_evaluator(
    output: Path, cfg: VideoEvaluatorConfig = VideoEvaluatorConfig(), progress: bool = True
) -> Path:
    """Train the clip evaluator on fresh random train-split clips (class and motion cross-entropy) and save it at
    ``output`` with its held-out accuracies."""
    from tqdm.auto import tqdm

    from .data import reference_clips
    from .evaluator import VideoEvaluator

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = VideoEvaluator()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    model.train()
    bar = tqdm(range(cfg.steps), desc="video evaluator", disable=not progress)
    for _ in bar:
        clips = random_clips("train", cfg.batch_size, gen)
        class_logits, motion_logits = model(clips.clips)
        loss = F.cross_entropy(class_logits, clips.labels) + F.cross_entropy(motion_logits, clips.motions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    held_out = reference_clips("held_out")
    with torch.no_grad():
        logits = [model(chunk) for chunk in held_out.clips.split(500)]
    class_acc = (torch.cat([c for c, _ in logits]).argmax(1) == held_out.labels).float().mean().item()
    motion_acc = (torch.cat([m for _, m in logits]).argmax(1) == held_out.motions).float().mean().item()
    model.save_pretrained(output)
    (output / "TRAINING.md").write_text(
        f"Trained by `fewstep teacher train --world video --what evaluator` with {dataclasses.asdict(cfg)}; "
        f"held-out class accuracy {class_acc:.4f}, motion accuracy {motion_acc:.4f}.\n"
    )
    return output
