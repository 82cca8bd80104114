"""Our own training scripts for the embedded digits teacher and evaluator (``fewstep teacher train``).

Teacher: a class-conditional rectified-flow DiT, x_t = (1 - t) x0 + t eps, trained to predict the velocity eps - x0
with t ~ U(0, 1) and timestep = 1000 t, AdamW 5e-4 with linear warm-up, gradient clipping 1, EMA 0.999, 10% of labels
replaced by the null class for classifier-free guidance. Settings follow the measurements in ../shared/DIGITS.md.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from torch import Tensor
from tqdm.auto import tqdm

from ...schedules import Flow, append_dims
from .data import NUM_CLASSES, RESOLUTION, load_split
from .evaluator import DigitsEvaluator
from .pipeline import DigitsPipeline
from .scorer import DigitsScorer


@dataclass(frozen=True)
class TeacherTrainConfig:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_drop: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class EvaluatorTrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class ScorerTrainConfig:
    """The reward model (``scorer.py``): its own seed, Gaussian pixel noise of a random std up to ``noise_max``
    instead of the evaluator's shifts, so it also scores the slightly noisy x0 estimates a student makes."""

    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    noise_max: float = 0.3
    seed: int = 1


def make_teacher_model() -> DiTTransformer2DModel:
    """DiT on 8x8x1 inputs: patch 2 (16 tokens), 4 layers, 4 heads x 32, 10 classes + a null class (1.42M params)."""
    return DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=1,
        out_channels=1,
        num_layers=4,
        sample_size=RESOLUTION,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
    )


def disable_label_dropout(model: torch.nn.Module) -> None:
    """DiT gives every block its own LabelEmbedding that drops labels independently in train mode, so the model
    would almost never see a fully unconditional input (../shared/DIGITS.md). We drop labels ourselves instead."""
    for module in model.modules():
        if hasattr(module, "dropout_prob") and hasattr(module, "embedding_table"):
            module.dropout_prob = 0.0  # type: ignore[assignment]


def teacher_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1 - decay)


def train_teacher(output: Path, cfg: TeacherTrainConfig = TeacherTrainConfig(), progress: bool = True) -> Path:
    """Train the digits teacher and save it as a DigitsPipeline folder at ``output``."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_split("train")
    model = make_teacher_model()
    disable_label_dropout(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / cfg.warmup_steps))
    flow = Flow()
    bar = tqdm(range(cfg.steps), desc="teacher", disable=not progress)
    start = time.perf_counter()
    for _ in bar:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        x0, y = data.images[idx], data.labels[idx].clone()
        y[torch.rand(cfg.batch_size, generator=gen) < cfg.label_drop] = NUM_CLASSES  # the null class
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.rand(cfg.batch_size, generator=gen)
        x_t = flow.add_noise(x0, eps, t)
        v = model(x_t, timestep=flow.to_model_timestep(t), class_labels=y).sample
        c = flow.coeffs(append_dims(t, x0.ndim))
        loss = F.mse_loss(v, c.d_alpha * x0 + c.d_sigma * eps)  # velocity eps - x0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema_update(ema, model, cfg.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.register_to_config()  # keep the config as constructed
    pipe = DigitsPipeline(transformer=ema, scheduler=teacher_scheduler())
    pipe.save_pretrained(output)
    minutes = (time.perf_counter() - start) / 60
    (output / "TRAINING.md").write_text(
        f"Trained by `fewstep teacher train --what teacher` with {cfg} in {minutes:.1f} min.\n"
    )
    return output


def train_evaluator(output: Path, cfg: EvaluatorTrainConfig = EvaluatorTrainConfig(), progress: bool = True) -> Path:
    """Train the evaluator classifier on the train split (+-1 px roll augmentation) and save it at ``output``."""

    def roll(x: Tensor, gen: torch.Generator) -> Tensor:
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        return torch.roll(x, shifts=shift, dims=(2, 3))

    return _train_classifier(DigitsEvaluator, output, cfg, "evaluator", roll, progress)


def train_scorer(output: Path, cfg: ScorerTrainConfig = ScorerTrainConfig(), progress: bool = True) -> Path:
    """Train the reward model on the train split (pixel noise augmentation) and save it at ``output``."""

    def noise(x: Tensor, gen: torch.Generator) -> Tensor:
        std = cfg.noise_max * torch.rand(len(x), 1, 1, 1, generator=gen)
        return x + std * torch.randn(x.shape, generator=gen)

    return _train_classifier(DigitsScorer, output, cfg, "scorer", noise, progress)


def _train_classifier(
    make: Callable[[], Any], output: Path, cfg: EvaluatorTrainConfig | ScorerTrainConfig, what: str,
    augment: Callable[[Tensor, torch.Generator], Tensor], progress: bool,
) -> Path:  # fmt: skip
    """Train a digits classifier (the evaluator, the scorer: ``make()``, built after seeding) by cross-entropy on the
    train split, each batch through ``augment``, for ``cfg.epochs`` epochs of Adam; save it at ``output`` with its
    held-out accuracy in TRAINING.md (``what`` names it for ``fewstep teacher train --what``)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_split("train")
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    bar = tqdm(range(cfg.epochs), desc=what, disable=not progress)
    model.train()
    for _ in bar:
        perm = torch.randperm(len(data), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x, y = data.images[idx], data.labels[idx]
            loss = F.cross_entropy(model(augment(x, gen)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    held_out = load_split("held_out")
    with torch.no_grad():
        acc = (model(held_out.images).argmax(1) == held_out.labels).float().mean().item()
    model.save_pretrained(output)
    (output / "TRAINING.md").write_text(
        f"Trained by `fewstep teacher train --what {what}` with {cfg}; held-out accuracy {acc:.4f}.\n"
    )
    return output
