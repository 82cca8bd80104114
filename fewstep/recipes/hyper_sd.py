"""Hyper-SD: trajectory-segmented consistency distillation, one LoRA for every step count (Ren et al. 2024).

ByteDance published weights only; what is known of the method is in ../shared/RECIPES.md. This module follows the
paper's description and, where it is silent, the public code it names as its basis: PCM's multiphase consistency
distillation and its adversarial term (G-U-N/Phased-Consistency-Model), and the progressive segment schedule of
the only public TSCD code (rootonchair/consistency_models_distill ``tscd/``).

TSCD (Sec. 3.1), in the teacher's own time t. Training runs through stages of k = 8 -> 4 -> 2 -> 1 segments, each
starting from the last one's weights (``segments``, ``stage_steps``). In a stage of k segments, each step:
  t = t_{n+1} > s = t_n: neighbours of LCM's N-point skipping grid (``lcm.skipping_grid``),
  e = the lower edge of t's segment (edges uniform in the unshifted time; ``consistency.segment_edges``), s >= e,
  x_t = alpha_t x0 + sigma_t eps,   x_s = one DDIM step of the guided teacher ODE from t to s,
  f(x, t -> e) = alpha_e x0_theta + sigma_e eps_theta: the DDIM jump to the edge (PCM's multiphase prediction),
  loss = ||f_theta(x_t, t -> e) - sg f_target(x_s, s -> e)||^2 (the plain distance of the early stages),
with the target the student itself without gradient for the LoRA (LCM-LoRA's and PCM-LoRA's rule), an EMA copy for
a full student. In the stages with k <= ``adv_segments`` (the paper: the last two), PCM's adversarial consistency
term joins: hinge heads on frozen teacher features score the student's edge point against the target's, both
carried further along the forward process to a shared time (``adversarial.ladd_losses`` with ``t_from``).

The final k = 1 stage makes f(x, t -> t_min) an x0 predictor at every t, which TCD's sampler (Zheng et al. 2024) runs
at any step count with its gamma: on VP teachers by TCD's own rule, exported as stock TCDScheduler (eta = gamma per
step count, in the model card); elsewhere by ``sampling.renoise``'s, exported in FewStepScheduler.

Two optional stages follow, each keeping the last TSCD loss beside its own term so that quality does not drift (in
score distillation weighted by ``dmd_tscd_weight``, 0 dropping it):
  feedback (Sec. 3.2; ReFL, Xu et al. 2023): - reward_weight r(x0_theta(x_t_j, t_j), c), x_t_j a late state of the
      student's own ``reward_plan_steps`` sampler reached without gradient (``objectives/reward.py``; on digits a
      scorer apart from the bench's evaluator);
  score distillation (Sec. 3.3; DMD, Yin et al. 2024): dmd_weight 1/2 ||x0_G - sg(x0_G - grad)||^2 on the one-step
      sample x0_G = f(z, t_max -> t_min), with a fake score trained on x0_G (``objectives/dmd.py``); with
      ``dmd_plans`` (ours) on the last x0 of each listed sampler instead, one fake score per sampler if
      ``dmd_fake_per_plan``: on digits the one-step-only stage pulls the LoRA away from 8 steps. ``dmd_adv_weight``
      (ours) adds DMD2's GAN on real data beside it (Yin et al. 2024b, Sec. 4.4): heads on frozen teacher features,
      or, with ``dmd_adv_features = "fake"``, DMD2's own classifier on each fake score's features, trained with it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .. import batch_random
from ..errors import FewstepError
from ..objectives.adversarial import TeacherDiscriminator, discriminator_times, ladd_losses, score_gan_losses
from ..objectives.consistency import segment_edge, segment_edges, segment_output, teacher_ode_step
from ..objectives.dmd import Weighting, distribution_matching_loss, fake_score_loss, fake_score_networks, uniform_times
from ..objectives.losses import mean_per_sample
from ..objectives.reward import RewardModel, load_reward
from ..sampling import SamplingPlan, euler_times, plan_state, plan_states
from ..teacher import Denoiser
from ..training.data import DataConfig
from ..training.lora import LORA_TARGETS, add_lora, lora_targets
from ..training.trainer import TrainConfig, ema_update
from .base import Batch, OptimizerSpec, Recipe
from .lcm import skipping_grid


@dataclass(frozen=True)
class HyperSDConfig:
    num_ddim_timesteps: int = 50  # the teacher's skipping grid (PCM and rootonchair's TSCD: 50 DDIM steps)
    segments: tuple[int, ...] = (8, 4, 2, 1)  # k per TSCD stage, progressively fewer (Hyper-SD Sec. 3.1)
    stage_steps: tuple[int, ...] = (1000, 1000, 1000, 1000)  # iterations per stage (not published; the last runs on)
    # stages with k <= adv_segments add the adversarial consistency term: Hyper-SD uses the MSE for k = 8, 4 and the
    # adversarial loss for k = 2, 1
    adv_segments: int = 2
    adv_weight: float = 0.1  # PCM's adv_weight
    # the distance loss's weight in the adversarial stages: 1 keeps it beside the adversarial term, as PCM's
    # ``_adv`` scripts add the two; 0 leaves the adversarial term alone, as Hyper-SD's wording reads
    adv_distance_weight: float = 1.0
    adv_lr: float = 1e-5  # the discriminator heads (PCM's discriminator learning rate)
    adv_block_every: int = 1  # read every k-th teacher block
    # re-noising of both edge points for the critic: log-normal in the noise-to-signal ratio, as LCM's PCM term
    adv_p_mean: float = -0.6
    adv_p_std: float = 1.0
    adv_p_sigma_data: float = 0.5
    w_min: float = 3.0  # teacher guidance w ~ U[w_min, w_max] (rootonchair's TSCD: 3 to 15); no w-embedding
    w_max: float = 15.0
    lora_rank: int = 64  # > 0: the student is a LoRA on the teacher (Hyper-SD ships LoRAs); 0: full fine-tuning
    # ours: layer-name suffixes adapted beside the LCM-LoRA set (``training.lora.LORA_TARGETS``), e.g. a DiT's
    # time modulation ("norm1.linear", "proj_out_1"), the transformer's counterpart of the UNet's time_emb_proj
    lora_extra_targets: tuple[str, ...] = ()
    lr: float = 1e-6  # PCM-LoRA's learning rate on SD1.5 is 5e-6; presets set their own
    betas: tuple[float, float] = (0.9, 0.999)
    target_ema: float = 0.95  # the EMA target's rate (LCM's mu)
    # the LoRA student's target: "self", the student without gradient (LCM-LoRA's and PCM-LoRA's rule), or "ema", an
    # EMA copy as a full student has (ours: a copy of the adapted network, trading memory for a target that lags)
    lora_target: Literal["self", "ema"] = "self"
    plan_steps: tuple[int, ...] = (1, 2, 4, 8)
    # "stock": the times the teacher pipeline's stock scheduler visits for n steps; "recipe": the k = n segment
    # edges (t_max and the n - 1 inner edges)
    plan_times: Literal["stock", "recipe"] = "stock"
    # TCD's gamma (its eta) in the exported scheduler: Hyper-SD's card runs its unified LoRA with TCDScheduler and
    # eta 0.3 to 1 (lower for more steps)
    gamma: float = 0.3
    # one gamma per plan_steps entry, overriding ``gamma`` (Hyper-SD's card picks TCD's eta by step count); () keeps
    # ``gamma`` for all. Exported in FewStepScheduler's ``gammas`` and stated per step count in the model card
    plan_gammas: tuple[float, ...] = ()
    # how gamma picks TCD's intermediate time (``sampling.RULES``): "tcd", TCDScheduler's own rule, on VP teachers, so
    # that the plans export as stock TCDScheduler run with eta = gamma, as Hyper-SD's card runs its LoRAs; "ratio",
    # fewstep's schedule-free rule (flow teachers always take it: no stock scheduler runs TCD on a flow)
    renoise: Literal["tcd", "ratio"] = "tcd"
    # the human-feedback stage (Sec. 3.2), after the TSCD stages: ReFL (Xu et al. 2023) on the student's one-step x0
    # at late times of its own sampler, the last TSCD stage's loss kept beside it as the regularizer
    # the reward model (``objectives.reward.load_reward``): "digits", a scorer folder, or "aesthetic:HEAD" (a
    # LAION-style aesthetic head on CLIP image embeddings of the decoded x0, Hyper-SD's text-to-image reward); "" or
    # reward_steps 0: no such stage
    reward: str = ""
    reward_clip: str = ""  # the open_clip ARCH:CHECKPOINT an aesthetic head reads (local weights)
    reward_steps: int = 0
    reward_weight: float = 0.1
    reward_plan_steps: int = 8  # the student's plan whose late states feed the reward (ReFL's denoising to step t)
    reward_late: float = 0.5  # "late": plan times at or below this fraction of the teacher's range
    # the score-distillation stage (Sec. 3.3) for one step, last: DMD (Yin et al. 2024) on the student's one-step
    # samples from pure noise against a fake score trained on them, the last TSCD stage's loss kept beside it
    dmd_steps: int = 0
    dmd_weight: float = 1.0
    # ours: the student's learning rate in the score-distillation stage (0: ``lr``, one rate for every stage)
    dmd_lr: float = 0.0
    fake_lr: float = 1e-5
    fake_lora_rank: int = 0  # 0: the fake score is a full copy of the teacher
    fake_weighting: Weighting = "v"  # the fake score's denoising weight (``dmd.fake_score_loss``)
    dmd_t_min: float = 0.02  # DMD2's [20, 980] of 1000
    dmd_t_max: float = 0.98
    # the step counts (of plan_steps) whose samples the score-distillation stage matches to the teacher: (1,), the
    # one-step sample from pure noise, is Hyper-SD Sec. 3.3's. More (ours, not the paper's): the batch's rows j, j + m,
    # ... take the j-th entry's sampler, run without gradient to its last time (backward simulation, DMD2 Sec. 4.5,
    # with the exported plan's times, gamma and rule), and its last x0 with gradient, so every step count the LoRA is
    # sampled at is pulled toward the teacher's distribution and not only the one step the others pay for
    dmd_plans: tuple[int, ...] = (1,)
    # ours: one fake score per dmd_plans entry, trained on and read for that sampler's outputs only (SiD's
    # fake_per_step finding in fewstep: a fake score of the mixture lets one step count make up for another)
    dmd_fake_per_plan: bool = False
    # ours: rows per cycle of the batch for each dmd_plans entry (the batch is dealt round a cycle of dmd_plan_rows[j]
    # rows to sampler j); () gives each one row, the even split
    dmd_plan_rows: tuple[int, ...] = ()
    # fake-score steps per student step in the score-distillation stage (DMD2's two time-scale update rule, its
    # dfake_gen_update_ratio; 1 alternates, as the paper's DMD does); the other steps train the fake score alone
    fake_steps: int = 1
    # the last TSCD loss's weight beside DMD in the score-distillation stage (ours): 1 keeps it as the regularizer
    # the module docstring describes; 0 leaves DMD alone and skips the TSCD forwards (about a quarter of the stage's
    # time on digits)
    dmd_tscd_weight: float = 1.0
    # ours: DMD2's GAN branch (Yin et al. 2024b, Sec. 4.4) beside DMD in the score-distillation stage, with this
    # recipe's discriminator (hinge heads on frozen teacher features, as LADD's, re-noised at ``adv_p_*`` times)
    # scoring each sampler's x0_G against the batch's real x0; its critic steps at every iteration of the stage, fake-
    # only ones included, as DMD2's classifier steps with the fake score. 0: DMD alone (the paper's Sec. 3.3)
    dmd_adv_weight: float = 0.0
    # the GAN's features: "teacher", the frozen teacher's, as above; "fake", DMD2's own classifier (its
    # sd_guidance.py, cls_pred_branch on the fake UNet's bottleneck): heads on each sampler's fake score's blocks,
    # non-saturating logistic losses (``adversarial.score_gan_losses``), the critic's loss times
    # ``dmd_adv_critic_weight`` (DMD2's guidance_cls_loss_weight, 1e-2) added to that fake's denoising loss, so that
    # the heads and the fake score's backbone train together at ``fake_lr``
    dmd_adv_features: Literal["teacher", "fake"] = "teacher"
    dmd_adv_critic_weight: float = 1e-2
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


class HyperSD(Recipe):
    name = "hyper_sd"
    paper: ClassVar[str] = "Hyper-SD, trajectory-segmented consistency distillation (Ren et al. 2024)"
    Config: ClassVar[type] = HyperSDConfig

    def __init__(self, teacher: Denoiser, cfg: HyperSDConfig = HyperSDConfig()):
        if not cfg.segments or len(cfg.stage_steps) != len(cfg.segments):
            raise FewstepError(
                f"hyper_sd: one stage_steps entry per segments entry, got {cfg.segments} and {cfg.stage_steps}"
            )
        if any(k < 1 for k in cfg.segments) or list(cfg.segments) != sorted(cfg.segments, reverse=True):
            raise FewstepError(f"hyper_sd: segments must be positive and non-increasing, got {cfg.segments}")
        if cfg.w_min > cfg.w_max:
            raise FewstepError(f"hyper_sd: w_min {cfg.w_min} > w_max {cfg.w_max}")
        if not 0 <= cfg.gamma <= 1:
            raise FewstepError(f"hyper_sd: gamma must lie in [0, 1], got {cfg.gamma}")
        if cfg.plan_gammas and len(cfg.plan_gammas) != len(cfg.plan_steps):
            raise FewstepError(
                f"hyper_sd: one plan_gammas entry per plan_steps entry, got {cfg.plan_gammas} for {cfg.plan_steps}"
            )
        self.cfg = cfg
        self.teacher = teacher
        teacher.model.requires_grad_(False).eval()
        if cfg.lora_rank > 0:
            found = lora_targets(teacher.model, cfg.lora_extra_targets)  # one walk of the model for all of them
            unknown = [t for t in cfg.lora_extra_targets if t not in found]
            if unknown:
                raise FewstepError(f"hyper_sd: lora_extra_targets {unknown} name no Linear or Conv2d layer")
            targets = LORA_TARGETS + tuple(t for t in cfg.lora_extra_targets if t not in LORA_TARGETS)
            self.model = add_lora(copy.deepcopy(teacher.model), cfg.lora_rank, suffixes=targets).eval()
            # the student itself, without gradient, or an EMA copy of it
            self.target_model = (
                self.model if cfg.lora_target == "self" else copy.deepcopy(self.model).requires_grad_(False)
            )
        else:
            self.model = copy.deepcopy(teacher.model).requires_grad_(True).eval()
            self.target_model = copy.deepcopy(self.model).requires_grad_(False)
        self.student = teacher.with_model(self.model)
        self.target = teacher.with_model(self.target_model)
        self.grid = skipping_grid(teacher.native, cfg.num_ddim_timesteps)  # t_max ... t_min, descending
        self.edges = {k: segment_edges(teacher.native, k) for k in set(cfg.segments)}
        # (kind, k, iterations) per stage: the TSCD stages, then feedback and score distillation where configured
        last = cfg.segments[-1]
        self.stages = [("tscd", k, n) for k, n in zip(cfg.segments, cfg.stage_steps, strict=True)]
        self.reward: RewardModel | None = None
        if cfg.reward and cfg.reward_steps > 0:
            # a missing reward model fails here, before any training
            self.reward = load_reward(cfg.reward, cfg.reward_clip, teacher.decode)
            self.stages.append(("reward", last, cfg.reward_steps))
        elif cfg.reward_steps > 0:
            raise FewstepError(
                "hyper_sd: reward_steps > 0 needs a reward model (reward = 'digits', a folder or 'aesthetic:HEAD')"
            )
        self.fakes: list[Denoiser] = []
        self.fake_nets: nn.Module | None = None
        if not cfg.dmd_plans or (missing := set(cfg.dmd_plans) - set(cfg.plan_steps)):
            what = "is empty" if not cfg.dmd_plans else f"has {sorted(missing)}, not in plan_steps {cfg.plan_steps}"
            raise FewstepError(f"hyper_sd: dmd_plans {what}")
        if cfg.fake_steps < 1:
            raise FewstepError(f"hyper_sd: fake_steps must be at least 1, got {cfg.fake_steps}")
        if cfg.dmd_plan_rows and len(cfg.dmd_plan_rows) != len(cfg.dmd_plans):
            raise FewstepError(
                f"hyper_sd: one dmd_plan_rows entry per dmd_plans entry, got {cfg.dmd_plan_rows} for {cfg.dmd_plans}"
            )
        if cfg.dmd_steps > 0:
            count = len(cfg.dmd_plans) if cfg.dmd_fake_per_plan else 1
            fakes, self.fake_nets = fake_score_networks(teacher.model, cfg.fake_lora_rank, count)
            self.fakes = [teacher.with_model(f) for f in fakes]
            self.stages.append(("dmd", last, cfg.dmd_steps))
        self.dmd_samplers = self.plan() if cfg.dmd_steps > 0 else {}  # the exported samplers DMD draws through
        self.stage_ends = list(accumulate(n for _, _, n in self.stages))
        adv = cfg.adv_weight > 0 and any(k <= cfg.adv_segments for _, k, _ in self.stages)
        gan = cfg.dmd_steps > 0 and cfg.dmd_adv_weight > 0
        adv = adv or (gan and cfg.dmd_adv_features == "teacher")
        self.disc = TeacherDiscriminator(teacher, cfg.adv_block_every) if adv else None
        # DMD2's classifier: one set of heads per fake score, trained in the fake scores' group
        self.fake_discs: list[TeacherDiscriminator] = []
        if gan and cfg.dmd_adv_features == "fake":
            assert self.fake_nets is not None  # dmd_steps > 0 built them
            self.fake_discs = [TeacherDiscriminator(f, cfg.adv_block_every) for f in self.fakes]
            heads = nn.ModuleList(d.heads for d in self.fake_discs)
            self.fake_nets = nn.ModuleDict({"model": self.fake_nets, "heads": heads})

    def trainable(self) -> dict[str, nn.Module]:
        nets = {"student": self.model}
        if self.disc is not None:
            nets["critic"] = self.disc.heads
        if self.fake_nets is not None:
            nets["fake"] = self.fake_nets
        return nets

    def optimizer(self, name: str) -> OptimizerSpec:
        if name == "critic":
            return OptimizerSpec(lr=self.cfg.adv_lr, betas=(0.0, 0.99))
        if name == "fake":
            return OptimizerSpec(lr=self.cfg.fake_lr, betas=(0.0, 0.999))
        return OptimizerSpec(lr=self.cfg.lr, betas=self.cfg.betas)

    def lr_scale(self, name: str, step: int) -> float:
        """The student's rate in the score-distillation stage is ``dmd_lr`` where set; every other rate is as built."""
        if name == "student" and self.cfg.dmd_lr > 0 and self.stages[self.stage(step)][0] == "dmd":
            return self.cfg.dmd_lr / self.cfg.lr
        return 1.0

    def stage(self, step: int) -> int:
        """The stage of iteration ``step`` (an index of ``self.stages``): stage i runs from the sum of the earlier
        stages' iterations on; the last runs on."""
        return min(sum(step >= end for end in self.stage_ends), len(self.stages) - 1)

    def loss(self, batch: Batch, step: int) -> dict[str, Tensor]:
        if batch.x0 is None:
            raise FewstepError("hyper_sd needs x0 samples (real images, or teacher samples for image-free runs)")
        kind, k, _ = self.stages[self.stage(step)]
        cfg = self.cfg
        if not self.student_steps(step):  # DMD2's two time-scale rule: the fake score (and critic) steps alone
            return {name: v for name, v in self.dmd_losses(batch, student=False).items() if name in ("fake", "critic")}
        # at dmd_tscd_weight 0 score distillation runs DMD alone, without the TSCD forwards
        out = {} if kind == "dmd" and cfg.dmd_tscd_weight == 0 else self.tscd_loss(batch, k)
        if kind == "reward":
            out["student"] = out["student"] - cfg.reward_weight * self.late_reward(batch).mean()
        elif kind == "dmd":
            dmd = self.dmd_losses(batch)
            tscd = out.get("student", dmd["dmd"].new_zeros(()))
            out["student"] = cfg.dmd_tscd_weight * tscd + cfg.dmd_weight * dmd["dmd"]
            out["fake"] = dmd["fake"]
            if "generator" in dmd:
                out["student"] = out["student"] + cfg.dmd_adv_weight * dmd["generator"]
            if "critic" in dmd:
                out["critic"] = out.get("critic", 0) + dmd["critic"]
        return out

    def student_steps(self, step: int) -> bool:
        """Whether the student takes a step at iteration ``step``: always but in the score-distillation stage, where
        it steps at every ``fake_steps``-th iteration and the fake score at every one."""
        return self.stages[self.stage(step)][0] != "dmd" or step % self.cfg.fake_steps == 0

    def tscd_loss(self, batch: Batch, k: int) -> dict[str, Tensor]:
        """TSCD with k segments: the distance at the segment edge, and the adversarial consistency term for k <=
        ``adv_segments`` (the student's loss, and the critic's where it steps)."""
        cfg, native = self.cfg, self.teacher.native
        assert batch.x0 is not None
        x0 = batch.x0
        b = x0.shape[0]
        n = batch_random.randint(cfg.num_ddim_timesteps, (b,))
        t = self.grid[n].to(x0)
        e = segment_edge(t, self.edges[k])
        s = torch.maximum(self.grid[n + 1].to(x0), e)  # one teacher step, never past the segment's edge
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * batch_random.rand((b,))
        x_t = native.add_noise(x0, batch_random.randn_like(x0), t)
        with torch.no_grad():
            guidance: float | Tensor = cfg.w_min if cfg.w_min == cfg.w_max else w
            x_s = teacher_ode_step(self.teacher, x_t, t, s, batch.cond, batch.uncond, guidance)
            at_edge = (s == e).view(-1, *([1] * (x0.ndim - 1)))
            # f(x_s, s -> s) = x_s: the boundary condition (computed apart: at a flow teacher's t_min sigma is 0)
            target = torch.where(at_edge, x_s, segment_output(self.target, x_s, s, e, batch.cond))
        pred = segment_output(self.student, x_t, t, e, batch.cond)
        distance = mean_per_sample((pred.float() - target.float()) ** 2).mean()
        if self.disc is None or cfg.adv_weight == 0 or k > cfg.adv_segments:
            return {"student": distance}
        generator, critic = ladd_losses(self.disc, pred, target, self.disc_times(x0), batch.cond, t_from=e)
        return {"student": cfg.adv_distance_weight * distance + cfg.adv_weight * generator, "critic": critic}

    def disc_times(self, x: Tensor) -> Tensor:
        """(B,) re-noising times t_D of the discriminator for the rows of ``x`` (the ``adv_p_*`` proposal)."""
        cfg = self.cfg
        t_d = discriminator_times(self.teacher.native, x.shape[0], cfg.adv_p_mean, cfg.adv_p_std, cfg.adv_p_sigma_data)
        return t_d.to(x)

    def late_reward(self, batch: Batch) -> Tensor:
        """(B,) rewards of the student's one-step x0 from a late state of its own sampler (ReFL): the
        ``reward_plan_steps`` plan run without gradient from pure noise to a time drawn among its times at or below
        ``reward_late`` of the range, then one x0 prediction with gradient."""
        assert batch.x0 is not None and self.reward is not None
        native, cond = self.teacher.native, batch.cond
        times = euler_times(native, self.cfg.reward_plan_steps)[:-1]
        edge = native.t_min + self.cfg.reward_late * (native.t_max - native.t_min)
        late = [i for i, t in enumerate(times) if t <= edge]
        j = late[int(batch_random.randint(len(late), (1,))[0])] if late else len(times) - 1
        plan = SamplingPlan(native, tuple(times), self.cfg.gamma)
        denoise = lambda x, t: self.student(x, t, cond)  # noqa: E731
        with torch.no_grad():
            x = plan_state(denoise, plan, batch_random.randn_like(batch.x0), j)
        t = torch.full((x.shape[0],), times[j], dtype=x.dtype, device=x.device)
        return self.reward(denoise(x, t), cond)

    def dmd_losses(self, batch: Batch, student: bool = True) -> dict[str, Tensor]:
        """The score-distillation terms on the student's samples x0_G (DMD2's generator; the teacher guided at w_min):
        "dmd", the student's DMD loss, and "fake", the fake score's; with ``dmd_adv_weight`` also "generator" and
        "critic", the GAN's hinge losses of x0_G against the real x0 (with ``dmd_adv_features = "fake"``, no "critic":
        the classifier's loss is inside "fake"). With ``dmd_plans`` = (1,), x0_G = f(z, t_max ->
        t_min), the one-step sample; with m entries, the batch is dealt to the m samplers (``Batch.interleaved``: rows
        j, j + m, ... to the j-th, or by ``dmd_plan_rows``), and each part holds the last x0 of its sampler, matched
        by its own fake score with ``dmd_fake_per_plan``; every loss is the row-weighted mean, i.e. a mean over the
        batch. ``student=False``: a fake-score-only step (x0_G without gradient, "dmd" not computed and 0).

        The parts run as one batch wherever one network serves them all: the samplers' backward simulation
        (``sampling.plan_states``), the student's last outputs and the real score; the fake scores (one per sampler)
        and their classifiers run per part. Every draw is per part, so a sample's noise is the same on any number of
        processes."""
        assert batch.x0 is not None and self.fakes
        native, cfg = self.teacher.native, self.cfg
        b = batch.x0.shape[0]
        parts = batch.interleaved(cfg.dmd_plan_rows or [1] * len(cfg.dmd_plans), "hyper_sd: dmd_plans")
        plans = [self.dmd_samplers[n] for n in cfg.dmd_plans]
        sizes = [len(rows) for rows, _ in parts]
        joint = batch.rows(torch.cat([rows for rows, _ in parts]), b)  # the parts one after another
        assert joint.x0 is not None

        def student_on(xs: Sequence[Tensor], times: Sequence[float], which: Sequence[int]) -> list[Tensor]:
            """The student on the states of the samplers ``which`` (each at its own time), in one forward."""
            rows = batch.rows(torch.cat([parts[j][0] for j in which]), b)
            t = torch.cat([x.new_full((len(x),), tj) for x, tj in zip(xs, times, strict=True)])
            return list(self.student(torch.cat(list(xs)), t, rows.cond).split([len(x) for x in xs]))

        def fake(x: Tensor, t: Tensor) -> Tensor:
            """Each part's rows through its own fake score (one call when they share one)."""
            if not cfg.dmd_fake_per_plan:
                return self.fakes[0](x, t, joint.cond)
            pieces = zip(x.split(sizes), t.split(sizes), parts, self.fakes, strict=True)
            return torch.cat([f(xj, tj, part.cond) for xj, tj, (_, part), f in pieces])

        # every draw is per part, so that a sample's noise does not depend on the number of processes
        noises = [batch_random.randn_like(part.x0) for _, part in parts]  # type: ignore[arg-type]
        last = [p.steps - 1 for p in plans]
        with torch.no_grad():  # backward simulation of every sampler to its last time (none for one step)
            states = plan_states(student_on, plans, noises, last)
        with torch.set_grad_enabled(student):
            ends = [p.times[k] for p, k in zip(plans, last, strict=True)]
            x0_gen = torch.cat(student_on(states, ends, range(len(plans))))
        real = lambda x, t: self.teacher.guided(x, t, joint.cond, joint.uncond, cfg.w_min)  # noqa: E731

        def times() -> Tensor:  # DMD2's t for each part's rows, in the parts' order
            return torch.cat([uniform_times(native, n, cfg.dmd_t_min, cfg.dmd_t_max) for n in sizes]).to(x0_gen)

        def noise() -> Tensor:  # eps for each part's rows, in the parts' order
            eps = [batch_random.randn((n, *x0_gen.shape[1:]), dtype=x0_gen.dtype) for n in sizes]
            return torch.cat(eps).to(x0_gen.device)

        out = {"dmd": x0_gen.new_zeros(())}
        if student:
            out["dmd"] = distribution_matching_loss(x0_gen, times(), native, real, fake, eps=noise())[0]
        out["fake"] = fake_score_loss(x0_gen, times(), native, fake, eps=noise(), weighting=cfg.fake_weighting)
        if cfg.dmd_adv_weight == 0:
            return out
        # the GAN, per part: against the part's own real x0 (and, with DMD2's classifier, its own fake score's heads)
        disc = self.disc if not self.fake_discs else None
        zero = x0_gen.new_zeros(())
        gan = {"generator": zero} | ({"critic": zero} if disc is not None else {})
        for j, (x0_j, (_, part)) in enumerate(zip(x0_gen.split(sizes), parts, strict=True)):
            assert part.x0 is not None
            t_d = self.disc_times(x0_j)
            if disc is not None:
                generator, critic = ladd_losses(disc, x0_j, part.x0, t_d, part.cond)
                terms = {"generator": generator, "critic": critic}
            else:  # DMD2: the classifier's loss joins its fake score's
                i = j if cfg.dmd_fake_per_plan else 0
                generator, critic = score_gan_losses(self.fake_discs[i], x0_j, part.x0, t_d, part.cond)
                terms = {"generator": generator}
                out["fake"] = out["fake"] + sizes[j] / b * cfg.dmd_adv_critic_weight * critic
            gan = {name: total + sizes[j] / b * terms[name] for name, total in gan.items()}
        return out | gan

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self.target_model is not self.model and self.student_steps(step):
            ema_update(self.target_model, self.model.parameters(), self.cfg.target_ema)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.target_model is self.model else {"target": self.target_model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "target" in state:
            self.target_model.load_state_dict(state["target"])

    @property
    def is_lora(self) -> bool:
        return self.cfg.lora_rank > 0

    def plan(self) -> dict[int, SamplingPlan]:
        from ..export.stock import plans_for

        cfg, native = self.cfg, self.teacher.native
        plans = plans_for(self.teacher, cfg.plan_steps, cfg.gamma, cfg.plan_times,
                          lambda n: euler_times(native, n)[:-1], cfg.renoise)  # fmt: skip
        gammas = dict(zip(cfg.plan_steps, cfg.plan_gammas, strict=True)) if cfg.plan_gammas else {}
        return {n: dataclasses.replace(p, gamma=gammas.get(n, p.gamma)) for n, p in plans.items()}
