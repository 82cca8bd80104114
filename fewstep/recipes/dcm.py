"""DCM: dual-expert consistency model (Lv et al. 2025), as Vchitect/DCM trains Wan (fastvideo/
distill_dcm_wan_semantic_expert.py, distill_dcm_wan_detail_expert.py) in one run of two stages.

The grid: N = 50 Euler points of a flow teacher, sigma_i = shift((i + 1) / N) with DCM's shift 17, sigma'_i =
shift(i / N) one point lower (sigma'_0 = shift(0.001)). The semantic expert owns the high-noise points i >= b
(b = 35), the detail expert the rest; each jumps straight to its phase's end sigma_e (sigma'_b, sigma'_0):
  x_i = (1 - sigma_i) x0 + sigma_i eps, x_e = Euler(x_i, sigma_i -> sigma_e; v_theta),
  x'_i = one Euler step of the teacher's guided ODE sigma_i -> sigma'_i (CFG w = 5 in DCM's form, Ho scale 6),
  target = x'_i at the phase start (i = b, or 0), else Euler(x'_i, sigma'_i -> sigma_e; v_theta) without gradient
  (the online expert itself: the scripts pass no --use_ema).
Stage 1, semantic expert (a full fine-tune of the teacher): L = pseudo-Huber(x_e, target) + temporal-coherence
  MSE(x_e[f + 3] - x_e[f], target[f + 3] - target[f]) over frames.
  (``temporal_stages = "both"`` adds the same term to stage 2, a departure measured in README's video world.)
Stage 2, detail expert (a LoRA, r 128 / alpha 256, on the attention projections of the finished semantic expert,
  with its own trainable copies of the condition embedder and output projection): L = pseudo-Huber + 0.5 hinge_G +
  1.0 feature matching, where target (as "real") and x_e (as "fake") are re-noised with one shared eps to a random
  sigma'_j of the phase, sigma = ((1 - s) x + (s - sigma_e) eps) / (1 - sigma_e), and read by the frozen teacher:
  a head per second block scores every token (hinge critic, betas (0, 0.999)), and feature matching is the MSE
  between the fake's and the real's block features.

Departures, and why: DCM's heads are 1x1 convolutions with GroupNorm on each frame's token grid, here the per-token
MLP heads of ``objectives/adversarial.py`` (the same per-token logits without a hard-coded 30 x 52 grid); its
feature matching compares the teacher's early-exit outputs (each block's hidden state through the teacher's own
norm_out and proj_out, Wan-specific code), here the block features themselves.

The export is one backbone that switches expert by timestep (``TimestepExperts``): the semantic expert above the
boundary sigma'_b, the detail expert (LoRA merged) at and below it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import batch_random
from ..errors import FewstepError
from ..objectives.adversarial import TeacherDiscriminator, hinge_critic_loss
from ..objectives.consistency import teacher_ode_step
from ..objectives.losses import pseudo_huber
from ..objectives.motion import frame_differences
from ..sampling import SamplingPlan
from ..schedules import Flow, append_dims, ddim_step
from ..teacher import VIDEO_BACKBONES, Denoiser
from ..training.data import DataConfig
from ..training.lora import add_lora, load_base_weights, merged_copy
from ..training.trainer import TrainConfig
from .base import Batch, OptimizerSpec, Recipe

DETAIL_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # lora_config target_modules of the detail expert


@dataclass(frozen=True)
class DCMConfig:
    # Vchitect/DCM scripts/distill/distill_wan_{semantic,detail}_expert.sh over the training files' defaults
    num_euler_timesteps: int = 50
    shift: float = 17.0  # the training files' FlowMatchEulerDiscreteScheduler(shift=17)
    boundary_index: int = 35  # the semantic expert trains grid indices [35, 50), the detail expert [0, 35)
    guidance: float = 6.0  # Ho scale; DCM's distill_cfg 5 is v_c + 5 (v_c - v_u)
    # not in the reference: guidance only for t in (lo, hi] of the teacher's time (sampling.guidance_at), for a
    # teacher that samples so; None: everywhere, as DCM does (the video preset too: distilling the video teacher's
    # interval measured worse, recipes/dcm/video.toml)
    guidance_interval: tuple[float, float] | None = None
    huber_c: float = 0.001
    temporal_weight: float = 1.0  # the semantic stage's loss_tc, weight 1
    # frame differences x[f + 3] - x[f] of latent frames (Wan's VAE packs 4 video frames in each); on the video world's
    # pixel frames, stride 1 at weight 100 moved the temporal figure no more than stride 3 (README, the video world)
    temporal_stride: int = 3
    # "semantic": the temporal-coherence term in the semantic stage only, as DCM; "both": in the detail stage too (not
    # in the reference; on the video world, where class agreement drops with the detail expert, it did not raise it:
    # README, the video world's ablations)
    temporal_stages: Literal["semantic", "both"] = "semantic"
    semantic_steps: int = 1000  # max_train_steps of the semantic script
    semantic_lr: float = 1e-6
    detail_lr: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-3
    lora_rank: int = 128
    lora_alpha: int = 256
    detail_copies: tuple[str, ...] = ("condition_embedder", "proj_out")  # the *_lora copies the detail expert trains
    hinge_weight: float = 0.5  # adv_weight 0.1 x gan_g_loss's 5 hinge_G
    fm_weight: float = 1.0  # adv_weight 0.1 x gan_g_loss's 10 feature matching
    adv_lr: float = 1e-5  # discriminator_learning_rate
    adv_betas: tuple[float, float] = (0.0, 0.999)
    adv_block_every: int = 2  # Discriminator(stride=2): a head after every second block
    # "semantic": the single-expert ablation (one consistency model, as DCM's baseline): the semantic objective
    # (consistency + temporal coherence) on the whole grid for all train.max_steps, exported alone, sampled uniformly
    # in unshifted time
    experts: Literal["dual", "semantic"] = "dual"
    plan_steps: tuple[int, ...] = (1, 2, 4)
    # "recipe": ceil(n / 2) semantic Euler steps from t_max to the boundary, floor(n / 2) detail steps from it
    # (1 step: the semantic expert's x0); "stock": the teacher pipeline's own scheduler times
    plan_times: Literal["recipe", "stock"] = "recipe"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=2000))
    data: DataConfig = field(default_factory=DataConfig)


class DCM(Recipe):
    name = "dcm"
    paper: ClassVar[str] = "DCM, dual-expert consistency model for video generation (Lv et al. 2025)"
    Config: ClassVar[type] = DCMConfig

    def __init__(self, teacher: Denoiser, cfg: DCMConfig = DCMConfig()):
        if type(teacher.model).__name__ not in VIDEO_BACKBONES:
            raise FewstepError(f"dcm distils video teachers; {type(teacher.model).__name__} is not a video backbone")
        if not isinstance(teacher.native, Flow):
            raise FewstepError(
                f"dcm distils flow-matching teachers (Wan, HunyuanVideo); this one is {teacher.native.kind}"
            )
        if not 0 < cfg.boundary_index < cfg.num_euler_timesteps:
            raise FewstepError(
                f"dcm: boundary_index must lie in (0, {cfg.num_euler_timesteps}), got {cfg.boundary_index}"
            )
        self.single = cfg.experts == "semantic"
        if not self.single and not 0 < cfg.semantic_steps < cfg.train.max_steps:
            raise FewstepError(
                f"dcm: semantic_steps must lie in (0, train.max_steps {cfg.train.max_steps}), got {cfg.semantic_steps}"
            )
        self.cfg, self.teacher = cfg, teacher
        teacher.model.requires_grad_(False).eval()
        self.frame_dim = teacher.backbone.frame_dim
        grid = Flow(shift=cfg.shift)
        n = cfg.num_euler_timesteps
        u = torch.arange(n + 1, dtype=torch.float64) / n
        u[0] = 1e-3  # sigma'_0 = shift(0.001): the training files' sigma table ends there
        sigmas = grid.shift_time(u)
        self.sigmas = sigmas.float()  # sigmas[i + 1] = sigma_i, sigmas[i] = sigma'_i
        # sigma'_b: the semantic phase's end, as split_times has it (sigma'_0 for a single expert)
        self.semantic_lo = 0 if self.single else cfg.boundary_index
        self.boundary = float(sigmas[self.semantic_lo])
        semantic = copy.deepcopy(teacher.model).requires_grad_(True).eval()
        self.experts = nn.ModuleList([semantic])
        if not self.single:
            detail = add_lora(copy.deepcopy(teacher.model), cfg.lora_rank, cfg.lora_alpha, DETAIL_LORA_TARGETS).eval()
            for name, module in detail.named_children():
                if name in cfg.detail_copies:
                    module.requires_grad_(True)
            self.experts.append(detail)
        # a single expert is always in the semantic stage, so its "detail" is never called
        self.semantic, self.detail = teacher.with_model(semantic), teacher.with_model(self.experts[-1])
        self.disc = TeacherDiscriminator(teacher, cfg.adv_block_every)

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.experts, **({} if self.single else {"critic": self.disc.heads})}

    def ema(self) -> list[str]:
        return []  # DCM saves the online experts (no --use_ema)

    def optimizer(self, name: str) -> OptimizerSpec:
        cfg = self.cfg
        if name == "critic":
            return OptimizerSpec(lr=cfg.adv_lr, betas=cfg.adv_betas, weight_decay=cfg.weight_decay)
        return OptimizerSpec(lr=cfg.semantic_lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             lr_by_prefix={"1.": cfg.detail_lr})  # fmt: skip

    def stage(self, step: int) -> str:
        return "semantic" if self.single or step < self.cfg.semantic_steps else "detail"

    def jump(self, expert: Denoiser, x: Tensor, s: Tensor, end: float, cond: dict[str, Any]) -> Tensor:
        """x_e: one Euler step of the expert's own velocity from s to ``end`` (DDIM on its x0, the same on a flow)."""
        native = self.teacher.native
        c_end = native.coeffs(append_dims(torch.full_like(s, end), x.ndim))
        return ddim_step(expert(x, s, cond), x, native.coeffs(append_dims(s, x.ndim)), c_end)

    def loss(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg, native = self.cfg, self.teacher.native
        if batch.x0 is None or batch.x0.ndim != 5:
            raise FewstepError("dcm needs training clips (x0 of shape (B, C, F, H, W))")
        x0 = batch.x0
        b = x0.shape[0]
        semantic = self.stage(step) == "semantic"
        lo, hi = (self.semantic_lo, cfg.num_euler_timesteps) if semantic else (0, cfg.boundary_index)
        expert = self.semantic if semantic else self.detail
        end = float(self.sigmas[lo])
        i = lo + batch_random.randint(hi - lo, (b,))
        s, s_prev = self.sigmas[i + 1].to(x0), self.sigmas[i].to(x0)
        x_i = native.add_noise(x0, batch_random.randn_like(x0), s)
        pred = self.jump(expert, x_i, s, end, batch.cond)
        with torch.no_grad():
            x_prev = teacher_ode_step(
                self.teacher, x_i, s, s_prev, batch.cond, batch.uncond, cfg.guidance, cfg.guidance_interval
            )
            at_start = append_dims(i == lo, x0.ndim)
            target = torch.where(at_start, x_prev, self.jump(expert, x_prev, s_prev, end, batch.cond))
        loss = pseudo_huber(pred, target, cfg.huber_c).mean()
        if cfg.temporal_weight > 0 and (semantic or cfg.temporal_stages == "both"):
            loss = loss + cfg.temporal_weight * self.temporal_coherence(pred, target)
        if semantic:
            return {"student": loss}
        generator, critic = self.adversarial(pred, target, end, batch.cond)
        return {"student": loss + generator, "critic": critic}

    def temporal_coherence(self, pred: Tensor, target: Tensor) -> Tensor:
        """DCM's loss_tc: MSE between the frame differences x[f + stride] - x[f] of the jump and of its target (zero
        for clips no longer than the stride)."""
        stride = self.cfg.temporal_stride
        if pred.shape[self.frame_dim] <= stride:
            return pred.new_zeros(())
        d_pred = frame_differences(pred, stride, self.frame_dim)
        d_target = frame_differences(target, stride, self.frame_dim)
        return F.mse_loss(d_pred.float(), d_target.float())

    def adversarial(self, fake: Tensor, real: Tensor, end: float, cond: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(generator loss, critic loss) of the detail stage: both re-noised with one eps at a random sigma'_j of the
        phase and read by the frozen teacher."""
        cfg = self.cfg
        b = fake.shape[0]
        j = batch_random.randint(cfg.boundary_index, (b,))
        s = self.sigmas[j].to(fake)
        eps = batch_random.randn_like(fake)
        a = append_dims((1 - s) / (1 - end), fake.ndim)
        c = append_dims((s - end) / (1 - end), fake.ndim)
        fake_features = self.disc.features(a * fake + c * eps, s, cond)
        with torch.no_grad():
            real_features = self.disc.features(a * real + c * eps, s, cond)
        heads = self.disc.heads
        generator = cfg.hinge_weight * torch.relu(1 - heads(fake_features)).mean()
        matching = sum((F.mse_loss(f.float(), r.float()) for f, r in zip(fake_features, real_features, strict=True)))
        generator = generator + cfg.fm_weight * matching / len(fake_features)
        critic = hinge_critic_loss(heads(real_features), heads([f.detach() for f in fake_features]))
        return generator, critic

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        # the semantic expert is done: the detail expert starts from it, every non-LoRA weight (the frozen base and the
        # detail expert's own copies: condition embedder, proj_out)
        if not self.single and step + 1 == self.cfg.semantic_steps:
            load_base_weights(self.experts[1], self.experts[0].state_dict())

    def export_module(self, student: nn.Module) -> nn.Module:
        """The semantic expert above the boundary, the detail expert (LoRA merged) at and below it."""
        from ..export.experts import TimestepExperts

        if self.single:
            return student[0]  # type: ignore[index]
        semantic, detail = student[0], merged_copy(student[1])  # type: ignore[index]
        cut = float(self.teacher.native.to_model_timestep(torch.tensor(self.boundary, dtype=torch.float64)))
        return TimestepExperts.from_experts([semantic, detail], [cut])

    def plan(self) -> dict[int, SamplingPlan]:
        from ..export.stock import plans_for

        return plans_for(self.teacher, self.cfg.plan_steps, 0.0, self.cfg.plan_times, self.split_times)

    def split_times(self, n: int) -> list[float]:
        """ceil(n / 2) semantic times from t_max down to the boundary, then floor(n / 2) detail times from the
        boundary itself down, uniform in unshifted time within each phase (deterministic Euler, gamma 0)."""
        if self.single:  # one phase: n times uniform in unshifted time
            u = [1 - k / n for k in range(n)]
        else:
            u_b = self.cfg.boundary_index / self.cfg.num_euler_timesteps
            high, low = math.ceil(n / 2), n // 2
            u = [1 - k * (1 - u_b) / high for k in range(high)] + [u_b - k * u_b / low for k in range(low)]
        grid = Flow(shift=self.cfg.shift)
        return [float(t) for t in grid.shift_time(torch.tensor(u, dtype=torch.float64))]
