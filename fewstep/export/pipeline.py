"""Choosing the scheduler an exported pipeline ships: a stock diffusers scheduler when it reproduces the sampling plan
exactly, else ``FewStepScheduler``, which reproduces any plan.

"Reproduces" is decided numerically, not by a table of rules: both schedulers drive the ordinary diffusers sampling
loop (``set_timesteps(n)``, then ``step`` per timestep) with the same random model and the same noise, for every step
count the plan defines, and must end on the same sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..sampling import SamplingPlan
from ..schedules import VP, Flow, NoiseSchedule, diffusers_schedule_config
from .scheduling_fewstep import FewStepScheduler
from .stock import StockPlans, StockSampler


def fewstep_scheduler(plans: Mapping[int, SamplingPlan], prediction: str) -> FewStepScheduler:
    """A FewStepScheduler holding one plan per step count, all on one schedule; the first plan's gamma is the
    scheduler's, and a plan with another gamma keeps its own in ``gammas``."""
    first = next(iter(plans.values()))
    if any(p.schedule != first.schedule or p.rule != first.rule for p in plans.values()):
        raise ValueError("all plans of one export must share their schedule and re-noise rule")
    return FewStepScheduler(
        schedule=first.schedule.config(),
        prediction_type=prediction,
        plan={str(n): list(p.times) for n, p in plans.items()},
        gamma=first.gamma,
        gammas={str(n): p.gamma for n, p in plans.items() if p.gamma != first.gamma} or None,
        **({"rule": first.rule} if first.rule != "ratio" else {}),
    )


class _RandomModel:
    """A fixed smooth random function of (x, timestep), standing in for any network."""

    def __init__(self, shape: Sequence[int], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        numel = int(torch.tensor(shape[1:]).prod())
        self.weight = torch.randn(numel, numel, generator=gen, dtype=torch.float64) / numel**0.5
        self.freq = torch.randn(numel, generator=gen, dtype=torch.float64)

    def __call__(self, x: Tensor, timestep: Tensor) -> Tensor:
        flat = x.double().flatten(1)
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1, 1)
        return torch.tanh(flat @ self.weight + torch.sin(1e-2 * t * self.freq)).reshape(x.shape).to(x.dtype)


def run_loop(
    scheduler: Any,
    steps: int,
    model: _RandomModel,
    noise: Tensor,
    seed: int = 0,
    sampler: StockSampler | None = None,
    eta: float = 0.0,
) -> Tensor:
    """The diffusers sampling loop, as pipelines write it: plain (``set_timesteps(steps)``, a step per timestep), or
    as ``sampler``'s pipeline sets the timesteps (FluxPipeline's sigmas and mu) and, for SanaSprintPipeline, runs
    them: the final 0 dropped, the scheduler handed sigma_d F, x0 of the last step kept. ``eta`` goes to a ``step``
    that takes one (TCDScheduler, DDIMScheduler), as StableDiffusionPipeline passes its ``eta`` argument."""
    import inspect

    extra = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    if sampler is None:
        scheduler.set_timesteps(steps)
    else:
        sampler.set_timesteps(scheduler, steps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    gen = torch.Generator().manual_seed(seed)
    if sampler is not None and sampler.loop == "scm":
        sigma_d = float(scheduler.config.sigma_data)
        x = noise * sigma_d
        for t in scheduler.timesteps[:-1]:
            x, x0 = scheduler.step(sigma_d * model(x, t), t, x, generator=gen, return_dict=False)
        return x0
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=gen, return_dict=False, **extra)[0]
    return x


def reproduces(
    candidate: Any,
    reference: Any,
    step_counts: Iterable[int],
    atol: float = 1e-4,
    rtol: float = 1e-6,
    sampler: StockSampler | None = None,
) -> bool:
    """Whether ``candidate`` (run as ``sampler``'s pipeline runs it, if given) ends every sampling loop where
    ``reference`` does (same model, same noise), called with ``eta`` = the reference's gamma for that step count
    where its ``step`` takes an eta (TCDScheduler: the value a user passes for it, as the model card says).

    The state is float32, as in pipelines (stock schedulers draw their noise in float32 whatever the state's dtype);
    atol allows for float32 arithmetic and diffusers' float32 alpha tables (ours are float64), rtol for a few float32
    roundings of large states (an epsilon model's x0 at t = 999 on PixArt's linear betas reaches hundreds).
    """
    shape = (2, 1, 3, 3)
    model = _RandomModel(shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    for n in step_counts:
        try:
            eta = reference.gamma_for(n) if isinstance(reference, FewStepScheduler) else 0.0
            out = run_loop(candidate, n, model, noise, sampler=sampler, eta=eta)
        except (ValueError, IndexError, RuntimeError):  # e.g. SCMScheduler refuses step counts it has no plan for
            return False
        if not torch.allclose(out.double(), run_loop(reference, n, model, noise).double(), atol=atol, rtol=rtol):
            return False
    return True


def stock_candidates(schedule: NoiseSchedule, prediction: str, gamma: float, rule: str = "ratio") -> list[Any]:
    """Stock diffusers schedulers that could express a plan on this schedule with this re-noise gamma and rule."""
    import diffusers

    if isinstance(schedule, Flow) and prediction == "flow" and gamma == 0.0:
        return [diffusers.FlowMatchEulerDiscreteScheduler(shift=schedule.shift)]
    # SCMScheduler is no candidate: its timesteps end with 0 and only SanaSprintPipeline's loop (timesteps[:-1])
    # drives it, so it is not a drop-in for the plain loop; TrigFlow plans export FewStepScheduler.
    if isinstance(schedule, VP) and prediction in ("epsilon", "v_prediction", "sample"):
        betas = dict(diffusers_schedule_config(schedule), prediction_type=prediction)
        ddim = dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        if schedule.snr_shift_scale != 1.0:  # only CogVideoX's schedulers shift the SNR; theirs is DDIM's step
            return [diffusers.CogVideoXDDIMScheduler(**betas, **ddim)] if gamma == 0.0 else []
        if rule == "tcd":  # its gamma is step()'s eta, which the loop passes (run_loop)
            return [diffusers.TCDScheduler(**betas)]
        if gamma == 1.0:
            return [diffusers.LCMScheduler(**betas)]
        if gamma == 0.0:
            return [diffusers.DDIMScheduler(**betas, **ddim)]
    return []


def scheduler_for_plan(plans: Mapping[int, SamplingPlan], prediction: str, stock: StockPlans | None = None) -> Any:
    """The stock scheduler that reproduces every plan exactly, if one does; else a FewStepScheduler.

    With ``stock`` (the teacher pipeline's stock samplers) the one candidate is its sampler for the plans' gamma, run
    as that pipeline runs it; without, the candidates of ``stock_candidates`` in the plain loop."""
    reference = fewstep_scheduler(plans, prediction)
    first = next(iter(plans.values()))
    if stock is not None:
        sampler = stock.sampler(first.gamma, first.rule)
        if sampler is not None and first.schedule == stock.native:
            candidate = sampler.build()
            if reproduces(candidate, reference, plans, sampler=sampler):
                return candidate
        return reference
    for candidate in stock_candidates(first.schedule, prediction, first.gamma, first.rule):
        if reproduces(candidate, reference, plans):
            return candidate
    return reference


def export_pipeline(pipe: Any, model: torch.nn.Module, scheduler: Any, output: Any) -> Any:
    """Write ``pipe`` with its backbone replaced by ``model`` and its scheduler by ``scheduler`` as a plain diffusers
    folder (``save_pretrained``), atomically; ``DiffusionPipeline.from_pretrained(output)`` loads it back."""
    from pathlib import Path

    from ..io import atomic_dir
    from ..teacher import backbone_slot
    from .experts import stock_experts

    slot = backbone_slot(pipe)
    components = {**pipe.components, slot: model, "scheduler": scheduler}
    settings = pipeline_settings(pipe)
    experts = stock_experts(pipe, model)  # Phased DMD's two experts as Wan 2.2's transformer / transformer_2
    if experts is not None:
        components.update({k: v for k, v in experts.items() if k in pipe.components})
        settings.update({k: v for k, v in experts.items() if k not in pipe.components})
    student = type(pipe)(**components, **settings)
    with atomic_dir(Path(output), "model_index.json") as tmp:
        student.save_pretrained(tmp)
    return Path(output)


def pipeline_settings(pipe: Any) -> dict[str, Any]:
    """The pipeline's own registered settings that are not components (SDXL's force_zeros_for_empty_prompt, Wan 2.2's
    boundary_ratio, SD's requires_safety_checker), which a rebuilt pipeline must keep."""
    import inspect

    params = inspect.signature(type(pipe).__init__).parameters
    return {
        key: value
        for key, value in pipe.config.items()
        if key in params and key not in pipe.components and not key.startswith("_")
    }


def export_lora(pipe: Any, model: torch.nn.Module, output: Any) -> Any:
    """Write the peft LoRA adapter of ``model`` (the pipeline's unet or transformer) so that
    ``pipe.load_lora_weights(output)`` on the base pipeline reproduces it. A pipeline without diffusers' LoRA loader
    (PixArt, digits), or whose backbone cannot take one (ModelScope's UNet3DConditionModel has no load_lora_adapter),
    gets peft's own adapter folder instead (adapter_config.json, adapter_model.safetensors), which
    ``peft.PeftModel.from_pretrained(pipe.transformer, output)`` (or ``pipe.unet``) loads, as PixArt's LCM-LoRA is
    loaded."""
    from pathlib import Path

    from peft.utils import get_peft_model_state_dict

    from ..io import atomic_dir
    from ..teacher import backbone_slot

    slot = backbone_slot(pipe)
    layers = get_peft_model_state_dict(model)  # peft key format: load_lora_weights reads it for every layer type
    if not layers:
        raise ValueError("the model carries no LoRA adapter to export")
    if not hasattr(type(pipe), "save_lora_weights") or not hasattr(model, "load_lora_adapter"):
        from safetensors.torch import save_file

        config: Any = model.peft_config["default"]  # type: ignore[index]
        with atomic_dir(Path(output), "adapter_model.safetensors") as tmp:
            config.save_pretrained(str(tmp))
            tensors = {f"base_model.model.{k}": v.detach().contiguous() for k, v in layers.items()}
            save_file(tensors, str(tmp / "adapter_model.safetensors"))
        return Path(output)
    with atomic_dir(Path(output), "pytorch_lora_weights.safetensors") as tmp:
        type(pipe).save_lora_weights(tmp, **{f"{slot}_lora_layers": layers})
    return Path(output)
