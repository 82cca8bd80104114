"""Phased DMD: distribution matching within SNR subintervals, one expert per phase (Fan et al. 2025; LightX2V).

The teacher's time range is cut at ``boundaries`` into K phases [s_{p+1}, s_p] (s_0 = t_max, s_K = t_min). Expert p
(a copy of the teacher) carries the sampler through phase p: from x at s_p, through its share of the plan's steps,
to the phase's end x_s at s = s_{p+1} (the last phase ends on x0). Training is progressive toward higher SNR: phase p
trains from step p * ``phase_steps`` on, its input made by the earlier, finished experts (no gradient).

Boundaries, plan steps and DMD times are laid out in the teacher scheduler's unshifted time u in [0, 1] and read
through its shift, as its own sampling grid is (``sampling.grid_time``). LightX2V names its switch (``match_timestep``
500) and its steps ([1000, 750, 500, 250]) in raw timesteps and reads each as the scheduler's shifted timestep
(ModelTC/LightX2V, lightx2v_train trainers/phased_dmd/math.py ``raw_timesteps_to_sigmas``): on SD3 (shift 3) the
switch at u = 0.5 is sigma 0.75. Each step:
  x_s: expert p's steps with gradient through all of them (no stochastic truncation within a phase)
  t at u ~ U(u_s, u_p), x_t = a x_s + b z                 the subinterval forward (``forward_transition``); u uniform
                                                           in unshifted time, as LightX2V draws raw timesteps
  m = E[x_s | x_t] from an x0 estimate (``dmd.subinterval_mean``; m = x0 at s = t_min)
  student: 1/2 ||x_s - sg(x_s - grad)||^2, grad = (m_fake - m_real) / mean|x_s - m_real|
  fake p:  ||m_fake - sg(x_s)||^2 / b^2                    score matching within the subinterval (rCM's 1/sigma^2
                                                           weighting at s = 0)
The exported backbone is a ``TimestepExperts`` that switches expert per phase at the same boundaries.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import batch_random
from ..errors import FewstepError
from ..objectives.dmd import dmd_generator_loss, dmd_gradient, fake_score_network, subinterval_mean
from ..objectives.generator import student_network
from ..sampling import Denoise, SamplingPlan, advance, grid_time, plan_state
from ..schedules import append_dims, forward_transition, transition
from ..teacher import Denoiser
from ..training.data import DataConfig
from ..training.trainer import TrainConfig, ema_decay_at, ema_update
from .base import Batch, OptimizerSpec, Recipe


@dataclass(frozen=True)
class PhasedDMDConfig:
    # phase edges, descending, as fractions of the teacher scheduler's unshifted timesteps, read through its shift
    # (LightX2V's Wan2.1 config: two experts split at match_timestep 500 of 1000, sigma 0.75 at SD3's shift 3)
    boundaries: tuple[float, ...] = (0.5,)
    phase_steps: int = 500  # iterations per phase before the next (higher-SNR) phase starts; the last runs on
    train_steps: tuple[int, ...] = (4,)  # plan step counts trained (each a multiple of the number of phases)
    # exported plans, uniform in unshifted time within each phase: 4 steps is LightX2V's [1000, 750, 500, 250] read
    # through the shift (the teacher's 4-step Euler times, as SiD's and TDM's plans)
    plan_steps: tuple[int, ...] = (2, 4)
    gamma: float = 1.0  # re-noising between steps (fresh noise)
    guidance: float = 1.0  # the teacher's Ho-Salimans scale (LightX2V trains Wan at 5.0)
    lr: float = 1e-5  # the experts (presets set their own)
    fake_lr: float = 1e-5
    betas: tuple[float, float] = (0.0, 0.999)
    fake_steps: int = 5  # fake-score steps per expert step (LightX2V's fake_update_ratio)
    fake_lora_rank: int = 0  # 0: each phase's fake score is a full copy of the teacher
    lora_rank: int = 0  # > 0: experts as LoRA adapters (not exportable as one folder yet)
    # the lowest DMD / fake-score time, a fraction of the teacher's unshifted range like ``boundaries`` (the last
    # phase reaches t_min otherwise; LightX2V's score_timestep_min is 20 of 1000)
    t_floor: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


class PhasedDMD(Recipe):
    name = "phased_dmd"
    paper: ClassVar[str] = "Phased DMD, distribution matching within SNR subintervals (Fan et al. 2025)"
    Config: ClassVar[type] = PhasedDMDConfig

    def __init__(self, teacher: Denoiser, cfg: PhasedDMDConfig = PhasedDMDConfig()):
        b = cfg.boundaries
        if any(not 0 < x < 1 for x in b) or any(x <= y for x, y in zip(b, b[1:], strict=False)):
            raise FewstepError(f"phased_dmd: boundaries must be strictly decreasing in (0, 1), got {b}")
        k = len(b) + 1
        if any(n % k for n in (*cfg.train_steps, *cfg.plan_steps)) or not set(cfg.train_steps) <= set(cfg.plan_steps):
            raise FewstepError(f"phased_dmd: step counts must be multiples of the {k} phases, train_steps among plans")
        if cfg.lora_rank > 0:
            raise FewstepError("phased_dmd: LoRA experts cannot be exported yet; use full experts (lora_rank = 0)")
        self.cfg = cfg
        self.teacher = teacher
        native = teacher.native
        teacher.model.requires_grad_(False).eval()
        self.u_edges = [1.0, *b, 0.0]  # unshifted u_0 > ... > u_K
        self.edges = [native.t_max, *(float(grid_time(native, x)) for x in b), native.t_min]  # s_0 > ... > s_K
        if not 0 <= cfg.t_floor < b[-1]:
            raise FewstepError(
                f"phased_dmd: t_floor must lie in [0, {b[-1]}) (below the last boundary), got {cfg.t_floor}"
            )
        self.t_floor = float(grid_time(native, cfg.t_floor))  # the lowest DMD / fake-score time, teacher time
        self.experts = nn.ModuleList(student_network(teacher.model) for _ in range(k))
        self.ema_experts = copy.deepcopy(self.experts).requires_grad_(False)  # one bias-corrected EMA per expert
        self.ema_count = [0] * k
        self.students = [teacher.with_model(m) for m in self.experts]
        fakes = (fake_score_network(teacher.model, cfg.fake_lora_rank).eval() for _ in range(k))
        self.fakes = [teacher.with_model(f) for f in fakes]
        self.plans = {n: self.phased_plan(n) for n in cfg.plan_steps}

    def phased_plan(self, n: int) -> SamplingPlan:
        """n / K times per phase, uniform within it in unshifted time (4 steps, two phases: u = 1, 0.75, 0.5, 0.25,
        LightX2V's [1000, 750, 500, 250]); each phase's first time is its edge exactly."""
        m = n // self.phases
        times = [
            s_hi if j == 0 else float(grid_time(self.teacher.native, u_hi - j * (u_hi - u_lo) / m))
            for s_hi, u_hi, u_lo in zip(self.edges, self.u_edges, self.u_edges[1:], strict=False)
            for j in range(m)
        ]
        return SamplingPlan(self.teacher.native, tuple(times), self.cfg.gamma)

    @property
    def phases(self) -> int:
        return len(self.experts)

    def phase_of(self, t: float) -> int:
        """The phase a time belongs to; a boundary time opens the next (lower-noise) phase."""
        return sum(t <= s for s in self.edges[1:-1])

    def phase_at(self, step: int) -> int:
        return min(step // self.cfg.phase_steps, self.phases - 1)

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.experts, **{f"fake_{p}": f.model for p, f in enumerate(self.fakes)}}

    def ema(self) -> list[str]:
        return []  # each expert keeps its own EMA here, counted over its own phase only

    def optimizer(self, name: str) -> OptimizerSpec:
        lr = self.cfg.fake_lr if name.startswith("fake") else self.cfg.lr
        return OptimizerSpec(lr=lr, betas=self.cfg.betas)

    def coeffs(self, t: Tensor, like: Tensor) -> Any:
        return self.teacher.native.coeffs(append_dims(t.to(like), like.ndim))

    def route(self, cond: dict[str, Any]) -> Denoise:
        """The sampler's denoiser: each time's own expert (a plan's times all lie in one phase per step)."""
        return lambda x, t: self.students[self.phase_of(float(t[0]))](x, t, cond)

    def loss(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg, native = self.cfg, self.teacher.native
        if batch.x0 is None:
            raise FewstepError("phased_dmd needs a batch shape: x0 gives it; their values are unused")
        p = self.phase_at(step)
        start, s = self.edges[p], self.edges[p + 1]
        u_start, u_s = self.u_edges[p], self.u_edges[p + 1]
        plan = self.plans[cfg.train_steps[int(torch.randint(len(cfg.train_steps), ()))]]
        within = [t for t in plan.times if self.phase_of(t) == p]
        denoise = self.route(batch.cond)
        with torch.no_grad():  # the finished experts bring x to the phase's start
            x = plan_state(denoise, plan, batch_random.randn_like(batch.x0), plan.times.index(start))
        student_step = step % cfg.fake_steps == 0
        with torch.set_grad_enabled(student_step):  # the phase's own steps, with gradient through all of them
            if s == native.t_min:  # the last phase ends on x0
                x = advance(denoise, native, x, within, cfg.gamma)
                x_s = denoise(x, torch.full((x.shape[0],), within[-1], dtype=x.dtype, device=x.device))
            else:
                x_s = advance(denoise, native, x, [*within, s], cfg.gamma)
        b = x_s.shape[0]
        s_b = torch.full((b,), s, dtype=x_s.dtype)
        u_lo = torch.full((b,), u_s, dtype=x_s.dtype).clamp_min(cfg.t_floor)
        t = grid_time(native, u_lo + (u_start - u_lo) * batch_random.rand((b,), dtype=x_s.dtype))
        c_s, c_t = self.coeffs(s_b, x_s), self.coeffs(t, x_s)
        x_t = forward_transition(x_s.detach(), c_s, c_t, batch_random.randn_like(x_s))
        fake = self.fakes[p]
        m_fake = subinterval_mean(fake(x_t, t, batch.cond), x_t, c_s, c_t)
        b2 = transition(c_s, c_t)[1].flatten(1)[:, 0]
        err = (m_fake - x_s.detach()).pow(2).flatten(1).mean(1)
        out = {f"fake_{p}": (err / b2.clamp_min(1e-8)).mean()}
        if not student_step:
            return out
        with torch.no_grad():
            m_real = subinterval_mean(
                self.teacher.guided(x_t, t, batch.cond, batch.uncond, cfg.guidance), x_t, c_s, c_t
            )
            grad = dmd_gradient(x_s, m_real, m_fake.detach())  # the DMD direction in x_s, normalized per sample
        out["student"] = dmd_generator_loss(x_s, grad)
        return out

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        p = self.phase_at(step)
        self.ema_count[p] += 1
        decay = ema_decay_at(self.cfg.train.ema_decay, self.ema_count[p])
        ema_update(self.ema_experts[p], self.experts[p].parameters(), decay)
        if self.phase_at(step + 1) != p:  # the phase is done: its expert is frozen at its EMA for the later phases
            self.experts[p].load_state_dict(self.ema_experts[p].state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"ema_experts": self.ema_experts.state_dict(), "ema_count": list(self.ema_count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema_experts.load_state_dict(state["ema_experts"])
        self.ema_count = list(state["ema_count"])

    def export_module(self, student: nn.Module) -> nn.Module:
        """The experts' EMAs in one backbone that switches expert at the phase boundaries (model timesteps)."""
        from ..export.experts import TimestepExperts

        native = self.teacher.native
        cuts = [float(native.to_model_timestep(torch.tensor(s, dtype=torch.float64))) for s in self.edges[1:-1]]
        return TimestepExperts.from_experts(list(self.ema_experts), cuts)

    def plan(self) -> dict[int, SamplingPlan]:
        return self.plans
