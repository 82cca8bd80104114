"""LoRA on a diffusers backbone through peft, the way diffusers' own training scripts add adapters."""

from __future__ import annotations

from torch import nn

from ..errors import FewstepError

# Layer-name suffixes that get adapters when present: attention projections and feed-forwards of transformer blocks
# and UNet attention blocks, plus UNet resnet convolutions and time projections (the LCM-LoRA set, Luo et al. 2023).
LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)  # fmt: skip


def lora_targets(model: nn.Module, suffixes: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    """The suffixes of ``suffixes`` that name at least one Linear or Conv2d layer of ``model``."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return [s for s in suffixes if any(n == s or n.endswith("." + s) for n in names)]


def add_lora(model: nn.Module, rank: int, alpha: int | None = None) -> nn.Module:
    """Freeze ``model`` and add a trainable peft LoRA adapter of ``rank`` (in place; returns ``model``)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(model)
    if not targets:
        raise FewstepError(f"{type(model).__name__} has no layer LoRA can adapt")
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    # peft's own injection works on every nn.Module (DiT has no diffusers PeftAdapterMixin); diffusers reads the
    # resulting layers back with load_lora_weights where the pipeline supports LoRA
    return inject_adapter_in_model(config, model)
