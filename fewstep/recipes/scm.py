"""sCM: continuous-time consistency distillation in TrigFlow (Lu & Song, 2024; SANA-Sprint, Chen et al., 2025).

The student starts from the teacher's weights and answers in TrigFlow time through the exact change of variables
(no retraining: SANA-Sprint Sec. 3.1). Each step (Lu & Song, Alg. 1 with the JVP rearrangement):
  t ~ log-normal proposal, x_t = cos t x0 + sin t sd eps
  dx_t/dt from the teacher (PF-ODE velocity in TrigFlow time)
  F^-, dF^-/dt = jvp(F_student, (x_t, t), (cos t sin t dx_t/dt, cos t sin t)) under no_grad
  g = normalize(-cos^2 t (sd F^- - dx_t/dt) - r (cos t sin t x_t + sd dF^-/dt))
  loss = (w(t) / e^logvar(t)) ||F_theta - sg(F^- + g)||^2 + logvar(t)      (SANA-Sprint's form, ``scm_loss = "sana"``)
  loss = loss_scale sum ||F_theta - sg(F^- + g)||^2, rCM's g warm-up        (rCM's form, ``scm_loss = "rcm"``)

sigma_data is the data's std as the schedule sees it: x_t = cos t x0 + sin t sd eps on x0 as the data stream gives
it. SANA-Sprint scales unit latents to std 0.5 and runs TrigFlow with sd = 0.5 on them; rCM runs sd = 1 on unit
latents. On unit-variance latents both are TrigFlow with sd = 1 on the latents themselves (same times, same noise-to-
signal ratio tan t, the same F, x0 up to the 0.5 scale), hence the default. Two of SANA-Sprint's scales then differ
by 2: its tangent g is computed on the 0.5-scaled data, so g / (||g|| + 0.1) there is g / (||g|| + 0.2)
here (negligible where ||g|| sums 10^4 elements), and its w(t) = 1 / (0.5 tan t) is twice ours (a constant factor).
The papers' time proposals state sigma for data of a reference std (SANA-Sprint 0.5, rCM 1), kept apart as
``p_sigma_data`` / ``adv_p_sigma_data``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .. import batch_random
from ..errors import FewstepError
from ..objectives.adversarial import TeacherDiscriminator, discriminator_times, ladd_losses, with_largest_time
from ..objectives.losses import (
    adaptive_weighted_loss,
    normalize_tangent,
    rcm_tangent,
    scm_tangent,
    tangent_warmup,
    trigflow_time_proposal,
    trigflow_weight,
)
from ..objectives.tangent import Method, directional_derivative
from ..sampling import SamplingPlan, plan_in
from ..schedules import TrigFlow, append_dims, velocity
from ..teacher import Denoiser, guidance_condition
from ..time_embedding import smooth_time_embedding
from ..training.data import DataConfig
from ..training.trainer import TrainConfig
from .base import Batch, OptimizerSpec, Recipe


@dataclass(frozen=True)
class SCMConfig:
    # TrigFlow's sd on the data as given (Lu & Song, Sec. 2). 1: SANA-Sprint (sd 0.5 on latents scaled by 0.5) and
    # rCM (asserts sd 1) both equal TrigFlow with sd 1 on unit-variance latents (module docstring)
    sigma_data: float = 1.0
    p_mean: float = 0.2  # log-normal proposal of sigma (SANA-Sprint train_scm_ladd: 0.2, 1.6)
    p_std: float = 1.6
    p_sigma_data: float = 0.5  # SANA-Sprint states sigma for data of std 0.5: tan t = e^N / 0.5 on unit data
    tangent_warmup_steps: int = 200  # SANA-Sprint uses 4000 for 20k+ steps; scaled to short runs
    tangent_c: float = 0.1  # g / (||g|| + c), Lu & Song Sec. 4.2
    adaptive_weighting: bool = True  # learned logvar(t) (Lu & Song Sec. 4.2); False: w(t) ||.||^2 alone
    # "sana": (w(t) / e^logvar) ||.||^2 + logvar, means over elements and batch (SANA-Sprint train_scm_ladd);
    # "rcm": loss_scale * ||.||^2 summed over elements, no w(t), no logvar, rCM's tangent warm-up, mean over the batch
    # (NVlabs/rcm _student_scm_step sums per sample and over its per-GPU batch of 1; FSDP averages over GPUs)
    scm_loss: Literal["sana", "rcm"] = "sana"
    loss_scale: float = 100.0  # rCM's loss_scale (scm_loss = "rcm" only)
    lr: float = 1e-4  # the student; presets set their own
    logvar_lr: float | None = None  # the logvar head's own lr (None: the student's)
    betas: tuple[float, float] = (0.9, 0.999)
    guidance: float = 1.0  # the teacher's CFG scale w (x0_u + w (x0_c - x0_u)); the student learns the guided ODE
    # and receives w through its own guidance embedding where the backbone has one (SANA-Sprint embeds w)
    jvp: Method = "auto"  # dF/dt by forward-mode JVP, or "fd" (central difference); "auto" falls back to fd
    fd_step: float = 1e-3  # step of the finite-difference fallback (in units of the tangent)
    adv_weight: float = 0.0  # LADD-style adversarial term on frozen teacher features (SANA-Sprint); 0 = off
    adv_lr: float = 1e-4  # the discriminator heads' learning rate
    adv_block_every: int = 1  # read every k-th teacher block
    adv_p_mean: float = -0.6  # log-normal proposal of the discriminator's re-noising time t_D (SANA-Sprint: -0.6, 1.0)
    adv_p_std: float = 1.0
    adv_p_sigma_data: float = 0.5  # SANA-Sprint draws t_D as its proposal, sigma for data of std 0.5
    adv_largest_t_prob: float = 0.5  # share of generator samples drawn from pure noise at pi/2 (SANA-Sprint's
    # train_largest_timestep), so the one-step generator itself gets the adversarial signal
    # the student's time embedding keeps sinusoid channels up to this frequency (rad per timestep unit): our analogue
    # of SANA-Sprint's dense time embedding without retraining the teacher (``time_embedding.py``); inf keeps all
    time_max_freq: float = 0.1
    # the 2-step plan's second time (rad): SANA-Sprint's default (diffusers SCMScheduler), an angle on latents scaled
    # to std 0.5, i.e. on unit latents at sd 1
    plan_mid: float = 1.3
    plan_steps: tuple[int, ...] = (1, 2, 4)  # other counts than 2 are uniform in angle, as SCMScheduler spaces them
    plan_t_max: float = math.pi / 2  # the first time (SANA-Sprint's 1.5708; rCM's sampler: atan(sigma_max = 80))
    # when given, the n-step plan is (plan_t_max, *plan_mids[:n - 1]) for every n (rCM's mid_t: 1.5, 1.4, 1.0,
    # NVlabs/rcm generate_samples_from_batch); empty: plan_mid for 2 steps, uniform in angle otherwise
    plan_mids: tuple[float, ...] = ()
    # "stock": the times the teacher pipeline's stock scheduler visits for n steps (export/stock.py: SCMScheduler's
    # on SANA-Sprint, FlowMatchEulerDiscreteScheduler's or LCMScheduler's elsewhere), so the export samples in plain
    # diffusers; "recipe": the plan_* times above, exported with FewStepScheduler (except where they are stock)
    plan_times: Literal["stock", "recipe"] = "stock"
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


class LogVar(nn.Module):
    """The learned adaptive weight logvar(t): Fourier features of t -> a linear layer (EDM2-style)."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.freqs: Tensor
        self.register_buffer("freqs", torch.randn(channels // 2, generator=torch.Generator().manual_seed(0)) * 4)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        phase = t.float()[:, None] * self.freqs[None] * 2 * math.pi
        return self.linear(torch.cat([phase.cos(), phase.sin()], dim=1))[:, 0]


class SCM(Recipe):
    name = "scm"
    paper: ClassVar[str] = "sCM, continuous-time consistency distillation (Lu & Song 2024; SANA-Sprint 2025)"
    Config: ClassVar[type] = SCMConfig

    def __init__(self, teacher: Denoiser, cfg: SCMConfig = SCMConfig()):
        if cfg.plan_mids and max(cfg.plan_steps) > len(cfg.plan_mids) + 1:
            raise FewstepError(
                f"plan_steps {cfg.plan_steps} need {max(cfg.plan_steps) - 1} plan_mids, got {cfg.plan_mids}"
            )
        mids = [cfg.plan_t_max, *(cfg.plan_mids or ([cfg.plan_mid] if 2 in cfg.plan_steps else []))]
        if any(a <= b for a, b in zip(mids, mids[1:], strict=False)):
            raise FewstepError(f"sCM plan times must decrease from plan_t_max, got {mids}")
        self.cfg = cfg
        self.trig = TrigFlow(sigma_data=cfg.sigma_data)
        self.teacher = teacher.with_schedule(self.trig)
        self.teacher.model.requires_grad_(False).eval()
        # eval mode while training: no dropout and, for DiT, no per-block random label dropping (../shared/DIGITS.md)
        student_model = copy.deepcopy(teacher.model).requires_grad_(True).eval()
        if math.isfinite(cfg.time_max_freq):
            smooth_time_embedding(student_model, cfg.time_max_freq)
        self.student = Denoiser(student_model, teacher.native, teacher.prediction, self.trig, teacher.backbone)
        self.logvar = LogVar()
        self.nets = nn.ModuleDict({"model": student_model, "logvar": self.logvar})
        self.method: Method = cfg.jvp
        self.disc = TeacherDiscriminator(self.teacher, cfg.adv_block_every) if cfg.adv_weight > 0 else None
        self._plans = self._stock_plans(teacher)  # in the teacher's time where stock, so export matches exactly
        self._trig_plans = {n: plan_in(p, self.trig) for n, p in self._plans.items()}

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.nets, **({"critic": self.disc.heads} if self.disc is not None else {})}

    def optimizer(self, name: str) -> OptimizerSpec:
        if name == "critic":
            return OptimizerSpec(lr=self.cfg.adv_lr, betas=(0.0, 0.99))
        by_prefix = {"logvar.": self.cfg.logvar_lr} if self.cfg.logvar_lr is not None else {}
        return OptimizerSpec(lr=self.cfg.lr, betas=self.cfg.betas, lr_by_prefix=by_prefix)

    def proposal(self, n: int) -> Tensor:
        """(n,) training times from the log-normal proposal, stated for data of std ``p_sigma_data``."""
        cfg = self.cfg
        return trigflow_time_proposal(n, cfg.p_mean, cfg.p_std, cfg.sigma_data, cfg.p_sigma_data)

    def F(self, x_t: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        """The student's TrigFlow output F_theta(x_t, t) (Lu & Song, Eq. 4: x0 = cos t x_t - sin t sd F)."""
        return self.student.predict(x_t, t, cond, prediction="trigflow")

    def loss(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        if batch.x0 is None:
            raise FewstepError("scm needs x0 samples (real images, or teacher samples for image-free runs)")
        x0, cond = batch.x0, dict(batch.cond)
        cond.update(guidance_condition(self.student.model, torch.full((x0.shape[0],), cfg.guidance)))
        t = self.proposal(x0.shape[0]).clamp(1e-3, math.pi / 2 - 1e-3)
        eps = batch_random.randn_like(x0)
        x_t = self.trig.add_noise(x0, eps, t)
        c_t = self.trig.coeffs(append_dims(t, x_t.ndim))
        with torch.no_grad():
            x0_teacher = self.teacher.guided(x_t, t, batch.cond, batch.uncond, cfg.guidance)
            dxt_dt = velocity(x0_teacher, x_t, c_t)
            cos_sin = t.cos() * t.sin()
            tangents = (append_dims(cos_sin, x_t.ndim) * dxt_dt, cos_sin)  # the JVP rearrangement (Lu & Song)
            F_minus, dF_dt, self.method = directional_derivative(
                lambda x, s: self.F(x, s, cond), (x_t, t), tangents, self.method, cfg.fd_step
            )
            r = tangent_warmup(step, cfg.tangent_warmup_steps)
            tangent = rcm_tangent if cfg.scm_loss == "rcm" else scm_tangent
            g = normalize_tangent(tangent(F_minus, dF_dt, dxt_dt, x_t, t, cfg.sigma_data, r), cfg.tangent_c)
            target = F_minus + g
        F_theta = self.F(x_t, t, cond)
        if cfg.scm_loss == "rcm":
            loss = cfg.loss_scale * ((F_theta.float() - target.float()) ** 2).flatten(1).sum(1).mean()
        else:
            logvar = self.logvar(t) if cfg.adaptive_weighting else torch.zeros_like(t)
            loss = adaptive_weighted_loss(F_theta, target, logvar, trigflow_weight(t, cfg.sigma_data)).mean()
        if self.disc is None:
            return {"student": loss}
        # LADD (SANA-Sprint): the student's x0 from a fresh time (pure noise at pi/2 for a share of the batch) against
        # a real x0, both re-noised at a discriminator time and scored on frozen teacher features
        b = x0.shape[0]
        t_g = self.proposal(b).clamp(1e-3, math.pi / 2)
        t_g = with_largest_time(t_g, math.pi / 2, cfg.adv_largest_t_prob)
        x_g = self.trig.add_noise(x0, batch_random.randn_like(x0), t_g)
        c_g = self.trig.coeffs(append_dims(t_g, x0.ndim))
        x0_theta = c_g.alpha * x_g - c_g.sigma * self.F(x_g, t_g, cond)  # Lu & Song, Eq. 4
        t_d = discriminator_times(self.trig, b, cfg.adv_p_mean, cfg.adv_p_std, cfg.adv_p_sigma_data)
        generator, critic = ladd_losses(self.disc, x0_theta, x0, t_d, batch.cond)
        return {"student": loss + cfg.adv_weight * generator, "critic": critic}

    def export_module(self, student: nn.Module) -> nn.Module:
        assert isinstance(student, nn.ModuleDict)  # {"model", "logvar"}: the logvar head is training-only
        return student["model"]

    def plan(self) -> dict[int, SamplingPlan]:
        """``plan_times`` = "stock": the times the teacher pipeline's stock scheduler visits (``export.stock``;
        SCMScheduler's own on SANA-Sprint), in the teacher's time. "recipe" (or a
        teacher without a stock sampler): from ``plan_t_max`` (pure noise at pi/2 by default); with ``plan_mids``, n
        steps visit its first n - 1 times (rCM's sampler); else 2 steps re-noise at ``plan_mid`` and n steps at n
        times uniform in angle (as SCMScheduler: linspace(pi/2, 0, n + 1) without the final 0). Fresh noise, as
        sCM's multistep sampler; in TrigFlow time."""
        return self._plans

    def trig_plans(self) -> dict[int, SamplingPlan]:
        """The plans in the student's TrigFlow time (backward simulation runs them on the student)."""
        return self._trig_plans

    def _recipe_plans(self) -> dict[int, SamplingPlan]:
        cfg, plans = self.cfg, {}
        for n in cfg.plan_steps:
            if cfg.plan_mids:
                times: tuple[float, ...] = (cfg.plan_t_max, *cfg.plan_mids[: n - 1])
            elif n == 2:
                times = (cfg.plan_t_max, cfg.plan_mid)
            else:
                times = tuple(cfg.plan_t_max * (1 - i / n) for i in range(n))
            plans[n] = SamplingPlan(self.trig, times, gamma=1.0)
        return plans

    def _stock_plans(self, teacher: Denoiser) -> dict[int, SamplingPlan]:
        from ..export.stock import stock_sampler

        sampler = stock_sampler(teacher, 1.0, self.cfg.plan_times)
        if sampler is None:  # the recipe's own plans, kept in TrigFlow time
            return self._recipe_plans()
        return {n: SamplingPlan(teacher.native, sampler.times(n), gamma=1.0) for n in self.cfg.plan_steps}
