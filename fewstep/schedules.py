"""Noise schedules, prediction types and the change of variables between schedules.

Every schedule writes the forward process as x_t = alpha(t) x0 + sigma(t) eps with eps ~ N(0, I) and time growing
with noise, in the schedule's own units:

- ``VP``: diffusers' discrete DDPM betas, t is the (float) diffusers timestep in [0, N-1].
- ``Flow``: rectified flow / flow matching, x_t = (1 - t) x0 + t eps, t in [0, 1] (t is diffusers' sigma).
- ``EDM``: x_t = x0 + t eps, t = sigma in [sigma_min, sigma_max] (Karras et al., 2022).
- ``TrigFlow``: x_t = cos(t) x0 + sin(t) sigma_d eps, t in [0, pi/2] (Lu & Song, 2024, Eq. 1).

Two points on different schedules with the same signal-to-noise ratio differ only by a scale, which is what lets a VP
or flow teacher be used in TrigFlow time without retraining (SANA-Sprint, Sec. 3.1; rCM's denoiser scaling).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

Prediction = Literal["epsilon", "v_prediction", "flow", "sample", "trigflow"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "v_prediction", "flow", "sample", "trigflow")


class Coeffs(NamedTuple):
    """alpha(t), sigma(t) and their time derivatives, each shaped like t (broadcast them before use)."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dimensions in all, for broadcasting against x of that rank."""
    t = torch.as_tensor(t)
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


class NoiseSchedule(ABC):
    """x_t = alpha(t) x0 + sigma(t) eps; subclasses give coeffs(t) and the inverse of the noise-to-signal ratio."""

    kind: str = ""
    t_min: float = 0.0
    t_max: float = 1.0

    @abstractmethod
    def coeffs(self, t: Tensor) -> Coeffs: ...

    @abstractmethod
    def time_at_ratio(self, r: Tensor) -> Tensor:
        """The time t with sigma(t) / alpha(t) = r (differentiable in r)."""

    def ratio(self, t: Tensor) -> Tensor:
        """sigma(t) / alpha(t): the inverse square root of the SNR."""
        c = self.coeffs(t)
        return c.sigma / c.alpha

    def prior_std(self, t: Tensor) -> Tensor:
        """Standard deviation of x_t for unit-variance data, sqrt(alpha^2 + sigma^2): the scale of the pure-noise
        start (1 for VP and flow at t = 1, about sigma_d for TrigFlow at pi/2, as diffusers' init_noise_sigma)."""
        c = self.coeffs(t)
        return (c.alpha**2 + c.sigma**2).sqrt()

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        c = self.coeffs(append_dims(t, x0.ndim))
        return c.alpha * x0 + c.sigma * eps

    def to_model_timestep(self, t: Tensor) -> Tensor:
        """Schedule time -> the timestep diffusers passes to models trained on this schedule (float, kept dense)."""
        return t

    def from_model_timestep(self, timestep: Tensor) -> Tensor:
        return timestep

    def config(self) -> dict[str, Any]:
        """JSON-able description; ``schedule_from_config`` inverts it."""
        out: dict[str, Any] = {"kind": self.kind}
        for name in getattr(self, "__dataclass_fields__", {}):
            if not name.startswith("_"):
                out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class Flow(NoiseSchedule):
    """Rectified flow: x_t = (1 - t) x0 + t eps, velocity eps - x0 (diffusers FlowMatchEulerDiscreteScheduler).

    ``shift`` warps the sampling grid only (SD3, Eq. 23: t' = shift t / (1 + (shift - 1) t)), not the process.
    """

    shift: float = 1.0
    num_train_timesteps: int = 1000
    kind = "flow"

    def coeffs(self, t: Tensor) -> Coeffs:
        t = torch.as_tensor(t)
        return Coeffs(alpha=1 - t, sigma=t, d_alpha=-torch.ones_like(t), d_sigma=torch.ones_like(t))

    def time_at_ratio(self, r: Tensor) -> Tensor:
        return r / (1 + r)

    def shift_time(self, u: Tensor) -> Tensor:
        return self.shift * u / (1 + (self.shift - 1) * u)

    def to_model_timestep(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps

    def from_model_timestep(self, timestep: Tensor) -> Tensor:
        return timestep / self.num_train_timesteps


@dataclass(frozen=True)
class EDM(NoiseSchedule):
    """Variance exploding in sigma units: x_t = x0 + t eps (Karras et al., 2022, Table 1)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    kind = "edm"

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.sigma_min

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return self.sigma_max

    def coeffs(self, t: Tensor) -> Coeffs:
        t = torch.as_tensor(t)
        return Coeffs(alpha=torch.ones_like(t), sigma=t, d_alpha=torch.zeros_like(t), d_sigma=torch.ones_like(t))

    def time_at_ratio(self, r: Tensor) -> Tensor:
        return r

    def to_model_timestep(self, t: Tensor) -> Tensor:
        return t.log() / 4  # c_noise, Table 1

    def from_model_timestep(self, timestep: Tensor) -> Tensor:
        return (4 * timestep).exp()


@dataclass(frozen=True)
class TrigFlow(NoiseSchedule):
    """TrigFlow (Lu & Song, 2024, Eq. 1): x_t = cos(t) x0 + sin(t) sigma_d eps, t in [0, pi/2]."""

    sigma_data: float = 0.5
    kind = "trigflow"

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return math.pi / 2

    def coeffs(self, t: Tensor) -> Coeffs:
        t = torch.as_tensor(t)
        s, c = t.sin(), t.cos()
        return Coeffs(alpha=c, sigma=self.sigma_data * s, d_alpha=-s, d_sigma=self.sigma_data * c)

    def time_at_ratio(self, r: Tensor) -> Tensor:
        return torch.atan(r / self.sigma_data)


def ddpm_betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> Tensor:
    """The beta sequences of diffusers' DDPMScheduler, computed in float64."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal (2021), Eq. 17, betas clipped at 0.999

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    raise ValueError(f"unsupported beta_schedule {beta_schedule!r} (linear, scaled_linear, squaredcos_cap_v2)")


@dataclass(frozen=True)
class VP(NoiseSchedule):
    """Variance preserving with diffusers' discrete betas: alpha^2 = prod(1 - beta), sigma^2 = 1 - alpha^2.

    Time is the diffusers timestep as a float in [0, N-1]. Between integer timesteps log(alpha_bar) is a cubic
    Hermite interpolant (C1, exact at every integer), so alpha, sigma and their derivatives exist at any float t and
    d/dt flows through a model's timestep embedding.
    """

    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    _log_abar: Tensor = field(init=False, repr=False, compare=False)
    _slope: Tensor = field(init=False, repr=False, compare=False)
    kind = "vp"

    def __post_init__(self) -> None:
        betas = ddpm_betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps)
        log_abar = torch.cumsum(torch.log1p(-betas), 0)
        slope = torch.empty_like(log_abar)  # finite-difference tangents of the Hermite interpolant
        slope[1:-1] = (log_abar[2:] - log_abar[:-2]) / 2
        slope[0], slope[-1] = log_abar[1] - log_abar[0], log_abar[-1] - log_abar[-2]
        object.__setattr__(self, "_log_abar", log_abar)
        object.__setattr__(self, "_slope", slope)

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return float(self.num_train_timesteps - 1)

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._log_abar.exp()

    def log_alpha_bar(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """log alpha_bar(t) and its derivative, by cubic Hermite interpolation between integer timesteps."""
        t = torch.as_tensor(t)
        if not t.is_floating_point():  # diffusers' integer timesteps: never truncate the float table
            t = t.to(self._log_abar.dtype)
        table, slope = self._log_abar.to(t.device), self._slope.to(t.device)
        i = t.detach().double().floor().clamp(0, self.num_train_timesteps - 2).long()  # bf16 rounds 998 to 1000
        u = t - i.to(t.dtype)
        y0, y1 = table[i].to(t.dtype), table[i + 1].to(t.dtype)
        m0, m1 = slope[i].to(t.dtype), slope[i + 1].to(t.dtype)
        u2, u3 = u * u, u * u * u
        value = (2 * u3 - 3 * u2 + 1) * y0 + (u3 - 2 * u2 + u) * m0 + (-2 * u3 + 3 * u2) * y1 + (u3 - u2) * m1
        deriv = (6 * u2 - 6 * u) * y0 + (3 * u2 - 4 * u + 1) * m0 + (-6 * u2 + 6 * u) * y1 + (3 * u2 - 2 * u) * m1
        return value, deriv

    def coeffs(self, t: Tensor) -> Coeffs:
        log_abar, d_log_abar = self.log_alpha_bar(t)
        alpha = (log_abar / 2).exp()
        sigma = (-torch.expm1(log_abar)).sqrt()
        d_alpha = alpha * d_log_abar / 2
        d_sigma = -(alpha**2) * d_log_abar / (2 * sigma)
        return Coeffs(alpha=alpha, sigma=sigma, d_alpha=d_alpha, d_sigma=d_sigma)

    def time_at_ratio(self, r: Tensor) -> Tensor:
        """Invert sigma/alpha = r: bisection for the value, then one Newton step that carries the derivative.

        The Newton step is a no-op on the value (up to bisection accuracy) but makes dt/dr = 1 / (d ratio / dt)
        visible to autograd and forward-mode AD, as the implicit function theorem requires.
        """
        r = torch.as_tensor(r)
        with torch.no_grad():
            lo = torch.zeros_like(r, dtype=torch.float64)
            hi = torch.full_like(lo, self.t_max)
            target = r.detach().double()
            for _ in range(60):
                mid = (lo + hi) / 2
                up = self.ratio(mid) < target
                lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
            t0 = ((lo + hi) / 2).to(r.dtype)
        c = self.coeffs(t0)
        d_ratio = (c.d_sigma * c.alpha - c.sigma * c.d_alpha) / c.alpha**2
        return t0 - (self.ratio(t0) - r) / d_ratio.detach()


SCHEDULES: dict[str, type[NoiseSchedule]] = {"vp": VP, "flow": Flow, "edm": EDM, "trigflow": TrigFlow}


def schedule_from_config(config: dict[str, Any]) -> NoiseSchedule:
    """Inverse of ``NoiseSchedule.config()``."""
    config = dict(config)
    kind = config.pop("kind")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[kind](**config)  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------------------------------------
# Prediction types (diffusers' prediction_type names, plus "flow" velocity and TrigFlow's F)


def to_x0(out: Tensor, x_t: Tensor, c: Coeffs, prediction: str) -> Tensor:
    """Model output -> data estimate x0 (coefficients already broadcast to x_t)."""
    if prediction == "epsilon":
        return (x_t - c.sigma * out) / c.alpha
    if prediction in ("v_prediction", "trigflow"):  # VP v = alpha eps - sigma x0; TrigFlow F = cos eps - sin x0/sd
        return c.alpha * x_t - c.sigma * out
    if prediction == "flow":  # out = dx_t/dt = d_alpha x0 + d_sigma eps
        return (c.sigma * out - c.d_sigma * x_t) / (c.sigma * c.d_alpha - c.alpha * c.d_sigma)
    if prediction == "sample":
        return out
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")


def from_x0(x0: Tensor, x_t: Tensor, c: Coeffs, prediction: str) -> Tensor:
    """Data estimate x0 -> the model output of the given prediction type (inverse of ``to_x0``)."""
    if prediction == "epsilon":
        return (x_t - c.alpha * x0) / c.sigma
    if prediction in ("v_prediction", "trigflow"):
        return (c.alpha * x_t - x0) / c.sigma
    if prediction == "flow":
        return velocity(x0, x_t, c)
    if prediction == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")


def velocity(x0: Tensor, x_t: Tensor, c: Coeffs) -> Tensor:
    """Probability-flow ODE drift dx_t/dt = d_alpha x0 + d_sigma eps_hat, with eps_hat implied by (x0, x_t)."""
    eps = (x_t - c.alpha * x0) / c.sigma
    return c.d_alpha * x0 + c.d_sigma * eps


def ddim_step(x0: Tensor, x_t: Tensor, c_t: Coeffs, c_s: Coeffs) -> Tensor:
    """Move x_t to time s along the straight line through (x0, eps_hat): x_s = alpha_s x0 + sigma_s eps_hat."""
    eps = (x_t - c_t.alpha * x0) / c_t.sigma
    return c_s.alpha * x0 + c_s.sigma * eps


def transition(c_s: Coeffs, c_t: Coeffs) -> tuple[Tensor, Tensor]:
    """(a, b^2) of x_t | x_s for t > s on the same schedule: x_t = a x_s + b z with a = alpha_t/alpha_s and
    b^2 = sigma_t^2 - a^2 sigma_s^2, which keeps the marginal of x_t (the subinterval forward of Phased DMD)."""
    a = c_t.alpha / c_s.alpha
    return a, (c_t.sigma**2 - (a * c_s.sigma) ** 2).clamp_min(0)


def forward_transition(x_s: Tensor, c_s: Coeffs, c_t: Coeffs, noise: Tensor) -> Tensor:
    """Sample x_t | x_s for t > s: x_t = a x_s + b z (``transition``)."""
    a, b2 = transition(c_s, c_t)
    return a * x_s + b2.sqrt() * noise


# ---------------------------------------------------------------------------------------------------------------
# Change of variables between schedules


class Reparam(NamedTuple):
    """x_src = scale * x_dst at src-time ``t_src`` has the same x0 posterior as x_dst at dst-time t."""

    t_src: Tensor
    scale: Tensor


def change_of_variables(t: Tensor, dst: NoiseSchedule, src: NoiseSchedule) -> Reparam:
    """Map dst-time t to the src-time with the same noise-to-signal ratio and the input scale alpha_src/alpha_dst.

    A denoiser trained on ``src`` answers for ``dst`` as x0(x_t, t) = D_src(scale * x_t, t_src); e.g. a flow teacher
    in TrigFlow time (sigma_d = 1) has t_src = sin t / (sin t + cos t) and scale = 1 / (sin t + cos t). Both outputs
    are differentiable in t, so dF/dt of a converted teacher or student includes the time change.

    Computed in float64: at TrigFlow's t = pi/2 float32 gives cos t < 0. Since (alpha, sigma) of both schedules are
    parallel at equal SNR, scale = alpha_src / alpha_dst = prior_std_src / prior_std_dst, which stays finite where
    alpha vanishes. t is clamped to dst's domain and t_src to src's (a discrete VP cannot reach pure noise).
    """
    t64 = torch.as_tensor(t).double().clamp(dst.t_min, dst.t_max)
    t_src = src.time_at_ratio(dst.ratio(t64)).clamp(src.t_min, src.t_max)
    scale = src.prior_std(t_src) / dst.prior_std(t64)
    dtype = torch.as_tensor(t).dtype if torch.as_tensor(t).is_floating_point() else torch.float64
    return Reparam(t_src=t_src.to(dtype), scale=scale.to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Reading a pipeline's scheduler config


def schedule_from_diffusers_config(config: Any) -> tuple[NoiseSchedule, str]:
    """The noise schedule and prediction type of a diffusers scheduler (or its config, with or without _class_name).

    Flow-matching schedulers (FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, DPM-Solver / UniPC with
    ``use_flow_sigmas``) give ``Flow``; SCMScheduler gives ``TrigFlow``; FewStepScheduler carries its schedule; any
    scheduler with DDPM betas (DDPM, DDIM, PNDM, Euler, DPM-Solver, LCM, TCD, ...) gives ``VP``.
    """
    if hasattr(config, "config"):  # a scheduler object: its in-memory config has no _class_name
        config = {"_class_name": type(config).__name__, **dict(config.config)}
    config = dict(config)
    name = str(config.get("_class_name", ""))
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    if isinstance(config.get("schedule"), dict):  # FewStepScheduler
        return schedule_from_config(config["schedule"]), str(config.get("prediction_type", "flow"))
    if name.startswith("FlowMatch") or ("shift" in config and "beta_schedule" not in config):
        shift = float(config.get("shift", 1.0) or 1.0)
        return Flow(shift=shift, num_train_timesteps=num_train_timesteps), "flow"
    if config.get("use_flow_sigmas"):  # DPM-Solver / UniPC run on flow sigmas (Sana, Wan)
        shift = float(config.get("flow_shift", 1.0) or 1.0)
        return Flow(shift=shift, num_train_timesteps=num_train_timesteps), "flow"
    if name == "SCMScheduler" or config.get("prediction_type") == "trigflow":
        return TrigFlow(sigma_data=float(config.get("sigma_data", 0.5))), "trigflow"
    if "beta_schedule" in config:
        if config.get("trained_betas") is not None:
            raise ValueError(f"{name}: explicit trained_betas are not supported")
        if config.get("rescale_betas_zero_snr"):
            raise ValueError(f"{name}: rescale_betas_zero_snr (alpha = 0 at the last step) is not supported")
        schedule = VP(
            beta_schedule=str(config["beta_schedule"]),
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            num_train_timesteps=num_train_timesteps,
        )
        prediction = str(config.get("prediction_type", "epsilon"))
        if prediction not in PREDICTIONS:
            raise ValueError(f"{name}: unsupported prediction_type {prediction!r}")
        return schedule, prediction
    raise ValueError(
        f"unsupported scheduler {name or '(unnamed)'}: fewstep reads VP (DDPM betas), flow-matching and TrigFlow "
        "schedulers"
    )
