"""rCM: sCM regularized by distribution matching (Zheng et al. 2025, NVlabs rCM).

The student is sCM's (``recipes/scm.py``, composed, not inherited): the same consistency loss in TrigFlow time, the
same plan and export. After ``dmd_start`` steps of sCM alone, each student step also draws the student's own sample
by backward simulation (a plan of n steps, n from ``plan_steps``: n - 1 steps without gradient, the last with it) and
adds the reverse-divergence DMD term on it (``dmd.py``): x0_G re-noised at t_D, the guided teacher against a fake
score trained on the student's samples. The fake score steps every iteration; the student every
``student_update_freq``-th (two time-scale updates: rCM's 5, DMD2's 5 fake steps per generator step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..objectives.dmd import Weighting, distribution_matching_loss, fake_score_loss, fake_score_network, uniform_times
from ..sampling import plan_state
from ..teacher import Denoiser, guidance_condition
from .base import Batch, OptimizerSpec, Recipe
from .scm import SCM, SCMConfig


@dataclass(frozen=True)
class RCMConfig(SCMConfig):
    dmd_weight: float = 1.0  # rCM's loss_scale_dmd
    scm_weight: float = 1.0  # the consistency term's weight; 0 with dmd_start = 0 is DMD alone (the ablation baseline)
    dmd_start: int = 1000  # sCM-only steps before the DMD term starts (rCM's 1000-iteration warm-up)
    student_update_freq: int = 5  # one student step per this many iterations; the fake score steps on every one
    fake_lr: float = 4e-7  # rCM's fake-score lr (the student's is 2e-6 there); presets set their own
    fake_betas: tuple[float, float] = (0.0, 0.999)  # rCM's Adam betas for both networks
    fake_lora_rank: int = 0  # 0: the fake score is a full copy of the teacher; > 0: a LoRA on a frozen copy
    fake_weighting: Weighting = "v"  # rCM trains the fake score with ||x0_G - x0_fake||^2 / sin^2 t_D
    dmd_t_min: float = 0.02  # t_D uniform over this fraction of the teacher's time range
    dmd_t_max: float = 0.98


class RCM(Recipe):
    name = "rcm"
    paper: ClassVar[str] = "rCM, sCM + distribution matching (Zheng et al. 2025, NVlabs rCM)"
    Config: ClassVar[type] = RCMConfig

    def __init__(self, teacher: Denoiser, cfg: RCMConfig = RCMConfig()):
        if cfg.student_update_freq < 1:
            raise ValueError("student_update_freq must be at least 1")
        self.cfg = cfg
        self.scm = SCM(teacher, cfg)
        self.real = teacher.with_schedule(teacher.native)  # DMD runs in the teacher's own time
        fake_model = fake_score_network(teacher.model, cfg.fake_lora_rank).eval()
        self.fake = teacher.with_model(fake_model)

    def trainable(self) -> dict[str, nn.Module]:
        return {**self.scm.trainable(), "fake": self.fake.model}

    def optimizer(self, name: str) -> OptimizerSpec:
        if name == "fake":
            return OptimizerSpec(lr=self.cfg.fake_lr, betas=self.cfg.fake_betas)
        return self.scm.optimizer(name)

    def student_sample(self, cond: dict[str, Any], like: Tensor) -> Tensor:
        """x0_G by backward simulation: the student's n-step plan (n drawn from ``plan_steps``) run to its last time
        without gradient, then the last step (with gradient where the caller records one): the student's output at
        the times its sampler visits."""
        steps = self.cfg.plan_steps
        plan = self.scm.plan()[steps[int(torch.randint(len(steps), ()))]]
        denoise = lambda x, t: self.scm.student(x, t, cond)  # noqa: E731
        with torch.no_grad():
            x = plan_state(denoise, plan, torch.randn_like(like), plan.steps - 1)
        t = torch.full((x.shape[0],), plan.times[-1], dtype=x.dtype, device=x.device)
        return denoise(x, t)

    def loss(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        if step < cfg.dmd_start:
            return self.scm.loss(batch, step)
        assert batch.x0 is not None
        b = batch.x0.shape[0]
        cond = {**batch.cond, **guidance_condition(self.scm.student.model, torch.full((b,), cfg.guidance))}
        student_step = (step - cfg.dmd_start) % cfg.student_update_freq == 0
        native = self.real.schedule
        fake = lambda x, t: self.fake(x, t, batch.cond)  # noqa: E731
        out = self.scm.loss(batch, step) if student_step and cfg.scm_weight > 0 else {}
        with torch.set_grad_enabled(student_step):
            x0_G = self.student_sample(cond, batch.x0)
        if student_step:
            real = lambda x, t: self.real.guided(x, t, batch.cond, batch.uncond, cfg.guidance)  # noqa: E731
            t_d = uniform_times(native, b, cfg.dmd_t_min, cfg.dmd_t_max)
            dmd, _ = distribution_matching_loss(x0_G, t_d, native, real, fake)
            out["student"] = cfg.scm_weight * out.get("student", 0.0) + cfg.dmd_weight * dmd
        t_f = uniform_times(native, b, cfg.dmd_t_min, cfg.dmd_t_max)
        out["fake"] = fake_score_loss(x0_G, t_f, native, fake, weighting=cfg.fake_weighting)
        return out

    def export_module(self, student: nn.Module) -> nn.Module:
        return self.scm.export_module(student)

    def plan(self) -> dict[int, Any]:
        return self.scm.plan()
