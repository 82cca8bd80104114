"""LoRA on a diffusers backbone through peft, the way diffusers' own training scripts add adapters."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..errors import FewstepError

# Layer-name suffixes that get adapters when present: attention projections and feed-forwards of transformer blocks
# and UNet attention blocks, plus UNet resnet convolutions and time projections (the LCM-LoRA set, Luo et al. 2023).
LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)  # fmt: skip

# Modules whose children are called by keyword ``layer(input=x)``, which a peft LoRA layer (forward(x)) cannot take:
# AnimateDiff's motion modules call proj_in / proj_out so (diffusers unet_motion_model.py). Their layers get no
# adapter; MCM's AnimateDiff LoRA (yhZhai/mcm, an older diffusers that called them positionally) had one there.
KEYWORD_CALLERS = ("AnimateDiffTransformer3D",)


def _named(name: str, suffix: str) -> bool:
    """Whether a module's full name ends in the layer-name suffix (as peft matches target_modules)."""
    return name == suffix or name.endswith("." + suffix)


def lora_targets(model: nn.Module, suffixes: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    """The suffixes of ``suffixes`` that name at least one Linear or Conv2d layer of ``model``."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return [s for s in suffixes if any(_named(n, s) for n in names)]


def add_lora(
    model: nn.Module, rank: int, alpha: int | None = None, suffixes: tuple[str, ...] = LORA_TARGETS
) -> nn.Module:
    """Freeze ``model`` and add a trainable peft LoRA adapter of ``rank`` (scale alpha / rank) on the layers named by
    ``suffixes`` (in place; returns ``model``)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(model, suffixes)
    if not targets:
        raise FewstepError(f"{type(model).__name__} has no layer LoRA can adapt")
    model.requires_grad_(False)
    excluded = unwrappable(model, targets)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets,
        exclude_modules=excluded or None,
    )  # fmt: skip
    # peft's own injection works on every nn.Module (DiT has no diffusers PeftAdapterMixin); diffusers reads the
    # resulting layers back with load_lora_weights where the pipeline supports LoRA
    return inject_adapter_in_model(config, model)


def unwrappable(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the modules a target suffix names that must stay without an adapter:
    - ones that are not Linear or Conv2d layers: ModelScope's temporal convolutions (``TemporalConvLayer.conv1`` is a
      Sequential ending in a Conv3d), which MCM leaves without LoRA (yhZhai/mcm main.py drops every "temp" + "conv"
      module for ModelScope);
    - layers a ``KEYWORD_CALLERS`` module calls by keyword."""
    keyword_called = {
        f"{name}.{child}"
        for name, module in model.named_modules()
        if type(module).__name__ in KEYWORD_CALLERS
        for child, _ in module.named_children()
    }
    return [
        name
        for name, module in model.named_modules()
        if any(_named(name, t) for t in targets)
        and (name in keyword_called or not isinstance(module, nn.Linear | nn.Conv2d))
    ]


def base_key(name: str) -> str:
    """The plain model's name of a LoRA-wrapped model's base weight (peft puts it under ``base_layer``)."""
    return name.replace(".base_layer.", ".")


def load_base_weights(model: nn.Module, plain_state: dict[str, Tensor]) -> None:
    """Set the frozen base weights of a LoRA-wrapped ``model`` from a plain model's state dict (its adapters kept)."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if "lora_" not in name:
                value.copy_(plain_state[base_key(name)])


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model of the same class with each LoRA's delta folded into its base weight (W + scale B A): what the
    adapted model computes, loadable without peft."""
    from peft.tuners.lora import LoraLayer

    work = copy.deepcopy(model)
    for module in work.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    state = {base_key(k): v for k, v in work.state_dict().items() if "lora_" not in k}
    plain = type(model).from_config(model.config)  # type: ignore[attr-defined]
    plain.load_state_dict(state)
    return plain.to(next(model.parameters()).dtype).eval()
