"""Distribution matching (DMD, Yin et al. 2024; DMD2, Yin et al. 2024b), the core rCM, Phased DMD, SiD and TDM share.

The student's x0_G is re-noised to x_t = alpha_t x0_G + sigma_t eps and scored twice: by the frozen teacher (the
"real" score) and by a fake score trained on the student's own samples. In x0-prediction form the two scores differ
by s_fake - s_real = alpha_t / sigma_t^2 (x0_fake - x0_real), so the reverse-KL gradient at noise level t is
proportional to

    grad = (x0_fake - x0_real) / mean|x0_G - x0_real|        (DMD Eq. 7 with DMD2's per-sample normalizer)

and the generator loss 1/2 ||x0_G - sg(x0_G - grad)||^2 hands exactly ``grad`` (over the element count) to x0_G.
The fake score learns the student's distribution by denoising score matching on detached student samples, usually
with several critic steps per student step (two time-scale updates, DMD2 Sec. 4.2).

Denoisers here are plain callables ``(x_t, t) -> x0`` with the condition already bound, so the same code serves
class labels, prompt embeddings, guidance and per-phase experts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import batch_random
from ..schedules import Coeffs, NoiseSchedule, transition

Denoise = Callable[[Tensor, Tensor], Tensor]  # (x_t, t (B,)) -> x0
GuidanceConvention = Literal["ho", "dmd2", "fastvideo"]
Weighting = Literal["x0", "eps", "v"]


def ho_scale(w: float, convention: GuidanceConvention) -> float:
    """The Ho-Salimans scale, x_u + w (x_c - x_u), of a guidance scale w written in ``convention``.

    DMD2's own code (tianweiy/DMD2 main/sd_guidance.py, ``predict_noise``) guides in the Ho-Salimans form, so its
    ``real_guidance_scale`` carries over unchanged. FastVideo's DMD pipeline (fastvideo/training/
    distillation_pipeline.py, ``real_score_guidance_scale``) writes x_c + w (x_c - x_u), which is Ho-Salimans at
    w + 1 (its 3.5 is the usual 4.5); its docs attribute that form to DMD2, which DMD2's code does not bear out."""
    if convention in ("ho", "dmd2"):
        return w
    if convention == "fastvideo":
        return w + 1.0
    raise ValueError(f"unknown guidance convention {convention!r} (ho, dmd2 or fastvideo)")


def uniform_times(schedule: NoiseSchedule, n: int, lo: float = 0.02, hi: float = 0.98) -> Tensor:
    """n times uniform over the fraction [lo, hi] of the schedule's range (DMD2 draws t in [20, 980] of 1000)."""
    u = lo + (hi - lo) * batch_random.rand((n,))
    return schedule.t_min + (schedule.t_max - schedule.t_min) * u


def dmd_normalizer(x0_gen: Tensor, x0_real: Tensor, tiny: float = 1e-8) -> Tensor:
    """mean|x0_G - x0_real| per sample, (B, 1, ...) and detached: DMD2's per-sample normalizer, the one SiD and TDM
    divide their losses by too."""
    dims = tuple(range(1, x0_gen.ndim))
    return (x0_gen - x0_real).detach().abs().mean(dim=dims, keepdim=True).clamp_min(tiny)


def dmd_gradient(x0_gen: Tensor, x0_real: Tensor, x0_fake: Tensor, tiny: float = 1e-8) -> Tensor:
    """(x0_fake - x0_real) / mean|x0_G - x0_real| per sample: the direction that lowers the reverse KL of the
    student's distribution to the teacher's, normalized so its scale is the same at every noise level."""
    return (x0_fake - x0_real) / dmd_normalizer(x0_gen, x0_real, tiny)


def dmd_generator_loss(x0_gen: Tensor, grad: Tensor) -> Tensor:
    """1/2 ||x0_G - sg(x0_G - grad)||^2 (mean over elements): its gradient with respect to x0_G is grad / numel."""
    return 0.5 * F.mse_loss(x0_gen, (x0_gen - grad).detach())


def distribution_matching_loss(
    x0_gen: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    real: Denoise,
    fake: Denoise,
    eps: Tensor | None = None,
    x_t: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(generator loss, grad) for student samples x0_G re-noised at t; ``real`` is the (guided) teacher, ``fake``
    the fake score. Neither network receives a gradient from this loss. ``x_t`` replaces the plain re-noising
    alpha_t x0_G + sigma_t eps where a recipe noises its samples its own way (TDM: along the student's trajectory)."""
    with torch.no_grad():
        if x_t is None:
            x_t = schedule.add_noise(x0_gen.detach(), batch_random.randn_like(x0_gen) if eps is None else eps, t)
        grad = dmd_gradient(x0_gen.detach(), real(x_t, t), fake(x_t, t))
    return dmd_generator_loss(x0_gen, grad), grad


def subinterval_mean(x0: Tensor, x_t: Tensor, c_s: Coeffs, c_t: Coeffs) -> Tensor:
    """E[x_s | x_t] for s < t when the x0 estimate at x_t is ``x0``: the score (alpha_t x0 - x_t) / sigma_t^2 through
    the subinterval forward x_t = a x_s + b z (``forward_transition``), i.e. (x_t + b^2 score) / a, which is the
    DDPM posterior mean (a sigma_s^2 x_t + alpha_s b^2 x0) / sigma_t^2. At s = 0 it is x0 itself.

    Phased DMD scores the samples x_s a phase ends on with this: the teacher's and the fake's x0 turned into the
    subinterval target, so each phase's fake score is trained and read within its own subinterval."""
    a, b2 = transition(c_s, c_t)
    return (x_t + b2 * (c_t.alpha * x0 - x_t) / c_t.sigma**2) / a


def fake_score_loss(
    x0_gen: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    fake: Denoise,
    eps: Tensor | None = None,
    weighting: Weighting = "x0",
    snr_clip: float | None = None,
    x_t: Tensor | None = None,
) -> Tensor:
    """Denoising score matching of the fake score on detached student samples: w(t) ||D_fake(x_t, t) - x0_G||^2.

    ``weighting``: "x0" is w = 1 (x0 regression, as TDM's fake LoRA); "eps" is w = SNR = alpha^2 / sigma^2, the
    epsilon-prediction loss written in x0 (DMD2's fake score); "v" is w = 1 / sigma^2 in the schedule's own sigma,
    exactly the velocity (flow) or F (TrigFlow) loss written in x0. On a flow teacher that is 1 / t^2, which at the
    same noise-to-signal ratio is (sin t + cos t)^2 times rCM's TrigFlow weight 1 / sin^2 t_D: not a constant, so
    rCM's own critic (``rcm.rcm_critic_loss``) runs in TrigFlow time.
    ``snr_clip`` caps the SNR weight (TDM clips at 5). ``x_t``: the noised input when the recipe builds it itself."""
    x0 = x0_gen.detach()
    x_t = (
        schedule.add_noise(x0, batch_random.randn_like(x0) if eps is None else eps, t) if x_t is None else x_t.detach()
    )
    err = (fake(x_t, t) - x0).pow(2).flatten(1).mean(1)
    if weighting == "x0":
        weight = torch.ones_like(t)
    elif weighting == "eps":
        c = schedule.coeffs(t)
        weight = (c.alpha / c.sigma) ** 2
    elif weighting == "v":
        weight = schedule.coeffs(t).sigma ** -2
    else:
        raise ValueError(f"unknown weighting {weighting!r} (x0, eps or v)")
    if snr_clip is not None:
        weight = weight.clamp_max(snr_clip)
    return (weight.to(err) * err).mean()


def fake_score_network(model: nn.Module, lora_rank: int = 0) -> nn.Module:
    """The fake score's network, initialized from the teacher's: a trainable full copy, or (``lora_rank`` > 0) a
    frozen copy with a fresh LoRA adapter (TDM, and DMD at scale)."""
    fake = copy.deepcopy(model)
    if lora_rank > 0:
        from ..training.lora import add_lora

        return add_lora(fake, lora_rank)
    return fake.requires_grad_(True)


def fake_score_networks(model: nn.Module, lora_rank: int, count: int) -> tuple[list[nn.Module], nn.Module]:
    """``count`` fake-score networks (``fake_score_network``) and the one module that holds them for their optimizer
    and checkpoints: the network itself when there is one (its parameter names stay those of a single fake), else a
    ModuleList (SiD's fake per step, rCM's fake per plan)."""
    nets = [fake_score_network(model, lora_rank).eval() for _ in range(count)]
    return nets, nets[0] if count == 1 else nn.ModuleList(nets)


def sid_generator_loss(
    x0_gen: Tensor, x0_real: Tensor, x0_fake: Tensor, alpha: float = 1.2, tiny: float = 1e-8
) -> Tensor:
    """Score identity distillation's generator loss (Zhou et al. 2024, SiD Eq. 20, as SiD-LSG computes it):

        (x0_real - x0_fake) . ((x0_real - x0_G) - alpha (x0_real - x0_fake)) / mean|x0_G - x0_real|

    per sample (mean over elements here, a constant factor from SiD's sum), averaged over the batch. Unlike DMD,
    x0_real and x0_fake keep their graph to x0_G: the gradient runs through both networks' inputs (their weights are
    frozen for this step). alpha = 1 is (x0_real - x0_fake) . (x0_fake - x0_G). SiD (ICML 2024) uses alpha = 1.2 on
    its EDM models (mingyuanzhou/SiD run_sid.sh); SiD-LSG's Stable Diffusion scripts use 1 (its run_sid.sh)."""
    dims = tuple(range(1, x0_gen.ndim))
    diff = x0_real - x0_fake
    per_sample = (diff * ((x0_real - x0_gen) - alpha * diff)).mean(dim=dims)
    scale = (x0_gen - x0_real).detach().abs().mean(dim=dims).clamp_min(tiny)
    return (per_sample / scale).mean()
