"""TDM: trajectory distribution matching (Luo et al. 2025), a data-free few-step student over trajectory segments.

The n-step plan cuts the teacher's time range into n segments [t_{k+1}, t_k] (t_n = t_min). Each iteration:
  n from ``train_steps`` (sampling-steps-aware: each n has its own segments and targets), k ~ U{0..n-1}
  x_{t_k} from the student's own first k steps (deterministic DDIM, no gradient); x0_G = G(x_{t_k}, t_k)
  x_mid = DDIM(x_{t_k} -> t_{k+1} through x0_G)   the student's own ODE to the segment's end (graph kept)
  x_t = a x_mid + b z,  t ~ U(t_{k+1}, t_k)       forward-noised inside the segment
  student: mean(rho(x0_G - sg(x0_G - (x0_fake - x0_real))) / w),  w = sg(mean|x0_G - x0_real|) per sample,
           rho the pseudo-Huber sqrt(d^2 + c^2) - c or the square (train_tdm_demo.py: coop = x0_G + (real - fake))
  fake:    SNR-weighted (clipped at 5) regression of the detached x0_G at the same x_t (a full copy in the demo)
The 4-step sampler is deterministic (gamma = 0: DDIM between plan times).

The normalizer w divides the per-sample loss, outside rho: with rho the pseudo-Huber at c = 1e-3 the element gradient
is about sign(d) / w, so samples close to the teacher weigh more. Dividing d by w inside rho instead cancels w, since
the saturated pseudo-Huber hands every sample a unit-size sign gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .. import batch_random
from ..errors import FewstepError
from ..objectives.dmd import dmd_normalizer, fake_score_loss, fake_score_network
from ..objectives.generator import FewStepGenerator, generator_plans, student_network
from ..objectives.losses import mean_per_sample, pseudo_huber
from ..sampling import SamplingPlan
from ..schedules import append_dims, ddim_step, forward_transition
from ..teacher import Denoiser
from ..training.data import DataConfig
from ..training.trainer import TrainConfig
from .base import Batch, OptimizerSpec, Recipe


@dataclass(frozen=True)
class TDMConfig:
    train_steps: tuple[int, ...] = (4,)  # the step counts trained (TDM's demo trains 4 segments of its grid)
    plan_steps: tuple[int, ...] = (1, 2, 4)  # exported plans
    # "stock": the times the teacher pipeline's stock scheduler visits for n steps (export/stock.py), so the export
    # samples in plain diffusers; "recipe": the teacher's n-step Euler times (uniform in unshifted time),
    # exported with FewStepScheduler where no stock scheduler runs them
    plan_times: Literal["stock", "recipe"] = "stock"
    gamma: float = 0.0  # deterministic sampling between segments (TDM's 4-step sampler)
    # the teacher's Ho-Salimans scale in the target (TDM README's training command: --cfg 4.5; the script's default: 2)
    guidance: float = 4.5
    huber_c: float | None = 1e-3  # pseudo-Huber c of the student loss (the demo's --use_huber, c = 1e-3); None: L2
    lr: float = 1e-5  # the student (presets set their own)
    fake_lr: float = 1e-5
    betas: tuple[float, float] = (0.0, 0.999)
    fake_steps: int = 1  # fake-score steps per student step
    # 0: the fake score is a full copy of the teacher, as train_tdm_demo.py trains it (a second transformer, every
    # parameter trainable); > 0: a LoRA of that rank on the frozen teacher (fewstep's option, to save memory)
    fake_lora_rank: int = 0
    snr_clip: float = 5.0  # the fake score's SNR weight is clipped at 5 (train_tdm_demo.py)
    # > 0: the student is a LoRA (exported as LoRA weights); 0: a full copy, as the demo trains it. TDM's released
    # students (SD3, Dreamshaper, CogVideoX; Luo-Yihong/TDM README) are LoRAs.
    lora_rank: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


class TDM(Recipe):
    name = "tdm"
    paper: ClassVar[str] = "TDM, trajectory distribution matching (Luo et al. 2025)"
    Config: ClassVar[type] = TDMConfig

    def __init__(self, teacher: Denoiser, cfg: TDMConfig = TDMConfig()):
        if not cfg.train_steps or any(n not in cfg.plan_steps for n in cfg.train_steps):
            raise FewstepError(f"tdm: train_steps {cfg.train_steps} must be among plan_steps {cfg.plan_steps}")
        if cfg.fake_steps < 1:
            raise FewstepError("tdm: fake_steps must be at least 1")
        self.cfg = cfg
        self.teacher = teacher
        teacher.model.requires_grad_(False).eval()
        self.generator = FewStepGenerator(
            teacher,
            student_network(teacher.model, cfg.lora_rank),
            generator_plans(teacher, cfg.plan_steps, cfg.gamma, cfg.plan_times),
        )
        fake_model = fake_score_network(teacher.model, cfg.fake_lora_rank).eval()
        self.fake = teacher.with_model(fake_model)

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.generator.model, "fake": self.fake.model}

    def optimizer(self, name: str) -> OptimizerSpec:
        lr = self.cfg.fake_lr if name == "fake" else self.cfg.lr
        return OptimizerSpec(lr=lr, betas=self.cfg.betas)

    def segment_noise(self, x_k: Tensor, t_k: Tensor, x0_G: Tensor, t_end: float) -> tuple[Tensor, Tensor]:
        """(x_t, t): x0_G carried along the student's own ODE from t_k to the segment's end, then forward-noised to
        t ~ U(t_end, t_k) inside the segment (TDM's use_separate)."""
        native = self.teacher.native
        nd = x_k.ndim
        c_k = native.coeffs(append_dims(t_k, nd))
        end = torch.full_like(t_k, t_end)
        c_end = native.coeffs(append_dims(end, nd))
        x_mid = ddim_step(x0_G, x_k, c_k, c_end)
        t = end + (t_k - end) * batch_random.rand_like(t_k)
        return forward_transition(x_mid, c_end, native.coeffs(append_dims(t, nd)), batch_random.randn_like(x_mid)), t

    def loss(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg, native = self.cfg, self.teacher.native
        if batch.x0 is None:
            raise FewstepError(
                "tdm needs a batch shape: x0 (real or teacher samples) gives it; their values are unused"
            )
        student_step = step % cfg.fake_steps == 0
        plan, k = self.generator.draw(cfg.train_steps)
        with torch.set_grad_enabled(student_step):
            x_k, t_k, x0_G = self.generator.sample(batch.cond, batch_random.randn_like(batch.x0), plan, k)
        t_end = plan.times[k + 1] if k + 1 < plan.steps else native.t_min
        x_t, t = self.segment_noise(x_k, t_k, x0_G.detach(), t_end)
        fake = lambda x, s: self.fake(x, s, batch.cond)  # noqa: E731
        out = {"fake": fake_score_loss(x0_G, t, native, fake, weighting="eps", snr_clip=cfg.snr_clip, x_t=x_t)}
        if not student_step:
            return out
        with torch.no_grad():
            x0_real = self.teacher.guided(x_t, t, batch.cond, batch.uncond, cfg.guidance)
            target = x0_G - (fake(x_t, t) - x0_real)  # TDM's coop: x0_G + (x0_real - x0_fake), unnormalized
            w = dmd_normalizer(x0_G, x0_real).flatten()  # (B,), detached: it weighs samples, outside rho
        out["student"] = (self.per_sample_loss(x0_G, target) / w).mean()
        return out

    def per_sample_loss(self, x0_G: Tensor, target: Tensor) -> Tensor:
        """rho(x0_G - target) averaged per sample, (B,): the pseudo-Huber, or (huber_c None) the square, both as
        train_tdm_demo.py takes them (F.mse_loss, no 1/2)."""
        if self.cfg.huber_c is None:
            return mean_per_sample((x0_G - target).pow(2))
        return pseudo_huber(x0_G, target, self.cfg.huber_c)

    @property
    def is_lora(self) -> bool:
        return self.cfg.lora_rank > 0

    def plan(self) -> dict[int, SamplingPlan]:
        """n-step plans starting at the teacher's t_max and cutting its range into n equal segments (``uniform_plans``:
        1, 0.75, 0.5, 0.25 on an unshifted flow; 999, 749.25, 499.5, 249.75 on a 1000-step DDPM grid).

        train_tdm_demo.py uses another grid: total_steps 900 (its README's command), the student's pure-noise input
        fed at t = 899 and segments of 900 // 4 = 225 steps (899, 674, 449, 224; ends 674, 449, 224, 0). fewstep
        departs from it on purpose: pure noise is the teacher's marginal at t_max, not at 899, and one grid rule keeps
        TDM's plans those of SiD and Phased DMD on every schedule (a test pins the choice)."""
        return self.generator.plans
