"""A diffusers scheduler for consistency-style multistep sampling: predict x0, re-noise to the next time.

At each evaluation time t_i the model output becomes a data estimate x0 (``to_x0``); the sample then moves to the
next time t_{i+1} with a mix of the implied noise eps_hat = (x_t - alpha_i x0) / sigma_i and fresh noise z:

    x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} ((1 - gamma) eps_hat + sqrt(1 - (1 - gamma)^2) z)

gamma = 0 is DDIM (Song et al., 2021, Eq. 12 with eta = 0); gamma = 1 is consistency-model multistep sampling (Song
et al., 2023, Alg. 1), x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} z. In between it is TCD's strategic stochastic sampling
(Zheng et al., 2024, Sec. 4.3): DDIM to an intermediate time s, then the forward process from s to t_{i+1} with fresh
noise. Here s is the time whose noise-to-signal ratio is sigma_s / alpha_s = (1 - gamma) sigma_{i+1} / alpha_{i+1},
so gamma means the same thing on every schedule (TCD instead takes s = (1 - gamma) t_{i+1} in DDPM timesteps) and
gamma = 1 lands exactly on x0 even where sigma(t_min) > 0 (VP). After the last time the step returns x0 itself.
With ``rule = "tcd"`` (VP only) s is TCD's own and the last step ends as TCDScheduler's does, on x0 carried by DDIM to
timestep 0 (``sampling.SamplingPlan``), so that the two schedulers sample alike with TCD's ``eta`` = gamma.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from fewstep.sampling import RULES, euler_times, renoise, tcd_intermediate
from fewstep.schedules import (
    PREDICTIONS,
    Coeffs,
    Flow,
    NoiseSchedule,
    append_dims,
    ddim_step,
    diffusers_schedule_config,
    schedule_from_config,
    schedule_from_diffusers_config,
    to_x0,
)


@dataclass
class FewStepSchedulerOutput(BaseOutput):
    """prev_sample: x at the next time (x0 after the last step); pred_original_sample: x0 (after the last step under
    TCD's rule, the final sample, as TCDScheduler's pred_noised_sample). Both shaped like x_t."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class FewStepScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]  # diffusers' config_name clash
    """Multistep sampler for few-step (consistency, TCD, sCM, rCM, DMD) students on any ``NoiseSchedule``.

    Args:
        schedule: a ``NoiseSchedule.config()`` dict (or the schedule itself); default ``Flow()``.
        prediction_type: what the model outputs, one of ``fewstep.schedules.PREDICTIONS``.
        plan: step count (as a string) -> the descending times, in the schedule's own units, at which the model is
            evaluated, e.g. ``{"1": [1.0], "2": [1.0, 0.6]}``. Step counts not in the plan get an even grid.
        gamma: stochasticity in [0, 1] (module docstring): 0 is DDIM, 1 re-noises with fresh noise only.
        gammas: step count (as a string) -> its own gamma, overriding ``gamma`` there (Hyper-SD's card runs its one
            LoRA with TCD's eta chosen per step count).
        rule: how gamma picks the intermediate time, ``sampling.RULES``: "ratio" (module docstring) or "tcd".
        t_min, t_max: ends of the even grid (default the schedule's); t_max also sets ``init_noise_sigma``.

    ``FewStepScheduler.from_config(pipe.scheduler.config)`` also reads a stock diffusers scheduler's config (DDPM
    betas with ``trained_betas``, ``rescale_betas_zero_snr`` and CogVideoX's ``snr_shift_scale``, flow matching, SCM)
    and keeps its schedule and prediction type, as the stock schedulers swap among themselves (``_compatibles``).
    The way back works too: the config also holds the stock keys that give its schedule
    (``diffusers_schedule_config``) and, when it was read from a stock config, that config's own keys, so
    ``DDIMScheduler.from_config(fewstep.config)`` rebuilds the DDIM scheduler it came from.
    """

    # the stock schedulers whose configs schedule_from_diffusers_config reads (all of diffusers' sampling VP, flow
    # and sCM schedulers; inversion, EDM and other special-purpose ones are left out)
    _compatibles = [
        "DDPMScheduler",
        "DDIMScheduler",
        "DDPMParallelScheduler",
        "DDIMParallelScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "DEISMultistepScheduler",
        "UniPCMultistepScheduler",
        "SASolverScheduler",
        "LCMScheduler",
        "TCDScheduler",
        "CogVideoXDDIMScheduler",
        "CogVideoXDPMScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "FlowMatchHeunDiscreteScheduler",
        "FlowMatchLCMScheduler",
        "SCMScheduler",
    ]
    order = 1

    @register_to_config
    def __init__(
        self,
        schedule: dict[str, Any] | NoiseSchedule | None = None,
        prediction_type: str = "flow",
        plan: dict[str, list[float]] | None = None,
        gamma: float = 1.0,
        gammas: dict[str, float] | None = None,
        t_min: float | None = None,
        t_max: float | None = None,
        use_dynamic_shifting: bool = False,
        rule: str = "ratio",
    ) -> None:
        if isinstance(schedule, NoiseSchedule):
            schedule = schedule.config()
        self.schedule = schedule_from_config(schedule if schedule is not None else Flow().config())
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTIONS}")
        if rule not in RULES or (rule == "tcd" and self.schedule.kind != "vp"):
            raise ValueError(f"rule must be one of {RULES} ('tcd' on a VP schedule only), got {rule!r}")
        gammas = {str(int(n)): float(g) for n, g in (gammas or {}).items()}
        for g in (gamma, *gammas.values()):
            if not 0.0 <= g <= 1.0:
                raise ValueError(f"gamma must lie in [0, 1], got {g}")
        plan = {str(int(n)): [float(t) for t in times] for n, times in (plan or {}).items()}
        for n, times in plan.items():
            if len(times) != int(n) or any(a <= b for a, b in pairwise(times)):
                raise ValueError(f"plan[{n!r}] must hold {n} strictly decreasing times, got {times}")
        # Store the canonical JSON-able form so that save_config / from_pretrained round-trips exactly, and the stock
        # keys of the schedule for StockScheduler.from_config(self.config).
        self.register_to_config(
            schedule=self.schedule.config(), plan=plan or None, gammas=gammas or None,
            **diffusers_schedule_config(self.schedule),
        )  # fmt: skip

        self.num_inference_steps: int | None = None
        self.times = torch.empty(0, dtype=torch.float64)  # schedule units, (num_inference_steps,), float64 on CPU
        self.timesteps = torch.empty(0, dtype=torch.float32)  # model units, what pipelines pass to the model
        self.sigmas = torch.empty(0, dtype=torch.float32)  # (num_inference_steps + 1,): ``sigmas_for``
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ---------------------------------------------------------------------------------------------------------------
    # Reading foreign configs

    @classmethod
    def _get_compatibles(cls) -> list[Any]:
        """``_compatibles`` as classes, this one first: diffusers resolves the names in its own namespace only, which
        leaves FewStepScheduler out of its own list (a stock scheduler's list holds itself)."""
        return [cls, *(c for c in super()._get_compatibles() if c is not cls)]

    @classmethod
    def from_config(  # type: ignore[override]
        cls, config: dict[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """Like ``ConfigMixin.from_config``; another scheduler's config is first read with
        ``schedule_from_diffusers_config`` (the rest takes defaults; ``kwargs`` override as usual).

        A config is foreign when it names another class, or (as an unsaved scheduler's config does, which carries no
        ``_class_name``) when it has no ``schedule`` and holds keys FewStepScheduler does not take. Its keys stay in
        the new config as diffusers' hidden config (those it set itself: the ones it left at their defaults are
        dropped, as ``ConfigMixin.extract_init_dict`` drops them), so that the stock scheduler can be rebuilt from it.
        """
        if isinstance(config, dict) and not isinstance(config.get("schedule"), dict):
            name = config.get("_class_name")
            unknown = {k for k in config if not k.startswith("_")} - set(inspect.signature(cls.__init__).parameters)
            if (name is not None and name != cls.__name__) or (name is None and unknown):
                schedule, prediction = schedule_from_diffusers_config(dict(config))
                dynamic = bool(config.get("use_dynamic_shifting")) and config.get("time_shift_type") != "linear"
                defaults = set(config.get("_use_default_values", ()))
                config = {k: v for k, v in config.items() if k not in defaults and k != "_use_default_values"}
                config.update(
                    schedule=schedule.config(),
                    prediction_type=prediction,
                    use_dynamic_shifting=dynamic and isinstance(schedule, Flow),
                )
        out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)  # type: ignore[arg-type]
        # diffusers registers the hidden keys after __init__: where one names the schedule, the schedule's own wins
        scheduler = out[0] if return_unused_kwargs else out
        scheduler.register_to_config(**diffusers_schedule_config(scheduler.schedule))
        return out

    # ---------------------------------------------------------------------------------------------------------------
    # Scheduler contract

    @property
    def t_min(self) -> float:
        return float(self.config["t_min"]) if self.config["t_min"] is not None else float(self.schedule.t_min)

    @property
    def t_max(self) -> float:
        return float(self.config["t_max"]) if self.config["t_max"] is not None else float(self.schedule.t_max)

    def sigmas_for(self, times: Tensor) -> Tensor:
        """The ``sigmas`` a stock scheduler exposes for these times, with a final 0 (the clean end), as pipelines
        read them (WanPipeline keys its cache context on ``scheduler.sigmas[i]``): the flow time itself on a Flow
        schedule (FlowMatchEulerDiscreteScheduler's sigmas), the noise-to-signal ratio sigma_t / alpha_t elsewhere
        (EulerDiscreteScheduler's sqrt((1 - abar) / abar)); inf where alpha is 0 (zero terminal SNR)."""
        c = self.schedule.coeffs(times.to(torch.float64))
        sigma = times.to(torch.float64) if isinstance(self.schedule, Flow) else c.sigma / c.alpha
        return torch.cat([sigma, sigma.new_zeros(1)])

    def gamma_for(self, steps: int | None) -> float:
        """The re-noising gamma of an n-step run: ``gammas[str(n)]`` where given, else ``gamma``."""
        own = (self.config.get("gammas") or {}).get(str(steps))
        return float(self.config["gamma"] if own is None else own)

    @property
    def init_noise_sigma(self) -> float:
        """The scale of the pure-noise sample pipelines start from: ``NoiseSchedule.prior_std(t_max)``."""
        return float(self.schedule.prior_std(torch.tensor(self.t_max, dtype=torch.float64)))

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def __len__(self) -> int:
        return int(getattr(self.schedule, "num_train_timesteps", 1000))  # 1000 for continuous time, as SCMScheduler

    def scale_model_input(self, sample: Tensor, timestep: float | Tensor | None = None) -> Tensor:
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        timesteps: Sequence[float] | None = None,
        **unused: Any,
    ) -> None:
        """Choose the evaluation times, in this order of precedence:

        1. ``plan[str(n)]``: the student's own plan for n steps wins over what a pipeline passes by default;
        2. ``timesteps`` (model units) or, for ``Flow``, ``sigmas`` (flow times), as FluxPipeline and other flow
           pipelines pass them;
        3. n times evenly spaced in (t_min, t_max], from t_max down; for ``Flow`` the even grid u in (0, 1] is warped
           by ``shift_time`` first, as FlowMatchEulerDiscreteScheduler does.

        With ``use_dynamic_shifting`` (Flux, SD3.5 configs), times from 2. and 3. are warped by the
        resolution-dependent exponential shift t' = e^mu / (e^mu + 1/t - 1) that FlowMatchEulerDiscreteScheduler
        applies, with the ``mu`` the pipeline passes, instead of the static shift. Other ``unused`` keywords are
        ignored.
        """
        mu = unused.get("mu")
        dynamic = bool(self.config.get("use_dynamic_shifting")) and isinstance(self.schedule, Flow)
        if dynamic and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting is set")
        if num_inference_steps is None:
            given = timesteps if timesteps is not None else sigmas
            if given is None:
                raise ValueError("pass num_inference_steps, timesteps or sigmas")
            num_inference_steps = len(given)
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        plan = self.config["plan"] or {}
        if str(n) in plan:
            times = torch.tensor(plan[str(n)], dtype=torch.float64)
        elif timesteps is not None:
            times = self.schedule.from_model_timestep(torch.as_tensor(timesteps, dtype=torch.float64).cpu())
        elif sigmas is not None:
            if not isinstance(self.schedule, Flow):
                raise ValueError("sigmas= is understood for flow schedules only; pass timesteps= instead")
            times = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        elif dynamic:
            times = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
        else:
            times = torch.tensor(euler_times(self.schedule, n, self.t_min, self.t_max)[:-1], dtype=torch.float64)
        if dynamic and str(n) not in plan:
            shift = math.exp(float(mu or 0.0))  # mu was checked above
            times = shift / (shift + (1 / times - 1))
        if len(times) != n or any(a <= b for a, b in pairwise(times.tolist())):
            raise ValueError(f"need {n} strictly decreasing times, got {times.tolist()}")
        self.num_inference_steps = n
        self.times = times  # stays float64 on CPU: it only feeds the coefficient tables
        self.timesteps = self.schedule.to_model_timestep(times).to(device=device, dtype=torch.float32)
        self.sigmas = self.sigmas_for(times).to(device=device, dtype=torch.float32)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | Tensor) -> int:
        """Position of a model-unit timestep in ``self.timesteps`` (nearest match; plans have distinct times)."""
        value = torch.as_tensor(timestep, dtype=torch.float64).flatten()[0].cpu()
        grid = self.timesteps.detach().cpu().double()
        i = int((grid - value).abs().argmin())
        if not torch.isclose(grid[i], value, rtol=1e-4, atol=1e-5):
            raise ValueError(f"timestep {float(value)} is not one of the scheduler's timesteps {grid.tolist()}")
        return i

    def _coeffs(self, t: Tensor, like: Tensor) -> Coeffs:
        """Coefficients at times t, () or (B,), shaped (B or 1, 1, ..., 1) to broadcast against ``like``."""
        c = self.schedule.coeffs(append_dims(t.detach().to(torch.float64).cpu(), like.ndim))
        return Coeffs(*(v.to(device=like.device, dtype=like.dtype) for v in c))

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> FewStepSchedulerOutput | tuple[Tensor, Tensor]:
        """One evaluation: x0 from the model output at t_i, then x at t_{i+1} (or x0 after the last time).

        Shapes: model_output and sample (B, ...); both outputs are shaped and typed like ``sample``.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if self._step_index is None:
            begin = self._begin_index
            self._step_index = begin if begin is not None else self.index_for_timestep(timestep)
        i = self._step_index
        if i >= len(self.times):
            raise IndexError(f"step() called {i + 1} times for {len(self.times)} inference steps")

        dtype = torch.promote_types(sample.dtype, torch.float32)  # half-precision samples are re-noised in fp32
        x_t = sample.to(dtype)
        c_t = self._coeffs(self.times[i], x_t)
        x0 = to_x0(model_output.to(dtype), x_t, c_t, self.config["prediction_type"])
        if i + 1 < len(self.times):
            prev = self._renoise(x0, x_t, c_t, self.times[i + 1], generator)
        elif self.config.get("rule", "ratio") == "tcd":  # TCDScheduler's last step: x0 carried to timestep 0
            prev = ddim_step(x0, x_t, c_t, self._coeffs(torch.tensor(self.schedule.t_min), x_t))
            # the plan's final sample in both outputs, as TCDScheduler's pred_noised_sample is there (PixArt's
            # one-step loop returns the second)
            x0 = prev
        else:
            prev = x0
        self._step_index = i + 1

        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return FewStepSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _renoise(
        self,
        x0: Tensor,
        x_t: Tensor,
        c_t: Coeffs,
        t_next: Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> Tensor:
        """x at the next time from (x0, x_t) by ``sampling.renoise`` (module docstring)."""
        gamma = self.gamma_for(self.num_inference_steps)
        c_s = None
        if self.config.get("rule", "ratio") == "tcd":
            c_s = self._coeffs(torch.tensor(tcd_intermediate(self.schedule, float(t_next), gamma)), x_t)
        # gamma = 0 draws no noise, so the generator is left untouched
        z = None if gamma == 0.0 else randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return renoise(x0, x_t, c_t, self._coeffs(t_next, x_t), gamma, z, c_s)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t for model-unit timesteps (B,), as pipelines call it for img2img: alpha(t) x0 + sigma(t) eps."""
        t = self.schedule.from_model_timestep(torch.as_tensor(timesteps, dtype=torch.float64).cpu())
        c = self._coeffs(t, original_samples)
        return c.alpha * original_samples + c.sigma * noise
