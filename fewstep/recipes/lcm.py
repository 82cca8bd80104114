"""LCM: latent consistency distillation (Luo et al., 2023) and its LoRA variant (LCM-LoRA, Luo et al., 2023b).

Each step (LCM Alg. 1, in the teacher's own time t):
  t_{n+k} -> t_n: two neighbours of an N-point skipping grid over the teacher's sampling range (plus the exported
    plans' times where they fall between its points, ``plan_times_on_grid``),
  x_{t_{n+k}} = alpha x0 + sigma eps, w ~ U[w_min, w_max],
  x_{t_n} = one DDIM step of the teacher's probability-flow ODE with guidance w (Euler for flow teachers),
  f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t) (boundary scalings, LCMScheduler's form),
  loss = pseudo-Huber(f_theta(x_{t_{n+k}}, t_{n+k}, w), sg f_target(x_{t_n}, t_n, w)),
with the target an EMA of the student (mu = 0.95). With ``lora_rank`` > 0 the student is a LoRA on the teacher, w is
not embedded, and the target is the student itself without gradient (LCM-LoRA). With ``adv_weight`` > 0, PCM's
adversarial consistency term (Wang et al., 2024) joins: hinge heads on frozen teacher features score the student's
x0 (from pure noise for a share of the batch) against real x0, both re-noised (``adversarial.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .. import batch_random
from ..errors import FewstepError
from ..objectives.adversarial import TeacherDiscriminator, discriminator_times, ladd_losses, with_largest_time
from ..objectives.consistency import consistency_output, teacher_ode_step
from ..objectives.losses import pseudo_huber
from ..sampling import SamplingPlan, euler_times
from ..schedules import VP, NoiseSchedule
from ..teacher import Denoiser, add_guidance_embedding, guidance_condition
from ..training.data import DataConfig
from ..training.lora import add_lora
from ..training.trainer import TrainConfig, ema_update
from .base import Batch, OptimizerSpec, Recipe


@dataclass(frozen=True)
class LCMConfig:
    num_ddim_timesteps: int = 50  # the skipping-step grid: 50 points over 1000 DDPM steps, k = 20 (LCM Sec. 4.3)
    skip: int = 1  # grid intervals per teacher step (1 on the 50-point grid is LCM's k = 20)
    w_min: float = 3.0  # guidance w ~ U[w_min, w_max] as x0_u + w (x0_c - x0_u); LCM's omega in [2, 14] is w - 1
    w_max: float = 15.0
    w_embedding: bool = True  # embed w in the student (full fine-tuning only, where the backbone has a slot)
    w_embedding_dim: int = 256  # diffusers' LCM distillation script: time_cond_proj_dim = 256
    huber_c: float = 0.001  # pseudo-Huber c (diffusers' LCM distillation scripts)
    target_ema: float = 0.95  # EMA rate mu of the target network (LCM Sec. 4.3)
    timestep_scaling: float = 10.0  # boundary-condition scalings, as LCMScheduler's timestep_scaling
    lora_rank: int = 0  # > 0: LCM-LoRA (rank 64 in Luo et al. 2023b)
    lr: float = 1e-6  # full fine-tuning; LCM-LoRA presets raise it (1e-4)
    betas: tuple[float, float] = (0.9, 0.999)
    plan_steps: tuple[int, ...] = (1, 2, 4)
    # "stock": the times the teacher pipeline's stock scheduler visits for n steps (export/stock.py), so the export
    # samples in plain diffusers; "recipe": n points of the skipping grid picked as LCMScheduler picks them,
    # exported with FewStepScheduler where no stock scheduler runs them
    plan_times: Literal["stock", "recipe"] = "stock"
    # train at every time the exported plans visit: LCMScheduler's timesteps are points of LCM's grid, but a stock
    # flow plan's need not be (FluxPipeline's 4-step 0.75 and 0.25 fall between the 50-point grid's 0.76 / 0.74 and
    # 0.26 / 0.24), so those times join the grid (a no-op where they are on it: VP, "recipe" plans)
    plan_times_on_grid: bool = True
    gamma: float = 1.0  # re-noising of multistep sampling: 1 = fresh noise (LCM's multistep sampler)
    # PCM's adversarial consistency term (Wang et al., 2024, Sec. 4.3; its discriminator reads a frozen teacher, as
    # LADD): the student's x0 against real x0, both re-noised, scored by heads on teacher features; 0 = off (LCM)
    adv_weight: float = 0.0
    adv_lr: float = 1e-4  # the discriminator heads' learning rate
    adv_block_every: int = 1  # read every k-th teacher block
    # log-normal re-noising time t_D as SANA-Sprint's LADD draws it: exp(N(-0.6, 1)) is sigma for data of std
    # adv_p_sigma_data (0.5 there), i.e. a noise-to-signal ratio exp(N) / 0.5 on the data as given
    adv_p_mean: float = -0.6
    adv_p_std: float = 1.0
    adv_p_sigma_data: float = 0.5
    adv_largest_t_prob: float = 0.5  # share of generator samples from pure noise (the one-step generator)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def skipping_grid(schedule: NoiseSchedule, n: int) -> Tensor:
    """N + 1 descending times: the teacher's n-step sampling times, then the boundary t_min.

    VP (DDPM timesteps 0..T-1): LCM's grid T - 1 - i T/n (999, 979, ..., 19 for n = 50), then 0, so that LCMScheduler's
    own timesteps are grid points; flow and the others: the teacher's Euler grid (flow's shifted like
    FlowMatchEulerDiscreteScheduler).
    """
    if isinstance(schedule, VP):
        total = schedule.num_train_timesteps
        times = [total - 1 - i * (total // n) for i in range(n)] + [schedule.t_min]
        return torch.tensor(times, dtype=torch.float64).float()
    return torch.tensor(euler_times(schedule, n))


def with_times(grid: Tensor, times: Sequence[float], tol: float = 1e-6) -> Tensor:
    """``grid`` (descending) with each of ``times`` inside its range that is not already a grid point, kept
    descending."""
    lo, hi = float(grid.min()), float(grid.max())
    extra = [t for t in times if lo < t < hi and not bool(((grid - t).abs() <= tol).any())]
    if not extra:
        return grid
    merged = torch.cat([grid, torch.tensor(sorted(set(extra)), dtype=grid.dtype)])
    return merged.sort(descending=True).values


class LCM(Recipe):
    name = "lcm"
    paper: ClassVar[str] = "LCM / LCM-LoRA, latent consistency distillation (Luo et al. 2023)"
    Config: ClassVar[type] = LCMConfig

    def __init__(self, teacher: Denoiser, cfg: LCMConfig = LCMConfig()):
        if cfg.w_min > cfg.w_max:
            raise FewstepError(f"lcm: w_min {cfg.w_min} > w_max {cfg.w_max}")
        if not 1 <= cfg.skip < cfg.num_ddim_timesteps:
            raise FewstepError(f"lcm: skip must lie in [1, num_ddim_timesteps), got {cfg.skip}")
        self.cfg = cfg
        self.teacher = teacher
        teacher.model.requires_grad_(False).eval()
        model: nn.Module | None = None
        if cfg.lora_rank > 0:
            model = add_lora(copy.deepcopy(teacher.model), cfg.lora_rank)
        elif cfg.w_embedding and cfg.w_min != cfg.w_max:
            model = add_guidance_embedding(teacher.model, cfg.w_embedding_dim)
            model = None if model is None else model.requires_grad_(True)  # a copy of the frozen teacher (Flux-dev)
        if model is None:
            model = copy.deepcopy(teacher.model).requires_grad_(True)
        self.embeds_w = bool(guidance_condition(model, torch.ones(1)))
        if cfg.w_min != cfg.w_max and not self.embeds_w and cfg.lora_rank == 0:
            raise FewstepError(
                f"lcm: {type(model).__name__} cannot embed the guidance scale; set w_min = w_max (a fixed w)"
            )
        self.model = model.eval()  # eval: no dropout, and DiT drops no labels on its own (../shared/DIGITS.md)
        self.student = teacher.with_model(self.model)
        # LCM: an EMA target network; LCM-LoRA: the student itself, without gradient
        self.target_model = self.model if cfg.lora_rank > 0 else copy.deepcopy(self.model).requires_grad_(False)
        self.target = teacher.with_model(self.target_model)
        self.grid = skipping_grid(teacher.native, cfg.num_ddim_timesteps)  # t_max ... t_min, descending
        # the times the consistency loss pairs: the skipping grid, with the exported plans' times where they are off it
        plan_times = [t for p in self.plan().values() for t in p.times] if cfg.plan_times_on_grid else []
        self.train_grid = with_times(self.grid, plan_times)
        self.disc = TeacherDiscriminator(teacher, cfg.adv_block_every) if cfg.adv_weight > 0 else None

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.model, **({"critic": self.disc.heads} if self.disc is not None else {})}

    def optimizer(self, name: str) -> OptimizerSpec:
        if name == "critic":
            return OptimizerSpec(lr=self.cfg.adv_lr, betas=(0.0, 0.99))
        return OptimizerSpec(lr=self.cfg.lr, betas=self.cfg.betas)

    def f(self, denoiser: Denoiser, x: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        """The consistency function f(x, t) = c_skip x + c_out x0(x, t) (identity at the boundary t_min)."""
        return consistency_output(denoiser, x, t, cond, self.cfg.timestep_scaling)

    def loss(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg, native = self.cfg, self.teacher.native
        if batch.x0 is None:
            raise FewstepError("lcm needs x0 samples (real images, or teacher samples for image-free runs)")
        x0 = batch.x0
        b = x0.shape[0]
        grid = self.train_grid
        n = batch_random.randint(len(grid) - cfg.skip, (b,))
        t, s = grid[n].to(x0), grid[n + cfg.skip].to(x0)  # t = t_{n+k} > s = t_n
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * batch_random.rand((b,))
        cond = dict(batch.cond)
        if self.embeds_w:
            cond.update(guidance_condition(self.model, w))
        x_t = native.add_noise(x0, batch_random.randn_like(x0), t)
        with torch.no_grad():
            guidance: float | Tensor = cfg.w_min if cfg.w_min == cfg.w_max else w
            x_s = teacher_ode_step(self.teacher, x_t, t, s, batch.cond, batch.uncond, guidance)
            target = self.f(self.target, x_s, s, cond)
        pred = self.f(self.student, x_t, t, cond)
        loss = pseudo_huber(pred, target, cfg.huber_c).mean()
        if self.disc is None:
            return {"student": loss}
        # the adversarial term: the student's x0 at a grid time, or from pure noise for a share of the batch
        t_g = with_largest_time(t, float(self.grid[0]), cfg.adv_largest_t_prob)
        x_g = native.add_noise(x0, batch_random.randn_like(x0), t_g)
        t_d = discriminator_times(native, b, cfg.adv_p_mean, cfg.adv_p_std, cfg.adv_p_sigma_data)
        generator, critic = ladd_losses(self.disc, self.f(self.student, x_g, t_g, cond), x0, t_d, batch.cond)
        return {"student": loss + cfg.adv_weight * generator, "critic": critic}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self.target_model is self.model:
            return
        ema_update(self.target_model, self.model.parameters(), self.cfg.target_ema)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.target_model is self.model else {"target": self.target_model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "target" in state:
            self.target_model.load_state_dict(state["target"])

    @property
    def is_lora(self) -> bool:
        return self.cfg.lora_rank > 0

    def plan(self) -> dict[int, SamplingPlan]:
        return grid_plans(self.teacher, self.grid, self.cfg.plan_steps, self.cfg.gamma, self.cfg.plan_times)


def grid_plans(
    teacher: Denoiser, grid: Tensor, steps: tuple[int, ...], gamma: float, plan_times: str
) -> dict[int, SamplingPlan]:
    """The teacher pipeline's stock times (``plan_times`` = "stock"; on VP teachers LCMScheduler's own, which are the
    recipe's), or n times of the N + 1-point skipping ``grid`` at indices floor(linspace(0, N, n, endpoint=False))
    from t_max, as LCMScheduler picks its timesteps (999, 759, 499, 259 for 4 steps on SD's grid)."""
    from ..export.stock import plans_for

    num = len(grid) - 1

    def on_grid(n: int) -> list[float]:
        index = (torch.arange(n, dtype=torch.float64) * num / n).floor().long()
        return [float(t) for t in grid[index]]

    return plans_for(teacher, steps, gamma, plan_times, on_grid)
