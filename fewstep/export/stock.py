"""The stock diffusers sampler a teacher's pipeline would run a few-step student with, and the times it visits.

A plan counts as stock when ``pipe(prompt, num_inference_steps=n)`` in plain diffusers runs it from the scheduler's
config alone: the exported folder then loads and samples without fewstep. Which stock scheduler carries which
re-noise rule (``sampling.renoise``'s gamma):

- flow teachers: FlowMatchEulerDiscreteScheduler, gamma = 0 its Euler step (DDIM on a flow), gamma = 1 its
  ``stochastic_sampling`` (x0, then the forward process to the next sigma with fresh noise);
- VP teachers: LCMScheduler for gamma = 1 (Luo et al. 2023, its multistep sampler), DDIMScheduler with trailing
  timesteps for gamma = 0 (Lin et al. 2024, Table 2: trailing spacing starts at the last timestep); under TCD's own
  re-noise rule (``sampling.RULES``) TCDScheduler for any gamma, passed as its ``eta`` at call time (Zheng et al.
  2024; Hyper-SD's card runs its LoRAs so);
- SanaSprintPipeline (TrigFlow): SCMScheduler, gamma = 1 (Lu & Song 2024, its multistep sampler).

Where a scheduler's grid comes from also depends on the pipeline's loop, so the times are read off the stock
scheduler itself, set as that loop sets it: FluxPipeline (and fewstep's DigitsPipeline) pass
``sigmas = linspace(1, 1/n, n)`` and, with dynamic shifting, the resolution's mu; SD3, Sana and Wan pass only n, so
FlowMatchEulerDiscreteScheduler spaces its own sigmas (the grid SD3.5 Large Turbo samples at);
SanaSprintPipeline passes its ``max_timesteps`` and, for 2 steps, its ``intermediate_timesteps`` (its call refuses
them for other step counts: pass ``intermediate_timesteps=None`` there).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FewstepError
from ..sampling import SamplingPlan
from ..schedules import VP, Flow, NoiseSchedule, TrigFlow, diffusers_schedule_config

# pipelines whose __call__ passes sigmas = linspace(1, 1/n, n) to a flow scheduler (FluxPipeline's rule)
UNIFORM_SIGMAS = frozenset({"FluxPipeline", "DigitsPipeline"})
# SanaSprintPipeline.__call__'s max_timesteps and intermediate_timesteps (diffusers 0.42), when a pipeline has none
SCM_CALL = (1.5708, 1.3)
# the FlowMatchEulerDiscreteScheduler keys that set its grid, copied from a teacher's own FlowMatch config
FLOW_GRID_KEYS = (
    "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
    "time_shift_type",
)  # fmt: skip


@dataclass(frozen=True)
class StockSampler:
    """One stock scheduler (class name and config) and how the pipeline's loop calls its ``set_timesteps``."""

    pipeline: str
    scheduler: str
    config: dict[str, Any] = field(hash=False)
    gamma: float
    loop: str = "steps"  # "steps": set_timesteps(n); "uniform_sigmas": FluxPipeline's; "scm": SanaSprintPipeline's
    mu: float | None = None  # the dynamic shift the loop passes (FLUX.1-dev at the training size)
    scm_call: tuple[float, float] = SCM_CALL  # SanaSprintPipeline's max_timesteps, intermediate_timesteps

    def build(self) -> Any:
        import diffusers

        return getattr(diffusers, self.scheduler)(**self.config)

    def set_timesteps(self, scheduler: Any, steps: int) -> None:
        """``scheduler.set_timesteps`` as the pipeline's loop calls it for ``steps`` steps."""
        if self.loop == "uniform_sigmas":
            sigmas = np.linspace(1.0, 1.0 / steps, steps)
            scheduler.set_timesteps(sigmas=sigmas, mu=self.mu)
        elif self.loop == "scm":
            top, mid = self.scm_call
            scheduler.set_timesteps(steps, max_timesteps=top, intermediate_timesteps=mid if steps == 2 else None)
        elif self.mu is not None:
            scheduler.set_timesteps(steps, mu=self.mu)
        else:
            scheduler.set_timesteps(steps)

    def times(self, steps: int) -> tuple[float, ...]:
        """The ``steps`` times, in the teacher's own units, at which the loop evaluates the model."""
        scheduler = self.build()
        self.set_timesteps(scheduler, steps)
        if self.scheduler == "FlowMatchEulerDiscreteScheduler":
            values = scheduler.sigmas[:steps]  # flow time is sigma
        else:
            values = scheduler.timesteps[:steps]  # DDPM timesteps; SCM angles (its trailing 0 is dropped)
        return tuple(float(v) for v in values)


@dataclass(frozen=True)
class StockPlans:
    """The stock samplers of one teacher: what a student of it can be exported with, per re-noise gamma."""

    pipeline: str
    native: NoiseSchedule
    prediction: str
    teacher_scheduler: dict[str, Any] = field(hash=False)
    scm_call: tuple[float, float] = SCM_CALL  # SanaSprintPipeline's __call__ defaults

    @classmethod
    def of(cls, pipe: Any, native: NoiseSchedule, prediction: str) -> StockPlans:
        from ..training.families import call_default

        top, mid = call_default(pipe, "max_timesteps"), call_default(pipe, "intermediate_timesteps")
        scm_call = (float(top), float(mid)) if top is not None and mid is not None else SCM_CALL
        return cls(type(pipe).__name__, native, prediction, dict(pipe.scheduler.config), scm_call)

    def sampler(self, gamma: float, rule: str = "ratio") -> StockSampler | None:
        """The stock scheduler that re-noises with ``gamma`` under ``rule`` on this teacher, or None where there is
        none."""
        s, pred = self.native, self.prediction
        if rule == "tcd":
            if not (isinstance(s, VP) and pred in ("epsilon", "v_prediction", "sample")):
                return None
            return StockSampler(self.pipeline, "TCDScheduler", self._betas(s), gamma)
        if self.pipeline == "SanaSprintPipeline":
            if not (isinstance(s, TrigFlow) and pred == "trigflow" and gamma == 1.0):
                return None
            config = {"sigma_data": s.sigma_data, "prediction_type": "trigflow"}
            return StockSampler(self.pipeline, "SCMScheduler", config, gamma, "scm", scm_call=self.scm_call)
        if isinstance(s, Flow) and pred == "flow" and gamma in (0.0, 1.0):
            return self._flow(s, gamma)
        if isinstance(s, VP) and pred in ("epsilon", "v_prediction", "sample") and gamma in (0.0, 1.0):
            return self._vp(s, gamma)
        return None

    def _flow(self, s: Flow, gamma: float) -> StockSampler:
        config: dict[str, Any] = {"num_train_timesteps": s.num_train_timesteps, "shift": s.shift}
        mu = None
        own = self.teacher_scheduler
        if own.get("_class_name") == "FlowMatchEulerDiscreteScheduler" and own.get("use_dynamic_shifting"):
            config.update({k: own[k] for k in FLOW_GRID_KEYS if k in own})
            # the native schedule holds the shift at the training size (families.dynamic_shift_schedule)
            mu = math.log(s.shift) if own.get("time_shift_type", "exponential") == "exponential" else s.shift
        config["stochastic_sampling"] = gamma == 1.0
        loop = "uniform_sigmas" if self.pipeline in UNIFORM_SIGMAS else "steps"
        return StockSampler(self.pipeline, "FlowMatchEulerDiscreteScheduler", config, gamma, loop, mu)

    def _betas(self, s: VP) -> dict[str, Any]:
        """The config keys that give a stock VP scheduler this schedule's alphas_cumprod, and the prediction type."""
        # steps_offset 1: StableDiffusionPipeline rewrites any other value (trailing DDIM, LCM and TCD don't read it)
        betas = dict(diffusers_schedule_config(s), prediction_type=self.prediction, steps_offset=1)
        if "snr_shift_scale" in betas:  # only CogVideoX's schedulers shift the SNR: fold the shift into the betas
            del betas["snr_shift_scale"]
            betas.update(trained_betas=shifted_betas(s), beta_schedule="linear")
        return betas

    def _vp(self, s: VP, gamma: float) -> StockSampler:
        betas = self._betas(s)
        if gamma == 1.0:
            return StockSampler(self.pipeline, "LCMScheduler", betas, gamma)
        ddim = dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        return StockSampler(self.pipeline, "DDIMScheduler", {**betas, **ddim}, gamma)


def shifted_betas(schedule: VP) -> list[float]:
    """Betas whose cumulative product is ``schedule``'s table before any zero-SNR rescale (which the stock scheduler
    applies itself): beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}."""
    unscaled = dataclasses.replace(schedule, rescale_betas_zero_snr=False)
    abar = unscaled.alphas_cumprod
    prev = np.concatenate([[1.0], abar[:-1].numpy()])
    return [float(b) for b in 1.0 - abar.numpy() / prev]


PLAN_TIMES = ("stock", "recipe")


def stock_sampler(teacher: Any, gamma: float, plan_times: str, renoise: str = "ratio") -> StockSampler | None:
    """The stock sampler a recipe's plans follow: the teacher pipeline's for ``gamma`` under the re-noise rule
    ``renoise`` when ``plan_times`` is "stock" and the teacher has one; None means the recipe's own plan."""
    if plan_times not in PLAN_TIMES:
        raise FewstepError(f"plan_times must be one of {', '.join(PLAN_TIMES)}, got {plan_times!r}")
    stock = getattr(teacher, "stock", None)
    return stock.sampler(gamma, renoise) if plan_times == "stock" and stock is not None else None


def plans_for(
    teacher: Any,
    steps: Sequence[int],
    gamma: float,
    plan_times: str,
    rule: Callable[[int], Sequence[float]],
    renoise: str = "ratio",
) -> dict[int, SamplingPlan]:
    """Each n-step plan on ``teacher.native``: the times its pipeline's stock scheduler visits (``plan_times`` =
    "stock", where the teacher has a stock sampler for ``gamma`` under the re-noise rule ``renoise``), else the
    recipe's own ``rule(n)``. ``renoise`` = "tcd" applies on VP teachers only; elsewhere the plans keep "ratio"."""
    native = teacher.native
    renoise = renoise if isinstance(native, VP) else "ratio"
    sampler = stock_sampler(teacher, gamma, plan_times, renoise)
    times = sampler.times if sampler is not None else rule
    return {n: SamplingPlan(native, tuple(float(t) for t in times(n)), gamma, renoise) for n in steps}
