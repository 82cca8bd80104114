"""The Denoiser adapter: any supported diffusers UNet or transformer as ``(x_t, t, cond) -> x0`` at float time t.

This is the only place where discrete or x1000 timesteps appear and where backbone quirks live (how t enters, learned
sigma channels, Flux's 2x2 latent packing, PixArt's added conditions), so that d/dt reaches the time embedding and
recipes see one interface for every model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import FewstepError
from .schedules import (
    NoiseSchedule,
    append_dims,
    change_of_variables,
    from_x0,
    schedule_from_diffusers_config,
    to_x0,
)

Cond = Mapping[str, Any]


@dataclass(frozen=True)
class Backbone:
    """How one diffusers model class is called.

    timestep_scale: factor from diffusers' timestep to what the model takes (Flux multiplies by 1000 inside).
    timestep_scale_key: a config entry that scales the timestep further (SanaPipeline multiplies by
        ``transformer.config.timestep_scale``).
    learned_sigma: the output stacks [prediction, variance] on channels when out_channels = 2 in_channels (DiT).
    packed: latents enter as 2x2 patches (B, H/2 W/2, 4C) with image position ids (Flux).
    defaults: keyword arguments the model needs even when the caller has none (PixArt's added_cond_kwargs).
    shared: condition entries without a batch dimension, shared by both CFG branches (Flux's position ids).
    trigflow_via_flow: under a TrigFlow scheduler (SanaSprintPipeline's SCMScheduler) the network is a flow-velocity
        model at flow time s = sin t / (sin t + cos t), called as SanaSprintPipeline calls it (``_trigflow_via_flow``).
    rotary_3d: the network takes CogVideoX's 3-D rotary embeddings of the latent grid (``image_rotary_emb``) when its
        config says ``use_rotary_positional_embeddings``; they are computed here from the input's shape.
    image_first: a block returns (image, text) features, not (text, image) (CogVideoX).
    frame_dim: the frame axis of a video backbone's latents: 2 for (B, C, F, H, W), 1 for CogVideoX's (B, F, C, H, W).
    text_per_frame: the network takes one row of ``encoder_hidden_states`` per frame, (B F, N, D), which its pipeline
        repeats (UNetMotionModel: AnimateDiffPipeline repeats the prompt embeddings num_frames times).
    reached_into: submodules of a block that the model's own forward calls before that block runs (DiT embeds the
        timestep and class with ``transformer_blocks[0].norm1.emb``); FSDP2 makes each a unit of its own, gathered
        when it is called (``training/parallel.py``).
    """

    timestep_scale: float = 1.0
    timestep_scale_key: str | None = None
    learned_sigma: bool = False
    packed: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    shared: tuple[str, ...] = ()
    trigflow_via_flow: bool = False
    rotary_3d: bool = False
    image_first: bool = False
    frame_dim: int = 2
    text_per_frame: bool = False
    reached_into: tuple[str, ...] = ()


# backbones of video pipelines, whose latents carry a frame axis (``Backbone.frame_dim``)
VIDEO_BACKBONES = (
    "WanTransformer3DModel", "UNet3DConditionModel", "UNetMotionModel", "CogVideoXTransformer3DModel",
    "HunyuanVideoTransformer3DModel", "LTXVideoTransformer3DModel", "MochiTransformer3DModel",
)  # fmt: skip

BACKBONES: dict[str, Backbone] = {
    "UNet2DModel": Backbone(),
    "UNet2DConditionModel": Backbone(),
    "DiTTransformer2DModel": Backbone(learned_sigma=True, reached_into=("transformer_blocks.0.norm1.emb",)),
    "PixArtTransformer2DModel": Backbone(
        learned_sigma=True, defaults={"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    ),
    "SD3Transformer2DModel": Backbone(),
    "SanaTransformer2DModel": Backbone(timestep_scale_key="timestep_scale", trigflow_via_flow=True),
    "FluxTransformer2DModel": Backbone(timestep_scale=1e-3, packed=True, shared=("txt_ids", "img_ids")),
    "WanTransformer3DModel": Backbone(),
    "UNet3DConditionModel": Backbone(),  # ModelScope T2V: latents (B, C, F, H, W), frames folded into the batch inside
    "UNetMotionModel": Backbone(text_per_frame=True),  # AnimateDiff: SD's UNet + motion modules, (B, C, F, H, W)
    "CogVideoXTransformer3DModel": Backbone(rotary_3d=True, image_first=True, frame_dim=1),  # latents (B, F, C, H, W)
}


def backbone_for(model: nn.Module) -> Backbone:
    """The call convention of ``model``'s class (or of the nearest supported base class); a ``TimestepExperts``
    is called as its experts are."""
    experts = getattr(model, "experts", None)  # TimestepExperts (export/experts.py), known by shape, not imported
    if isinstance(experts, nn.ModuleList) and hasattr(model, "boundaries"):
        model = experts[0]
    for cls in type(model).__mro__:
        if cls.__name__ in BACKBONES:
            return BACKBONES[cls.__name__]
    raise FewstepError(
        f"unsupported model class {type(model).__name__}; fewstep supports {', '.join(sorted(BACKBONES))}"
    )


def pack_2x2(x: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) -> (B, H/2 W/2, 4C) patches and their (H/2 W/2, 3) position ids, as FluxPipeline packs latents."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise FewstepError(f"Flux latents need even height and width, got {h}x{w}")
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
    ids[..., 1] = torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
    return packed, ids.reshape(-1, 3)


def rotary_3d(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """CogVideoX's 3-D rotary embeddings (cos, sin) for latents x (B, F, C, H, W), as CogVideoXPipeline prepares them
    (its own method, fed the latent size with a spatial VAE factor of 1)."""
    from types import SimpleNamespace

    from diffusers import CogVideoXPipeline

    stand_in = SimpleNamespace(vae_scale_factor_spatial=1, transformer=model)
    frames, height, width = x.shape[1], x.shape[3], x.shape[4]
    cos, sin = CogVideoXPipeline._prepare_rotary_positional_embeddings(stand_in, height, width, frames, x.device)  # type: ignore[arg-type]
    return cos.to(x.dtype), sin.to(x.dtype)


def unpack_2x2(packed: Tensor, shape: torch.Size) -> Tensor:
    b, c, h, w = shape
    return packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def nest_kwargs(cond: Cond, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Model keyword arguments from a flat condition: a key "a.b" is entry b of the nested argument a (SDXL's
    ``added_cond_kwargs.time_ids``), merged over ``defaults`` (nested mappings merge, the condition wins).

    Conditions travel flat (cached, batched and stacked for CFG row by row); the nesting is the model's quirk."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (defaults or {}).items()}
    for key, v in cond.items():
        head, dot, rest = key.partition(".")
        if not dot:
            out[key] = {**out[key], **v} if isinstance(v, Mapping) and isinstance(out.get(key), Mapping) else v
            continue
        inner = out.get(head)
        out[head] = {**(inner if isinstance(inner, Mapping) else {}), **nest_kwargs({rest: v})}
    return out


def expand_cond(cond: Cond, batch: int, shared: tuple[str, ...] = ()) -> dict[str, Any]:
    """A condition with its per-sample tensors of batch 1 expanded to ``batch`` (one negative prompt run alone)."""
    out: dict[str, Any] = {}
    for key, v in cond.items():
        if isinstance(v, Mapping):
            out[key] = expand_cond(v, batch, shared)
        elif key not in shared and isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == 1:
            out[key] = v.expand(batch, *v.shape[1:])
        else:
            out[key] = v
    return out


def concat_cond(a: Cond, b: Cond, batch: int, shared: tuple[str, ...] = ()) -> dict[str, Any]:
    """Stack two condition mappings along the batch for one CFG forward.

    Tensors are per-sample: a batch of 1 is expanded to ``batch`` (one negative prompt for all, say) and the two
    branches are concatenated to 2 ``batch``. Keys in ``shared`` (no batch dimension) and non-tensors are taken once.
    """
    out: dict[str, Any] = {}
    for key in a.keys() | b.keys():
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out[key] = concat_cond(va, vb, batch, shared)
        elif key not in shared and isinstance(va, Tensor) and isinstance(vb, Tensor) and va.ndim > 0:
            va, vb = (v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for v in (va, vb))
            if va.shape[0] != batch or vb.shape[0] != batch:
                raise ValueError(f"condition {key!r}: batch {va.shape[0]} and {vb.shape[0]}, expected {batch} or 1")
            out[key] = torch.cat([va, vb])
        else:
            out[key] = va if va is not None else vb
    return out


def backbone_slot(pipe: Any) -> str:
    """The pipeline component that holds the denoising network: "transformer" or "unet"."""
    for slot in ("transformer", "unet"):
        if getattr(pipe, slot, None) is not None:
            return slot
    raise FewstepError(f"{type(pipe).__name__} has neither a transformer nor a unet")


def backbone_of(pipe: Any) -> nn.Module:
    """The denoising network of a pipeline (its transformer or unet)."""
    return getattr(pipe, backbone_slot(pipe))


class Denoiser(nn.Module):
    """A diffusers model as x0 = D(x_t, t, cond) with t a float tensor (B,) in ``schedule``'s units.

    ``native`` is the schedule the model was trained on (read from its pipeline's scheduler config). ``schedule`` is
    the one the caller's time lives in; when they differ, inputs are mapped by the exact change of variables
    (``schedules.change_of_variables``), so a flow or VP teacher answers in TrigFlow time without retraining.
    """

    def __init__(
        self,
        model: nn.Module,
        native: NoiseSchedule,
        prediction: str,
        schedule: NoiseSchedule | None = None,
        backbone: Backbone | None = None,
        stock: Any = None,
        decode: Any = None,
    ):
        super().__init__()
        self.model = model
        self.native = native
        self.schedule = schedule or native
        self.prediction = prediction
        self.backbone = backbone or backbone_for(model)
        # the stock diffusers samplers of the teacher's pipeline (``export.stock.StockPlans``), which set the recipes'
        # default plans; None for a network without a pipeline
        self.stock = stock
        # x0 latents -> images in [0, 1] through the pipeline's VAE (``training.families.image_decoder``), for rewards
        # on decoded images; None where x0 are the pixels themselves (digits) or clips
        self.decode = decode

    @classmethod
    def from_pipeline(cls, pipe: Any) -> Denoiser:
        model = backbone_of(pipe)
        try:
            native, prediction = schedule_from_diffusers_config(pipe.scheduler)
        except ValueError as err:
            raise FewstepError(str(err)) from None
        return cls(model, native, prediction)

    def with_schedule(self, schedule: NoiseSchedule) -> Denoiser:
        """The same network answering in another schedule's time (shares weights)."""
        other = copy.copy(self)
        other.schedule = schedule
        return other

    def with_model(self, model: nn.Module) -> Denoiser:
        """Another network of the same kind (a student, a fake score, a target copy) answering as this one does."""
        return Denoiser(model, self.native, self.prediction, self.schedule, self.backbone, self.stock, self.decode)

    def model_output(self, x: Tensor, t_native: Tensor, cond: Cond) -> Tensor:
        """The raw network output at native time ``t_native`` (B,), in the model's own prediction type."""
        bb = self.backbone
        timestep = self.native.to_model_timestep(t_native) * bb.timestep_scale
        if bb.timestep_scale_key is not None:
            timestep = timestep * float(getattr(self.model.config, bb.timestep_scale_key, 1.0))
        kwargs = nest_kwargs(cond, bb.defaults)
        if getattr(getattr(self.model, "config", None), "guidance_embeds", False) and "guidance" not in kwargs:
            raise FewstepError(
                f"{type(self.model).__name__} embeds the guidance scale (guidance_embeds): pass cond['guidance'], "
                "a (B,) tensor of scales, as its pipeline does"
            )
        if bb.trigflow_via_flow and self.native.kind == "trigflow":
            return self._trigflow_via_flow(x, t_native, kwargs)
        if bb.rotary_3d and getattr(self.model.config, "use_rotary_positional_embeddings", False):
            kwargs.setdefault("image_rotary_emb", rotary_3d(self.model, x))
        if bb.text_per_frame and "encoder_hidden_states" in kwargs:
            frames = x.shape[bb.frame_dim]
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].repeat_interleave(frames, dim=0)
        inp = x
        if bb.packed:
            inp, img_ids = pack_2x2(x)
            kwargs.setdefault("img_ids", img_ids)
            if "encoder_hidden_states" in kwargs and "txt_ids" not in kwargs:
                ehs = kwargs["encoder_hidden_states"]
                kwargs["txt_ids"] = torch.zeros(ehs.shape[1], 3, device=x.device, dtype=x.dtype)
        # timesteps stay float32 (as diffusers pipelines keep them): bf16 would round 999 to 1000
        timestep = timestep.to(torch.promote_types(x.dtype, torch.float32))
        out = self.model(inp, timestep=timestep, return_dict=False, **kwargs)[0]
        if bb.packed:
            out = unpack_2x2(out, x.shape)
        if bb.learned_sigma and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out

    def _trigflow_via_flow(self, x: Tensor, t: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """TrigFlow's F at time t (x0 = cos t x_t - sin t sigma_d F) from a flow-velocity network, as
        SanaSprintPipeline computes it (SANA-Sprint, Chen et al. 2025, Sec. 3.1: the flow model is a TrigFlow model by
        the change of variables).

        With y = x_t / sigma_d = cos t y0 + sin t eps and s = sin t / (sin t + cos t), the flow input is
        x_s = y / (cos t + sin t) = y sqrt(s^2 + (1 - s)^2), and the flow velocity v at s gives
        F = ((1 - 2s) x_s + (1 - 2s + 2s^2) v) / sqrt(s^2 + (1 - s)^2). The network sees s itself, not 1000 s. (The
        pipeline hands SCMScheduler sigma_d F, whose step is x0 = cos t x_t - sin t (sigma_d F).)"""
        sigma_d = float(getattr(self.native, "sigma_data", 1.0))
        s = torch.sin(t) / (torch.cos(t) + torch.sin(t))
        s_ = append_dims(s, x.ndim)
        norm = torch.sqrt(s_**2 + (1 - s_) ** 2)
        x_s = x / sigma_d * norm
        timestep = s.to(torch.promote_types(x.dtype, torch.float32))
        v = self.model(x_s, timestep=timestep, return_dict=False, **kwargs)[0]
        return ((1 - 2 * s_) * x_s + (1 - 2 * s_ + 2 * s_**2) * v) / norm

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """x0 estimate (shape and dtype of x_t) at time t (scalar or (B,)) in ``self.schedule``'s units.

        Time, the change of variables and the x0 conversion run in at least float32 whatever the model's dtype.
        """
        work = torch.promote_types(x_t.dtype, torch.float32)
        t = torch.as_tensor(t, device=x_t.device).to(work).expand(x_t.shape[0])
        x = x_t.to(work)
        if self.schedule == self.native:
            x_in, t_in = x, t
        else:
            rep = change_of_variables(t, self.schedule, self.native)
            x_in, t_in = append_dims(rep.scale, x.ndim) * x, rep.t_src
        out = self.model_output(x_in.to(x_t.dtype), t_in, cond or {}).to(work)
        x0 = to_x0(out, x_in, self.native.coeffs(append_dims(t_in, x.ndim)), self.prediction)
        return x0.to(x_t.dtype)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond | None = None, prediction: str = "sample") -> Tensor:
        """The estimate in any prediction type of ``self.schedule`` (e.g. TrigFlow's F with "trigflow")."""
        x0 = self(x_t, t, cond)
        t = torch.as_tensor(t, device=x_t.device, dtype=x_t.dtype).expand(x_t.shape[0])
        return from_x0(x0, x_t, self.schedule.coeffs(append_dims(t, x_t.ndim)), prediction)

    def guided(self, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond, guidance: float | Tensor) -> Tensor:
        """Classifier-free guidance on x0: x0_u + w (x0_c - x0_u), both branches in one batched forward.

        w = 1 is the conditional model alone (one evaluation); w = 0 the unconditional one. ``guidance`` may be a
        (B,) tensor of per-sample scales (LCM's w ~ U[w_min, w_max]).
        """
        if isinstance(guidance, Tensor):
            guidance = append_dims(guidance.to(x_t.device), x_t.ndim)
        elif guidance == 1.0:
            return self(x_t, t, cond)
        elif guidance == 0.0:
            return self(x_t, t, expand_cond(uncond, x_t.shape[0], self.backbone.shared))
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).expand(batch)
        both = concat_cond(cond, uncond, batch, self.backbone.shared)
        x0_c, x0_u = self(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return x0_u + guidance * (x0_c - x0_u)


def guidance_condition(model: nn.Module, guidance: Tensor) -> dict[str, Any]:
    """The condition entries through which ``model`` itself embeds a (B,) guidance scale w, as its pipeline passes
    them: UNets with ``time_cond_proj_dim`` take ``timestep_cond``, the embedding of w - 1 (LCM's omega; what
    StableDiffusionPipeline and LatentConsistencyModelPipeline compute); Flux-style ``guidance_embeds`` models take
    ``guidance`` (SANA-Sprint's scaled by its ``guidance_embeds_scale``, as SanaSprintPipeline passes it). Empty for
    models that do not embed w."""
    config = getattr(model, "config", None)
    dim = getattr(config, "time_cond_proj_dim", None)
    if dim is not None:
        from diffusers import LatentConsistencyModelPipeline

        # a pure function that diffusers defines as a pipeline method (self is unused)
        embed = LatentConsistencyModelPipeline.get_guidance_scale_embedding
        return {"timestep_cond": embed(None, guidance.float() - 1.0, embedding_dim=dim)}  # type: ignore[arg-type]
    if getattr(config, "guidance_embeds", False):  # SANA-Sprint feeds w times its guidance_embeds_scale (0.1)
        return {"guidance": guidance.float() * float(getattr(config, "guidance_embeds_scale", 1.0))}
    return {}


def feature_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone's main blocks, whose outputs serve as features (adversarial heads on a frozen teacher): the
    transformer blocks of DiT, PixArt, SD3, Sana and Flux (its double-stream ones), Wan's blocks, a UNet's down
    blocks and mid block."""
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return list(blocks)
    down = getattr(model, "down_blocks", None)
    if isinstance(down, nn.ModuleList):
        mid = getattr(model, "mid_block", None)
        return [*down, *([mid] if mid is not None else [])]
    raise FewstepError(f"{type(model).__name__}: no blocks to read features from")


def block_tokens(output: Any, image_first: bool = False) -> Tensor:
    """A block's image features as tokens (B, N, C): the last tensor of a tuple output (SD3 and Flux blocks return
    (text, image); UNet down blocks (hidden, skips)), or the first where the backbone's blocks return (image, text)
    (``Backbone.image_first``: CogVideoX); 4-D maps flattened over space."""
    if isinstance(output, tuple | list):
        output = [o for o in output if isinstance(o, Tensor)][0 if image_first else -1]
    if output.ndim == 4:
        return output.flatten(2).transpose(1, 2)
    return output


def block_channels(block: nn.Module) -> int:
    """Channels of a block's output features: the size of its last normalization layer."""
    size = None
    for module in block.modules():
        if isinstance(module, nn.LayerNorm) and module.normalized_shape:
            size = module.normalized_shape[-1]
        elif isinstance(module, nn.GroupNorm):
            size = module.num_channels
    if size is None:
        raise FewstepError(f"{type(block).__name__}: cannot tell its feature channels")
    return int(size)


def add_guidance_embedding(model: nn.Module, dim: int = 256) -> nn.Module | None:
    """A copy of ``model`` that also embeds the guidance scale (LCM's w-embedding, Luo et al. 2023, Sec. 4.2), with the
    teacher's weights; None when the backbone has no slot for it. UNet2DConditionModel gets ``time_cond_proj_dim`` (a
    new, randomly initialised projection, as diffusers' LCM distillation script does); models that already embed w
    are returned as copies."""
    config = getattr(model, "config", None)
    if getattr(config, "time_cond_proj_dim", None) is not None or getattr(config, "guidance_embeds", False):
        return copy.deepcopy(model)
    if type(model).__name__ != "UNet2DConditionModel":
        return None
    student = type(model).from_config({**dict(config), "time_cond_proj_dim": dim})  # type: ignore[attr-defined,arg-type]
    missing, unexpected = student.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in key for key in missing):
        raise FewstepError(f"guidance embedding: unexpected weights {unexpected[:3]}, missing {missing[:3]}")
    return student.to(next(model.parameters()).device, next(model.parameters()).dtype)
