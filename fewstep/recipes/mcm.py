"""MCM: the motion consistency model (Zhai et al. 2024), as yhZhai/mcm trains it (main.py, ``prepare_cd_target``).

Each step, on clips x0 (B, C, F, H, W; CogVideoX's (B, F, C, H, W) alike):
  t_{n+1} -> t_n: two neighbours of LCM's N-point skipping grid; x_t = alpha x0 + sigma eps, pure noise at t_max,
  w ~ U[w_min, w_max] (Ho scale; MCM's w in [5, 15] is LCM's form, Ho scale 1 + w), not embedded in the LoRA student,
  x_{t_n} = one DDIM step of the teacher's guided ODE (Euler on flow teachers),
  f(x, t) = c_skip x + c_out x0_theta (LCMScheduler's boundary scalings, timestep_scaling 4),
  L_cd = pseudo-Huber(m(f_theta(x_t, t)), sg m^-(f^-(x_{t_n}, t_n))),
where m is the motion representation: a learned per-frame head, zero-initialized residual (``motion.MotionHead``) with
an EMA copy m^- (rate 0.95) on the target side, frame differences, or the raw clip. The target f^- is the LoRA student
itself without gradient (MCM's LoRA path has no target network; a full fine-tune gets an EMA one, as its
``target_unet``).

Mixed inputs (``pred_x0_portion``): with that probability per batch (one draw for the whole batch, as the reference),
x0 is replaced by the student's own one-step x0 from pure noise, without gradient.

Frame adversarial term: ``adv_frames`` frames of f_theta(x_t, t), picked at random (the same for the whole batch), are
scored against still images of an image set apart from the clips (``Batch.images``; frames of the training clips,
one per segment as MCM's TSN pick, where the world has none), L = L_cd + adv_weight (-D(fake)), the critic on the
hinge loss (MCM's "wgan" loss, which equals the hinge up to a constant, so gradients are the same).

Departure, and why: MCM's discriminator is StyleGAN-T's projected heads on a frozen DINOv2 that reads VAE-decoded
frames; no DINOv2 weights reach this machine and the recipe sees latents, so here the frozen feature network is the
teacher itself, reading each frame as a one-frame clip re-noised at a log-normal t_D, with a trainable head per block
(LADD's discriminator, ``objectives/adversarial.py``). MCM's small gradient penalty (1e-5) and DiffAugment go with
DINOv2's pixel input and are left out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor, nn

from .. import batch_random
from ..errors import FewstepError
from ..objectives.adversarial import TeacherDiscriminator, discriminator_times, ladd_losses
from ..objectives.consistency import consistency_output, teacher_ode_step
from ..objectives.losses import pseudo_huber
from ..objectives.motion import MotionHead, frame_differences
from ..sampling import SamplingPlan
from ..schedules import append_dims
from ..teacher import VIDEO_BACKBONES, Denoiser
from ..training.data import DataConfig
from ..training.lora import add_lora
from ..training.trainer import TrainConfig, ema_update
from .base import Batch, OptimizerSpec, Recipe, per_sample
from .lcm import grid_plans, skipping_grid

MOTION_HEADS = {"learn": (2, 1), "hlearn": (5, 3)}  # (layers, kernel) of MCM's SpatialHead variants


@dataclass(frozen=True)
class MCMConfig:
    # yhZhai/mcm scripts/{animatediff,modelscopet2v}_distillation.sh over args.py's defaults
    num_ddim_timesteps: int = 50
    w_min: float = 6.0  # Ho scale; the scripts' w in [5, 15] is LCM's x0_c + w (x0_c - x0_u)
    w_max: float = 16.0
    # not in the reference: guidance only for t in (lo, hi] of the teacher's time (sampling.guidance_at), for a
    # teacher that samples so; None: everywhere, as MCM does (the video preset too: distilling the video teacher's
    # interval measured worse, recipes/mcm/video.toml)
    guidance_interval: tuple[float, float] | None = None
    huber_c: float = 0.001
    timestep_scaling: float = 4.0  # the scripts' timestep_scaling_factor (args.py's default is 10)
    lora_rank: int = 64  # r = alpha = 64; 0: full fine-tuning with an EMA target network
    lr: float = 5e-6  # 5e-6 x total batch / 128 with --scale_lr at the scripts' batch of 128
    betas: tuple[float, float] = (0.9, 0.999)
    motion: Literal["learn", "hlearn", "diff", "raw"] = "learn"  # cd_target
    target_ema: float = 0.95  # ema_decay: the motion head's target copy (and a full fine-tune's target network)
    pred_x0_portion: float = 0.5  # cd_pred_x0_portion: share of batches whose x0 is the student's one-step sample
    adv_weight: float = 1.0  # disc_loss_weight; 0 = no frame adversarial term (and no mixed inputs, as the reference)
    adv_lr: float = 1e-4  # disc_lr 5e-5 x tsn frames 2 (--scale_lr)
    adv_betas: tuple[float, float] = (0.9, 0.999)
    adv_frames: int = 2  # disc_tsn_num_frames
    adv_block_every: int = 1
    adv_p_mean: float = -0.6  # t_D of the teacher-feature discriminator: SANA-Sprint's LADD draw (adversarial.py)
    adv_p_std: float = 1.0
    adv_p_sigma_data: float = 0.5
    plan_steps: tuple[int, ...] = (1, 2, 4)
    plan_times: Literal["stock", "recipe"] = "stock"  # as LCM's: stock scheduler times, or LCMScheduler's grid picks
    gamma: float = 1.0
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


class MCMStudent(nn.Module):
    """The trained networks: the backbone (a LoRA on the teacher, or a full copy) and the motion head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head


class MCM(Recipe):
    name = "mcm"
    paper: ClassVar[str] = "MCM, motion consistency model for video diffusion distillation (Zhai et al. 2024)"
    Config: ClassVar[type] = MCMConfig

    def __init__(self, teacher: Denoiser, cfg: MCMConfig = MCMConfig()):
        if cfg.w_min > cfg.w_max:
            raise FewstepError(f"mcm: w_min {cfg.w_min} > w_max {cfg.w_max}")
        if not 0 <= cfg.pred_x0_portion <= 1:
            raise FewstepError(f"mcm: pred_x0_portion must lie in [0, 1], got {cfg.pred_x0_portion}")
        if type(teacher.model).__name__ not in VIDEO_BACKBONES:
            raise FewstepError(f"mcm distils video teachers; {type(teacher.model).__name__} is not a video backbone")
        self.cfg, self.teacher = cfg, teacher
        teacher.model.requires_grad_(False).eval()
        self.frame_dim = teacher.backbone.frame_dim
        backbone = copy.deepcopy(teacher.model)
        backbone = add_lora(backbone, cfg.lora_rank) if cfg.lora_rank > 0 else backbone.requires_grad_(True)
        head: nn.Module = nn.Identity()
        if cfg.motion in MOTION_HEADS:
            layers, kernel = MOTION_HEADS[cfg.motion]
            head = MotionHead(_latent_channels(teacher.model), layers, kernel)
        self.net = MCMStudent(backbone.eval(), head)
        self.student = teacher.with_model(backbone)
        self.target_backbone = backbone if cfg.lora_rank > 0 else copy.deepcopy(backbone).requires_grad_(False)
        self.target = teacher.with_model(self.target_backbone)
        self.target_head = copy.deepcopy(head).requires_grad_(False)
        self.grid = skipping_grid(teacher.native, cfg.num_ddim_timesteps)  # t_max ... t_min, descending
        self.disc = TeacherDiscriminator(teacher, cfg.adv_block_every) if cfg.adv_weight > 0 else None

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.net, **({"critic": self.disc.heads} if self.disc is not None else {})}

    def optimizer(self, name: str) -> OptimizerSpec:
        if name == "critic":
            return OptimizerSpec(lr=self.cfg.adv_lr, betas=self.cfg.adv_betas)
        return OptimizerSpec(lr=self.cfg.lr, betas=self.cfg.betas)  # the head shares the LoRA's optimizer, as MCM's

    def f(self, denoiser: Denoiser, x: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        return consistency_output(denoiser, x, t, cond, self.cfg.timestep_scaling)

    def motion(self, x: Tensor, head: nn.Module) -> Tensor:
        """The representation the consistency loss compares (``cfg.motion``)."""
        if self.cfg.motion == "diff":
            return frame_differences(x, 1, self.frame_dim)
        return head(x, self.frame_dim) if self.cfg.motion in MOTION_HEADS else x

    def loss(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg, native = self.cfg, self.teacher.native
        if batch.x0 is None:
            raise FewstepError("mcm needs training clips (x0)")
        x0 = clips = batch.x0
        b = x0.shape[0]
        t_max = torch.full((b,), float(self.grid[0]), dtype=x0.dtype)
        if self.disc is not None and float(torch.rand(())) < cfg.pred_x0_portion:  # one draw per batch
            with torch.no_grad():  # the student's own one-step x0 from pure noise, without CFG
                x0 = self.student(batch_random.randn_like(x0), t_max, batch.cond)
        n = batch_random.randint(cfg.num_ddim_timesteps, (b,))
        t, s = self.grid[n].to(x0), self.grid[n + 1].to(x0)  # t = t_{n+1} > s = t_n
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * batch_random.rand((b,))
        eps = batch_random.randn_like(x0)
        x_t = torch.where(append_dims(n == 0, x0.ndim), eps, native.add_noise(x0, eps, t))
        with torch.no_grad():
            guidance: float | Tensor = cfg.w_min if cfg.w_min == cfg.w_max else w
            x_s = teacher_ode_step(self.teacher, x_t, t, s, batch.cond, batch.uncond, guidance, cfg.guidance_interval)
            target = self.motion(self.f(self.target, x_s, s, batch.cond), self.target_head)
        pred = self.f(self.student, x_t, t, batch.cond)
        loss = pseudo_huber(self.motion(pred, self.net.head), target, cfg.huber_c).mean()
        if self.disc is None:
            return {"student": loss}
        fake = self.pick_frames(pred, torch.randperm(pred.shape[self.frame_dim])[: cfg.adv_frames])
        real = self.real_frames(batch, clips)
        k = cfg.adv_frames
        frame_cond = per_sample(batch.cond, b, lambda v: v.repeat_interleave(k, dim=0))  # clip-major, as the frames
        t_d = discriminator_times(native, b * k, cfg.adv_p_mean, cfg.adv_p_std, cfg.adv_p_sigma_data)
        generator, critic = ladd_losses(self.disc, fake, real, t_d, frame_cond)
        return {"student": loss + cfg.adv_weight * generator, "critic": critic}

    def pick_frames(self, clips: Tensor, index: Tensor) -> Tensor:
        """Frames ``index`` of every clip as one-frame clips, clip-major: (B k, ..., 1 frame, ...)."""
        frames = clips.index_select(self.frame_dim, index.to(clips.device)).movedim(self.frame_dim, 1)
        return frames.flatten(0, 1).unsqueeze(self.frame_dim)

    def real_frames(self, batch: Batch, clips: Tensor) -> Tensor:
        """The critic's real frames: the batch's image set, else one frame from each of ``adv_frames`` equal segments
        of the training clip (MCM's tsn_sample)."""
        k = self.cfg.adv_frames
        if batch.images is not None:
            if batch.images.shape[1] < k:
                raise FewstepError(
                    f"mcm: adv_frames {k} needs {k} images per clip, the batch has {batch.images.shape[1]}"
                )
            return batch.images[:, :k].flatten(0, 1)
        f = clips.shape[self.frame_dim]
        if f < k:
            raise FewstepError(f"mcm: adv_frames {k} is more than the clips' {f} frames")
        edges = torch.linspace(0, f, k + 1).long()
        index = torch.stack([lo + torch.randint(int(hi - lo), ()) for lo, hi in zip(edges, edges[1:], strict=False)])
        return self.pick_frames(clips, index)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        pairs = [(self.target_head, self.net.head)]
        if self.target_backbone is not self.net.backbone:
            pairs.append((self.target_backbone, self.net.backbone))
        for target, live in pairs:
            ema_update(target, live.parameters(), self.cfg.target_ema)

    def state_dict(self) -> dict[str, Any]:
        state = {"target_head": self.target_head.state_dict()}
        if self.target_backbone is not self.net.backbone:
            state["target"] = self.target_backbone.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target_head.load_state_dict(state["target_head"])
        if "target" in state:
            self.target_backbone.load_state_dict(state["target"])

    def export_module(self, student: nn.Module) -> nn.Module:
        return cast(MCMStudent, student).backbone  # the head shapes the loss only; MCM's demo samples without it

    @property
    def is_lora(self) -> bool:
        return self.cfg.lora_rank > 0

    def plan(self) -> dict[int, SamplingPlan]:
        """As LCM's: the teacher pipeline's stock times, or LCMScheduler's picks from the skipping grid."""
        return grid_plans(self.teacher, self.grid, self.cfg.plan_steps, self.cfg.gamma, self.cfg.plan_times)


def _latent_channels(model: nn.Module) -> int:
    channels = getattr(model.config, "in_channels", None)
    if not isinstance(channels, int):
        raise FewstepError(f"mcm: {type(model).__name__} has no in_channels in its config for the motion head")
    return channels
