"""Noise schedules, prediction types and the change of variables between schedules.

Every schedule writes the forward process as x_t = alpha(t) x0 + sigma(t) eps with eps ~ N(0, I) and time growing
with noise, in the schedule's own units:

- ``VP``: diffusers' discrete DDPM tables (scheduled or explicit betas, CogVideoX's SNR shift, zero terminal SNR),
  t is the (float) diffusers timestep in [0, N-1].
- ``Flow``: rectified flow / flow matching, x_t = (1 - t) x0 + t eps, t in [0, 1] (t is diffusers' sigma).
- ``EDM``: x_t = x0 + t eps, t = sigma in [sigma_min, sigma_max] (Karras et al., 2022).
- ``TrigFlow``: x_t = cos(t) x0 + sin(t) sigma_d eps, t in [0, pi/2] (Lu & Song, 2024, Eq. 1).

Two points on different schedules with the same signal-to-noise ratio differ only by a scale, which is what lets a VP
or flow teacher be used in TrigFlow time without retraining (SANA-Sprint, Sec. 3.1; rCM's denoiser scaling).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
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
        r = torch.as_tensor(r)
        pure_noise = r.isinf()  # r / (1 + r) is inf / inf there; the safe r keeps NaN out of the gradient too
        r_safe = torch.where(pure_noise, torch.zeros_like(r), r)
        return torch.where(pure_noise, torch.ones_like(r), r_safe / (1 + r_safe))

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


def _cosine_alpha_bar(u: float) -> float:  # Nichol & Dhariwal (2021), Eq. 17
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(u: float) -> float:  # diffusers' "laplace" (it returns sqrt(SNR / (1 + SNR)), kept as is)
    lmb = -0.5 * math.copysign(1, 0.5 - u) * math.log(1 - 2 * math.fabs(0.5 - u) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def _exp_alpha_bar(u: float) -> float:
    return math.exp(u * -12.0)


# diffusers' betas_for_alpha_bar: alpha_bar(u) on u in [0, 1] discretised to N betas, each clipped at 0.999
ALPHA_BAR: dict[str, Callable[[float], float]] = {
    "squaredcos_cap_v2": _cosine_alpha_bar,
    "laplace": _laplace_alpha_bar,
    "exp": _exp_alpha_bar,  # HeunDiscreteScheduler only
}
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "sigmoid", *ALPHA_BAR)


def ddpm_betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> Tensor:
    """The beta sequences of diffusers' VP schedulers (DDPMScheduler's, and HeunDiscreteScheduler's "exp"), computed
    in float64."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if beta_schedule == "sigmoid":  # GeoDiff (Xu et al., 2022)
        return torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    if beta_schedule in ALPHA_BAR:
        abar = ALPHA_BAR[beta_schedule]
        return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    raise ValueError(f"unsupported beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")


@dataclass(frozen=True)
class VP(NoiseSchedule):
    """Variance preserving with diffusers' discrete betas: alpha^2 = alpha_bar = prod(1 - beta), sigma^2 = 1 - alpha^2.

    Time is the diffusers timestep as a float in [0, N-1]. The table at the integers is diffusers' ``alphas_cumprod``,
    built in the order its schedulers build it:

    1. betas: ``trained_betas`` if given, else ``ddpm_betas(beta_schedule, beta_start, beta_end, N)``;
    2. ``snr_shift_scale`` s (CogVideoX's schedulers, "SNR shift following SD3"; 1 elsewhere):
       alpha_bar <- alpha_bar / (s + (1 - s) alpha_bar), which divides the SNR alpha_bar / (1 - alpha_bar) by s;
    3. ``rescale_betas_zero_snr`` (Lin et al., 2024, Alg. 1): alpha <- (alpha - alpha_T) alpha_0 / (alpha_0 - alpha_T),
       so that alpha(t_max) = 0 and sigma(t_max) = 1: pure noise, as Flow at t = 1 and TrigFlow at pi/2.

    Between integer timesteps log(alpha_bar) of steps 1-2 is a cubic Hermite interpolant (C1, exact at every integer),
    so alpha, sigma and their derivatives exist at any float t and d/dt flows through a model's timestep embedding.
    Step 3 is affine in alpha, so it is applied to the interpolated alpha(t): still C1 and exact at the integers, with
    d_alpha(t_max) < 0 finite and d_sigma(t_max) = 0. At t_max the ratio sigma/alpha is +inf (log-SNR -inf),
    ``time_at_ratio(inf)`` is t_max, and only an x0 that does not divide by alpha can be read off a model output there:
    v_prediction gives x0 = alpha x_t - sigma v = -v, epsilon gives x_t / 0 (Lin et al., Sec. 3.2: zero terminal SNR
    needs v_prediction). diffusers' DDPM/DDIM/LCM/TCD tables hold the exact 0; Euler, DPM-Solver and UniPC overwrite
    ``alphas_cumprod[-1]`` with 2**-24 so that their sigma = sqrt((1 - alpha_bar) / alpha_bar) stays finite, a sampler
    detail of theirs that is not the process the model was trained on.
    """

    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    trained_betas: tuple[float, ...] | None = field(default=None, repr=False)
    rescale_betas_zero_snr: bool = False
    snr_shift_scale: float = 1.0
    _log_abar: Tensor = field(init=False, repr=False, compare=False)
    _slope: Tensor = field(init=False, repr=False, compare=False)
    kind = "vp"

    def __post_init__(self) -> None:
        if self.trained_betas is not None:  # a list or array from a config; a tuple keeps the dataclass hashable
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            betas = torch.tensor(self.trained_betas, dtype=torch.float64)
            if len(betas) != self.num_train_timesteps:
                raise ValueError(f"{len(betas)} trained_betas for num_train_timesteps={self.num_train_timesteps}")
        else:
            betas = ddpm_betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps)
        if not ((betas >= 0) & (betas < 1)).all():
            raise ValueError("betas must lie in [0, 1); for alpha_bar = 0 at the last step use rescale_betas_zero_snr")
        if not self.snr_shift_scale > 0:
            raise ValueError(f"snr_shift_scale must be positive, got {self.snr_shift_scale}")
        log_abar = torch.cumsum(torch.log1p(-betas), 0)
        if self.snr_shift_scale != 1.0:  # step 2: alpha_bar / (s + (1 - s) alpha_bar)
            s = self.snr_shift_scale
            log_abar = log_abar - torch.log(s + (1 - s) * log_abar.exp())
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
        """diffusers' table: alpha_bar at the integer timesteps 0 .. N-1, float64."""
        if not self.rescale_betas_zero_snr:
            return self._log_abar.exp()
        alpha = (self._log_abar / 2).exp()
        a_0, a_T = alpha[0], alpha[-1]
        return ((alpha - a_T) * (a_0 / (a_0 - a_T))) ** 2  # step 3, as diffusers writes it

    def config(self) -> dict[str, Any]:
        """The parameters (not the table); the keys of steps 1-3 appear only where they differ from their defaults, so
        configs written before they existed read back unchanged."""
        out = super().config()
        if self.trained_betas is None:
            del out["trained_betas"]
        else:
            out["trained_betas"] = list(self.trained_betas)
        if not self.rescale_betas_zero_snr:
            del out["rescale_betas_zero_snr"]
        if self.snr_shift_scale == 1.0:
            del out["snr_shift_scale"]
        return out

    def log_alpha_bar(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """log alpha_bar(t) of steps 1-2 (before any zero-SNR rescale) and its derivative, by cubic Hermite
        interpolation between integer timesteps."""
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
        d_alpha = alpha * d_log_abar / 2
        if self.rescale_betas_zero_snr:
            return self._zero_terminal_snr(alpha, d_alpha, -torch.expm1(log_abar))
        sigma = (-torch.expm1(log_abar)).sqrt()
        d_sigma = -(alpha**2) * d_log_abar / (2 * sigma)
        return Coeffs(alpha=alpha, sigma=sigma, d_alpha=d_alpha, d_sigma=d_sigma)

    def _zero_terminal_snr(self, alpha: Tensor, d_alpha: Tensor, sigma2: Tensor) -> Coeffs:
        """Step 3 on the interpolant (Lin et al., 2024, Alg. 1), from alpha(t), its derivative and sigma(t)^2 of steps
        1-2. alpha_0 and alpha_T come from the table in alpha's dtype by the same operations as alpha(t), so alpha at
        t_max is exactly 0 in every dtype."""
        a_0, a_T = (self._log_abar[[0, -1]].to(device=alpha.device, dtype=alpha.dtype) / 2).exp()
        k = a_0 / (a_0 - a_T)
        rescaled = k * (alpha - a_T)
        # 1 - rescaled^2 = sigma^2 + (alpha - rescaled)(alpha + rescaled) with alpha - rescaled = a_T (a_0 - alpha) /
        # (a_0 - a_T): no cancellation near t = 0, where 1 - rescaled^2 loses the digits expm1 keeps (all, in bf16)
        sigma = (sigma2 + a_T * (a_0 - alpha) / (a_0 - a_T) * (alpha + rescaled)).sqrt()
        d_alpha = k * d_alpha
        return Coeffs(alpha=rescaled, sigma=sigma, d_alpha=d_alpha, d_sigma=-rescaled * d_alpha / sigma)

    def time_at_ratio(self, r: Tensor) -> Tensor:
        """Invert sigma/alpha = r: bisection for the value, then one Newton step that carries the derivative.

        The Newton step is a no-op on the value (up to bisection accuracy) but makes dt/dr = 1 / (d ratio / dt)
        visible to autograd and forward-mode AD, as the implicit function theorem requires. r = inf gives t_max, where
        a zero-terminal-SNR schedule's ratio is infinite; there, and wherever alpha(t0) rounds to 0, the step is
        skipped (dt/dr = 0).
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
            t0 = torch.where(target.isinf(), self.t_max, (lo + hi) / 2).to(r.dtype)
        c = self.coeffs(t0)
        d_ratio = (c.d_sigma * c.alpha - c.sigma * c.d_alpha) / c.alpha**2
        newton = (self.ratio(t0) - r) / d_ratio.detach()
        return t0 - torch.where(newton.isfinite(), newton, torch.zeros_like(newton))


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
    alpha vanishes. t is clamped to dst's domain and t_src to src's: a VP without zero terminal SNR cannot reach pure
    noise, so TrigFlow's pi/2 and Flow's 1 map to its t_max; one with zero terminal SNR reaches it at t_max (ratio
    inf), which maps to pi/2 and 1 exactly. The values stay finite at the ends of both domains; the derivatives there
    are not the one-sided limits (the ratio's derivative is infinite where alpha = 0, and the clamps cut it).
    """
    t64 = torch.as_tensor(t).double().clamp(dst.t_min, dst.t_max)
    t_src = src.time_at_ratio(dst.ratio(t64)).clamp(src.t_min, src.t_max)
    scale = src.prior_std(t_src) / dst.prior_std(t64)
    dtype = torch.as_tensor(t).dtype if torch.as_tensor(t).is_floating_point() else torch.float64
    return Reparam(t_src=t_src.to(dtype), scale=scale.to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Reading a pipeline's scheduler config


def _class_defaults(name: str) -> dict[str, Any]:
    """The __init__ defaults of the diffusers scheduler class ``name`` (empty for other names)."""
    import inspect

    import diffusers

    try:
        cls = getattr(diffusers, name)
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (AttributeError, ImportError, TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def schedule_from_diffusers_config(config: Any) -> tuple[NoiseSchedule, str]:
    """The noise schedule and prediction type of a diffusers scheduler (or its config, with or without _class_name).

    Flow-matching schedulers (FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, DPM-Solver / UniPC with
    ``use_flow_sigmas``) give ``Flow``; SCMScheduler gives ``TrigFlow``; FewStepScheduler carries its schedule; any
    scheduler with DDPM betas (DDPM, DDIM, PNDM, Euler, DPM-Solver, LCM, TCD, CogVideoX's, ...) gives ``VP``, with
    its ``trained_betas``, ``rescale_betas_zero_snr`` and ``snr_shift_scale``. Keys a config leaves out take the
    named class's defaults, as diffusers does when it loads it (CogVideoX's snr_shift_scale is 3, elsewhere none).
    """
    if hasattr(config, "config"):  # a scheduler object: its in-memory config has no _class_name
        config = {"_class_name": type(config).__name__, **dict(config.config)}
    config = dict(config)
    name = str(config.get("_class_name", ""))
    config = {**_class_defaults(name), **config}
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
    if "beta_schedule" in config or config.get("trained_betas") is not None:
        prediction = str(config.get("prediction_type", "epsilon"))
        if prediction not in PREDICTIONS:
            raise ValueError(f"{name}: unsupported prediction_type {prediction!r}")
        if config.get("timestep_type") == "continuous" and prediction == "v_prediction":
            # EulerDiscreteScheduler then feeds the model 0.25 log(sigma), not the DDPM timestep
            raise ValueError(f"{name}: continuous timesteps (c_noise = log(sigma) / 4) are not supported")
        trained_betas = config.get("trained_betas")
        schedule = VP(
            beta_schedule=str(config.get("beta_schedule", "linear")),
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            num_train_timesteps=num_train_timesteps,
            trained_betas=None if trained_betas is None else tuple(float(b) for b in trained_betas),
            rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr") or False),
            snr_shift_scale=float(config.get("snr_shift_scale", 1.0)),
        )
        return schedule, prediction
    raise ValueError(
        f"unsupported scheduler {name or '(unnamed)'}: fewstep reads VP (DDPM betas), flow-matching and TrigFlow "
        "schedulers"
    )


def diffusers_schedule_config(schedule: NoiseSchedule) -> dict[str, Any]:
    """The keys of a stock diffusers scheduler's config that give ``schedule`` (``schedule_from_diffusers_config``
    reads them back): beta keys for VP (the step 1-3 keys only where they differ from diffusers' defaults), shift for
    Flow, sigma_data for TrigFlow; EDM has no stock counterpart here and gives none."""
    if isinstance(schedule, VP):
        out: dict[str, Any] = {
            "num_train_timesteps": schedule.num_train_timesteps,
            "beta_schedule": schedule.beta_schedule,
            "beta_start": schedule.beta_start,
            "beta_end": schedule.beta_end,
        }
        if schedule.trained_betas is not None:
            out["trained_betas"] = list(schedule.trained_betas)
        if schedule.rescale_betas_zero_snr:
            out["rescale_betas_zero_snr"] = True
        if schedule.snr_shift_scale != 1.0:
            out["snr_shift_scale"] = schedule.snr_shift_scale
        return out
    if isinstance(schedule, Flow):
        return {"num_train_timesteps": schedule.num_train_timesteps, "shift": schedule.shift}
    if isinstance(schedule, TrigFlow):
        return {"sigma_data": schedule.sigma_data}
    return {}
