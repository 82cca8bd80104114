"""rCM: sCM regularized by distribution matching (Zheng et al. 2025, NVlabs rCM).

The student is sCM's (``recipes/scm.py``, composed, not inherited): the same consistency loss in TrigFlow time, the
same plan and export. After ``dmd_start`` steps of sCM alone, each student step also draws the student's own sample
by backward simulation (a plan of n steps, n from ``plan_steps``: n - 1 steps without gradient, the last with it) and
adds the reverse-divergence DMD term on it (``dmd.py``): x0_G re-noised at t_D, the guided teacher against a fake
score trained on the student's samples. The fake score steps every iteration; the student every
``student_update_freq``-th (two time-scale updates: rCM's 5, DMD2's 5 fake steps per generator step).

Defaults follow SANA-Sprint's sCM weighting and DMD2's DMD term; rCM's own choices (NVlabs/rcm,
rcm/models/t2v_model_distill_rcm.py and rcm/configs/experiments/rcm/wan2pt1_t2v.py) are options, all of them set
by ``recipes/rcm/sd3.toml``: the consistency loss ``scm_loss = "rcm"`` (100 * sum ||F - F^- - g||^2), the DMD term
and critic ``dmd_loss = "rcm"`` (sum ||x0_G - sg(x0_G - grad)||^2; sum ||x0_G - x0_fake||^2 / sin^2 t in TrigFlow
time), the times ``dmd_times = "shifted"`` (UniformShift(5)), ``backward_simulation = "rcm"`` (n cycling 1..4,
random decreasing times) and the plan ``plan_t_max = atan(80)``, ``plan_mids = (1.5, 1.4, 1.0)``.
The fake score steps on every iteration by default, as DMD2's does (its guidance model updates on every one);
``fake_on_student_steps = False`` is rCM's (the critic steps only on the iterations the student does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .. import batch_random
from ..errors import FewstepError
from ..objectives.dmd import (
    Denoise,
    Weighting,
    distribution_matching_loss,
    fake_score_loss,
    fake_score_networks,
    uniform_times,
)
from ..objectives.generator import draw_index, weights_problem
from ..sampling import plan_state
from ..schedules import NoiseSchedule, TrigFlow
from ..teacher import Denoiser, guidance_condition
from .base import Batch, OptimizerSpec, Recipe
from .scm import SCM, SCMConfig


@dataclass(frozen=True)
class RCMConfig(SCMConfig):
    # sCM's part (SCMConfig) defaults to SANA-Sprint's; rCM's: scm_loss = "rcm", loss_scale = 100, p_mean = 0.7,
    # p_std = 1.6 with p_sigma_data = 1 (p_G = LogNormal(0.7, 1.6) in sigma, t = atan(sigma)), sigma_data = 1
    # "dmd2": dmd_weight * 1/2 mean ||x0_G - sg(x0_G - grad)||^2 (DMD2 sd_guidance.py), the critic as
    # ``fake_weighting`` says in the teacher's time; "rcm": dmd_weight * sum ||x0_G - sg(x0_G - grad)||^2 per sample
    # (gradient 2 grad), the critic sum ||x0_G - x0_fake||^2 / sin^2 t in TrigFlow time, both averaged over the batch
    # (rCM's _student_dmd_step and training_step_critic, per-GPU batch 1)
    dmd_loss: Literal["dmd2", "rcm"] = "dmd2"
    dmd_weight: float = 1.0  # with dmd_loss = "rcm" this is rCM's loss_scale_dmd (1)
    scm_weight: float = 1.0  # the consistency term's weight; 0 with dmd_start = 0 is DMD alone (the ablation baseline)
    dmd_start: int = 1000  # sCM-only steps before the DMD term starts (rCM's tangent_warmup of 1000 iterations)
    student_update_freq: int = 5  # one student step per this many iterations (rCM's and DMD2's 5)
    # the fake score also steps on the student's iterations (DMD2: the guidance model updates on every iteration);
    # False: only on the others, as rCM's is_student_phase alternates the two
    fake_on_student_steps: bool = True
    fake_lr: float = 4e-7  # rCM's fake-score lr (the student's is 2e-6 there); presets set their own
    fake_betas: tuple[float, float] = (0.0, 0.999)  # rCM's Adam betas for both networks
    fake_lora_rank: int = 0  # 0: the fake score is a full copy of the teacher; > 0: a LoRA on a frozen copy
    fake_weighting: Weighting = "v"  # the "dmd2" critic: ||x0_G - x0_fake||^2 / sigma^2 in the teacher's time
    # times of the DMD term and the critic: "uniform" over [dmd_t_min, dmd_t_max] of the teacher's range (DMD2's
    # 0.02-0.98); "shifted": rCM's p_D = UniformShift(dmd_time_shift), u ~ U[0, 1) warped to shift u / (1 + (shift -
    # 1) u) in flow time, carried to the teacher's schedule by the noise-to-signal ratio (timestep_utils.py)
    dmd_times: Literal["uniform", "shifted"] = "uniform"
    dmd_t_min: float = 0.02
    dmd_t_max: float = 0.98
    dmd_time_shift: float = 5.0  # rCM's Wan config
    # "plan": the student's n-step plan, n drawn from plan_steps (DMD2's backward simulation on the sampler's times);
    # "rcm": n cycling 1..max_simulation_steps, from pi/2 through per-sample times min(previous, t ~ p_D)
    backward_simulation: Literal["plan", "rcm"] = "plan"
    max_simulation_steps: int = 4  # rCM's max_simulation_steps_fake
    # ours, not rCM's (with backward_simulation = "plan"): one fake score per plan of plan_steps, each trained on its
    # plan's samples and read by that plan's DMD term, so each step count's outputs match the data and not only their
    # mixture (SiD's fake_per_step, where one fake of the mixture measurably lets one step make up for another); the
    # plan drawn for an iteration picks its fake, so each fake steps on 1 / len(plan_steps) of the iterations
    fake_per_plan: bool = False
    # ours, not rCM's (with backward_simulation = "plan"): relative weights of drawing each plan of plan_steps for the
    # DMD term; empty: uniform, as DMD2 draws its backward-simulation step count
    plan_weights: tuple[float, ...] = ()


def shifted_uniform_times(schedule: NoiseSchedule, n: int, shift: float) -> Tensor:
    """(n,) times of rCM's UniformShift (rcm/utils/timestep_utils.py): u ~ U[0, 1), the flow time
    rf = shift u / (1 + (shift - 1) u), then the time of ``schedule`` with the same noise-to-signal ratio rf / (1 - rf)
    (on TrigFlow with sd 1, rCM's atan(rf / (1 - rf)))."""
    u = batch_random.rand((n,), dtype=torch.float64)
    rf = shift * u / (1 + (shift - 1) * u)
    return schedule.time_at_ratio(rf / (1 - rf)).clamp(schedule.t_min, schedule.t_max).float()


def rcm_dmd_loss(x0_gen: Tensor, grad: Tensor) -> Tensor:
    """rCM's DMD term: ||x0_G - sg(x0_G - grad)||^2 summed over elements, averaged over the batch (its gradient with
    respect to x0_G is 2 grad / B), where DMD2's 1/2 mean hands grad / numel."""
    return ((x0_gen - (x0_gen - grad).detach()) ** 2).flatten(1).sum(1).mean()


def rcm_critic_loss(
    x0_gen: Tensor, t: Tensor, native: NoiseSchedule, trig: TrigFlow, fake: Denoise, eps: Tensor | None = None
) -> Tensor:
    """rCM's critic loss: x0_G noised in TrigFlow time at the time of native t's noise-to-signal ratio, and
    ||x0_G - x0_fake||^2 / (sd sin t)^2 summed over elements (sd = 1 in rCM), averaged over the batch; ``fake`` answers
    in TrigFlow time. It is ``fake_score_loss``'s "v" weighting on TrigFlow, summed instead of averaged."""
    t_trig = trig.time_at_ratio(native.ratio(t.double()).clamp_max(1e30)).float()
    return x0_gen[0].numel() * fake_score_loss(x0_gen, t_trig, trig, fake, eps=eps, weighting="v")


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
        if cfg.plan_weights and (problem := weights_problem(cfg.plan_weights, len(cfg.plan_steps))):
            raise FewstepError(f"rcm: plan_weights {list(cfg.plan_weights)} {problem} (one per plan of plan_steps)")
        if cfg.plan_weights and cfg.backward_simulation != "plan":
            raise FewstepError('rcm: plan_weights needs backward_simulation = "plan"')
        if cfg.fake_per_plan and cfg.backward_simulation != "plan":
            raise FewstepError('rcm: fake_per_plan needs backward_simulation = "plan"')
        count = len(cfg.plan_steps) if cfg.fake_per_plan else 1
        fake_models, self.fake_nets = fake_score_networks(teacher.model, cfg.fake_lora_rank, count)
        self.fakes = [teacher.with_model(m) for m in fake_models]
        self.fake = self.fakes[0]

    def trainable(self) -> dict[str, nn.Module]:
        return {**self.scm.trainable(), "fake": self.fake_nets}

    def optimizer(self, name: str) -> OptimizerSpec:
        if name == "fake":
            return OptimizerSpec(lr=self.cfg.fake_lr, betas=self.cfg.fake_betas)
        return self.scm.optimizer(name)

    def dmd_times(self, n: int) -> Tensor:
        """(n,) times in the teacher's schedule for the DMD term and the critic (``dmd_times``)."""
        cfg, native = self.cfg, self.real.schedule
        if cfg.dmd_times == "shifted":
            return shifted_uniform_times(native, n, cfg.dmd_time_shift)
        return uniform_times(native, n, cfg.dmd_t_min, cfg.dmd_t_max)

    @staticmethod
    def simulation_steps(cfg: RCMConfig, step: int) -> int:
        """rCM's n: the student's count of updates (dmd_start + its updates since) on student steps, the critic's own
        count on the others, each % max_simulation_steps + 1 (is_student_phase, get_effective_iteration[_fake])."""
        since = step - cfg.dmd_start
        effective = cfg.dmd_start + since // cfg.student_update_freq
        count = effective if since % cfg.student_update_freq == 0 else step - effective - 1
        return count % cfg.max_simulation_steps + 1

    def student_sample(self, cond: dict[str, Any], like: Tensor, step: int = 0) -> tuple[int, Tensor]:
        """(j, x0_G) by backward simulation: n - 1 student steps without gradient, then the last (with gradient where
        the caller records one). "plan": the student's n-step plan, n = plan_steps[j] with j drawn; "rcm" (j = 0):
        from pi/2 through per-sample times min(previous, t ~ p_D) with fresh noise, n from ``simulation_steps``."""
        denoise = lambda x, t: self.scm.student(x, t, cond)  # noqa: E731
        if self.cfg.backward_simulation == "rcm":
            return 0, self.simulated_sample(denoise, like, self.simulation_steps(self.cfg, step))
        steps = self.cfg.plan_steps
        j = draw_index(len(steps), self.cfg.plan_weights or None)
        plan = self.scm.trig_plans()[steps[j]]
        with torch.no_grad():
            x = plan_state(denoise, plan, batch_random.randn_like(like), plan.steps - 1)
        t = torch.full((x.shape[0],), plan.times[-1], dtype=x.dtype, device=x.device)
        return j, denoise(x, t)

    def simulated_sample(self, denoise: Denoise, like: Tensor, n: int) -> Tensor:
        """rCM's backward_simulation: x = sd z at pi/2; n - 1 times t_k = min(t_{k-1}, t ~ p_D) per sample (p_D's
        times carried to TrigFlow by their noise-to-signal ratio), x = cos t_k x0 + sin t_k sd z between steps."""
        trig, native, b = self.scm.trig, self.real.schedule, like.shape[0]
        t = torch.full((b,), math.pi / 2, dtype=like.dtype, device=like.device)
        x = trig.sigma_data * batch_random.randn_like(like)
        with torch.no_grad():
            for _ in range(n - 1):
                ratio = native.ratio(self.dmd_times(b).double()).clamp_max(1e30)
                t_next = torch.minimum(trig.time_at_ratio(ratio).to(t), t)
                x, t = trig.add_noise(denoise(x, t), batch_random.randn_like(like), t_next), t_next
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
        out = self.scm.loss(batch, step) if student_step and cfg.scm_weight > 0 else {}
        with torch.set_grad_enabled(student_step):
            j, x0_G = self.student_sample(cond, batch.x0, step)
        fake_net = self.fakes[j if cfg.fake_per_plan else 0]
        fake = lambda x, t: fake_net(x, t, batch.cond)  # noqa: E731
        if student_step:
            real = lambda x, t: self.real.guided(x, t, batch.cond, batch.uncond, cfg.guidance)  # noqa: E731
            dmd, grad = distribution_matching_loss(x0_G, self.dmd_times(b), native, real, fake)
            if cfg.dmd_loss == "rcm":
                dmd = rcm_dmd_loss(x0_G, grad)
            out["student"] = cfg.scm_weight * out.get("student", 0.0) + cfg.dmd_weight * dmd
        if student_step and not cfg.fake_on_student_steps:
            return out
        t_f = self.dmd_times(b)
        if cfg.dmd_loss == "rcm":
            fake_trig = fake_net.with_schedule(self.scm.trig)
            out["fake"] = rcm_critic_loss(x0_G, t_f, native, self.scm.trig, lambda x, t: fake_trig(x, t, batch.cond))
        else:
            out["fake"] = fake_score_loss(x0_G, t_f, native, fake, weighting=cfg.fake_weighting)
        return out

    def export_module(self, student: nn.Module) -> nn.Module:
        return self.scm.export_module(student)

    def plan(self) -> dict[int, Any]:
        return self.scm.plan()
