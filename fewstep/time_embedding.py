"""A smooth timestep embedding for students trained through d/dt (sCM's JVP), without retraining the teacher.

Every diffusers backbone embeds its timestep (0-1000) with sinusoids of frequencies 1 down to 1e-4 rad per timestep.
The fastest channels turn ~1000 times per unit of time, so a teacher trained on continuous t still carries small,
fast wiggles in t: on the digits teacher they are 0.3% of F in amplitude yet larger than the smooth part of dF/dt,
so they dominate the JVP that sCM trains on. SANA-Sprint (Chen et al., 2025, "dense time embedding") removes the x1000
scale and fine-tunes the teacher. We get the same smoothness by zeroing the weights through which channels faster
than ``max_freq`` enter the first linear layer of the time MLP, and keeping them at zero while training. The student
stays a stock diffusers model (it exports and loads unchanged); on digits, 50-step sampling with the channels above
0.1 rad/timestep removed keeps its FID, while the wiggle part of dF/dt drops by two orders of magnitude.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

# (sinusoid module, time MLP) attribute pairs inside one parent, as diffusers names them:
# DiT / PixArt / Sana / SD3 / Flux combined embeddings, UNets, Wan.
_PAIRS = (("time_proj", "timestep_embedder"), ("time_proj", "time_embedding"), ("timesteps_proj", "time_embedder"))


def channel_frequencies(proj: Any) -> Tensor:
    """Angular frequency of each output channel of a diffusers ``Timesteps`` module (rad per timestep unit),
    as ``get_timestep_embedding`` lays them out: [sin | cos] halves (or [cos | sin]), same frequencies in each."""
    half = proj.num_channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - proj.downscale_freq_shift)
    freqs = proj.scale * torch.exp(exponent)
    out = torch.cat([freqs, freqs])
    return torch.cat([out, out.new_zeros(proj.num_channels % 2)])  # odd sizes are zero-padded (frequency 0)


def time_input_layers(model: nn.Module) -> list[tuple[nn.Linear, Tensor]]:
    """(first linear layer of each time MLP, the frequency of each of its input columns) in ``model``."""
    found = []
    for parent in model.modules():
        for proj_name, mlp_name in _PAIRS:
            proj: Any = getattr(parent, proj_name, None)
            if type(proj).__name__ != "Timesteps":
                continue
            linear = getattr(getattr(parent, mlp_name, None), "linear_1", None)
            if isinstance(linear, nn.Linear) and linear.in_features == proj.num_channels:
                found.append((linear, channel_frequencies(proj)))
    return found


def smooth_time_embedding(model: nn.Module, max_freq: float) -> int:
    """Zero, and keep at zero through training, the time-MLP weights of channels faster than ``max_freq`` rad per
    timestep unit. Returns the number of columns removed (0 when the model has no sinusoidal time embedding)."""
    removed = 0
    for linear, freqs in time_input_layers(model):
        keep = (freqs <= max_freq).to(linear.weight.dtype).to(linear.weight.device)
        with torch.no_grad():
            linear.weight.mul_(keep)
        # the removed channels are masked out of the layer's input, so their columns get no gradient and stay zero.
        # A gradient hook on the weight would do the same on one process, but FSDP2 / replicate train other tensors
        # than the Parameter the hook sits on, and it would be lost there (the columns then trained again)
        linear.register_forward_pre_hook(_masked_input(keep))
        removed += int((keep == 0).sum())
    return removed


def _masked_input(keep: Tensor) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * keep.to(args[0]), *args[1:])

    return hook
