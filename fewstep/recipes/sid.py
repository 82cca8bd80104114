"""SiD, few-step: data-free score identity distillation (Zhou et al. 2024; few-step, Zhou et al. 2025).

The generator starts as the teacher and samples with an n-step plan (predict x0, re-noise with fresh noise). Each
iteration (SiD Alg. 1 with the few-step uniform mixture), in two turns as SiD's loops do (``turns``):
  k ~ U{0..n-1}: x0_G = G(x_{t_k}, t_k) with x_{t_k} from the generator's own first k steps (no gradient)
  fake score:  denoising score matching on sg(x0_G) (``dmd.fake_score_loss``), then an optimizer step
  generator:   fresh x0_G (graph kept), t ~ U[t_min, t_max], x_t = alpha_t x0_G + sigma_t eps, x0_real and x0_fake
               at x_t from the updated fake,
               loss = (x0_real - x0_fake) . ((x0_real - x0_G) - alpha (x0_real - x0_fake)) / mean|x0_G - x0_real|
No image is read: batches give conditions only (and real x0 to the optional Diffusion-GAN term).
``fake_per_step`` (ours) keeps one fake score per step k, trained on and read for step k's outputs only: one fake of
the mixture matches only the mixture, and on digits its sharp last step made up for its blurry first one (noisy).

Guidance (``guidance_mode``; every scale in Ho-Salimans form x0_u + w (x0_c - x0_u)). Each mode trains the fake score
at the scale the generator loss reads it at, so the branch that is read learns the generator's distribution:
  "cfg":  teacher at w = ``guidance``, fake conditional (w = 1) when read and trained. Guides the teacher only:
          fewstep's mode (DMD2's setting), not SiD-LSG's, whose fake is guided too;
  "lsg":  long-short guidance (SiD-LSG, mingyuanzhou/SiD-LSG training/sid_training_loop.py): the fake trained at
          kappa1 (cfg_train_fake), read at kappa2 = kappa3 (cfg_eval_fake), the teacher read at kappa4
          (cfg_eval_real); SiD-LSG's scripts and released checkpoints set all four equal;
  "zero": Zero-CFG (Zhou et al. 2025), teacher conditional without guidance, fake unconditional (read and trained
          with the condition removed);
  "anti": Anti-CFG (Zhou et al. 2025), teacher conditional, fake read and trained at the negative scale
          ``anti_guidance``: its DSM loss regresses the guided combination, so both branches learn, as SiD-LSG
          trains its guided fake.
SiD-LSG also replaces 10% of the prompts by the empty one in the fake's step whenever kappa1 or kappa2 != 1 (the
generator then makes those samples unconditionally); fewstep does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from .. import batch_random
from ..errors import FewstepError
from ..objectives.adversarial import TeacherDiscriminator, discriminator_times, score_gan_losses
from ..objectives.dmd import Weighting, fake_score_loss, fake_score_networks, sid_generator_loss, uniform_times
from ..objectives.generator import FewStepGenerator, generator_plans, student_network, weights_problem
from ..sampling import SamplingPlan, plan_state
from ..teacher import Denoiser
from ..training.data import DataConfig
from ..training.trainer import TrainConfig
from .base import Batch, OptimizerSpec, Recipe

GuidanceMode = Literal["cfg", "lsg", "zero", "anti"]
GUIDANCE_MODES: tuple[str, ...] = get_args(GuidanceMode)


@dataclass(frozen=True)
class SiDConfig:
    # SiD's alpha: 1.2 is SiD's (ICML 2024) value on its EDM models (mingyuanzhou/SiD run_sid.sh: CIFAR-10, ImageNet
    # 64, FFHQ); SiD-LSG's Stable Diffusion scripts use 1 (mingyuanzhou/SiD-LSG run_sid.sh), as the sd3 preset does
    alpha: float = 1.2
    train_steps: int = 4  # the generator's n: the uniform mixture is over these steps (few-step SiD)
    plan_steps: tuple[int, ...] = (1, 2, 4)  # exported plans (1 and 2 reuse times of the 4-step plan)
    # "stock": the times the teacher pipeline's stock scheduler visits for n steps (export/stock.py), so the export
    # samples in plain diffusers; "recipe": the teacher's n-step Euler times (uniform in unshifted time),
    # exported with FewStepScheduler where no stock scheduler runs them
    plan_times: Literal["stock", "recipe"] = "stock"
    gamma: float = 1.0  # re-noising between steps: fresh noise (x_{t_k+1} = alpha x0_G + sigma z)
    guidance_mode: GuidanceMode = "cfg"
    guidance: float = 1.0  # the teacher's scale in "cfg" mode (1: no guidance, the digits presets' setting)
    # long-short guidance ("lsg"), SiD-LSG's flags (sid_train.py; Ho-Salimans scales, any real value): run_sid.sh sets
    # all of them to 2 for SD 1.5 and 2.1-base; its README's released checkpoints use 1.5, 2, 3 or 4.5 for all four
    kappa1: float = 2.0  # the fake score is trained at this scale (cfg_train_fake)
    kappa2: float = 2.0  # the fake score is read at this scale (cfg_eval_fake: kappa2 = kappa3, one read in its code)
    kappa4: float = 2.0  # the teacher is read at this scale (cfg_eval_real)
    anti_guidance: float = -1.0  # the fake score's scale in "anti" mode (ours; the paper's value is not public)
    lr: float = 1e-5  # the generator (SiD-LSG: 1e-6 for SD at batch 512+); presets set their own
    fake_lr: float = 1e-5  # the fake score (SiD trains both at one lr)
    betas: tuple[float, float] = (0.0, 0.999)  # SiD's Adam betas for both networks
    fake_steps: int = 1  # fake-score steps per generator step (SiD alternates 1:1)
    # ours, not SiD's: one fake score per generation step k, trained on the k-th step's outputs only and read by that
    # step's generator loss, so that each step's outputs match the data and not only their uniform mixture. With one
    # fake score of the mixture a sharper step can make up for a blurrier one (on digits the 4-step mixture's last
    # step ends noisy: diversity above the data's). Costs n fake networks; each learns from 1/n of the batch
    fake_per_step: bool = False
    # ours, not SiD's: relative weights of drawing step k = 0..n-1 for the generator loss (and, with one fake score,
    # for the mixture it models); empty: uniform, SiD's. With ``fake_per_step`` the mixture's weights no longer set
    # the target (each step matches the data by itself), so they only share the generator's updates among the steps
    step_weights: tuple[float, ...] = ()
    fake_lora_rank: int = 0  # 0: the fake score is a full copy of the teacher
    fake_weighting: Weighting = "eps"  # SiD trains the fake score with the teacher's own DSM weighting
    lora_rank: int = 0  # > 0: the generator is a LoRA on the teacher (exported as LoRA weights)
    t_min: float = 0.02  # generator-loss times uniform over this fraction of the teacher's range (SiD-LSG: 20..980)
    t_max: float = 0.98
    # the Diffusion-GAN term on the mixture's x0 against real x0 (needs real images): heads on the fake score's own
    # features, trained with it (SiDA, Zhou et al. 2024; DMD2's classifier branch); 0 = off (data-free)
    adv_weight: float = 0.0  # the generator's GAN weight (DMD2: gen_cls_loss_weight 3e-3 to 1e-2)
    adv_critic_weight: float = 1e-2  # the critic's, added to the fake score's loss (DMD2: guidance_cls_loss_weight)
    adv_block_every: int = 1  # read every k-th block of the fake score
    # the discriminator's log-normal re-noising time, SANA-Sprint's LADD numbers: exp(N(-0.6, 1)) is sigma for data of
    # std adv_p_sigma_data (0.5 there), a noise-to-signal ratio exp(N) / 0.5 on the data as given
    adv_p_mean: float = -0.6
    adv_p_std: float = 1.0
    adv_p_sigma_data: float = 0.5
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


class SiD(Recipe):
    name = "sid"
    paper: ClassVar[str] = "SiD, few-step score identity distillation (Zhou et al. 2024, 2025)"
    Config: ClassVar[type] = SiDConfig

    def __init__(self, teacher: Denoiser, cfg: SiDConfig = SiDConfig()):
        if cfg.train_steps not in cfg.plan_steps:
            raise FewstepError(f"sid: train_steps {cfg.train_steps} must be one of plan_steps {cfg.plan_steps}")
        if cfg.fake_steps < 1:
            raise FewstepError("sid: fake_steps must be at least 1")
        if cfg.step_weights and (problem := weights_problem(cfg.step_weights, cfg.train_steps)):
            raise FewstepError(f"sid: step_weights {list(cfg.step_weights)} {problem} (one per step of train_steps)")
        if cfg.guidance_mode not in GUIDANCE_MODES:
            raise FewstepError(f"sid: unknown guidance_mode {cfg.guidance_mode!r} ({', '.join(GUIDANCE_MODES)})")
        self.cfg = cfg
        self.teacher = teacher
        teacher.model.requires_grad_(False).eval()
        self.generator = FewStepGenerator(
            teacher,
            student_network(teacher.model, cfg.lora_rank),
            generator_plans(teacher, cfg.plan_steps, cfg.gamma, cfg.plan_times),
        )
        if cfg.fake_per_step and cfg.adv_weight > 0:
            raise FewstepError("sid: fake_per_step does not combine with the GAN term (adv_weight > 0)")
        fake_models, fake_model = fake_score_networks(
            teacher.model, cfg.fake_lora_rank, cfg.train_steps if cfg.fake_per_step else 1
        )
        self.fakes = [teacher.with_model(m) for m in fake_models]
        self.fake = self.fakes[0]
        self.disc = TeacherDiscriminator(self.fake, cfg.adv_block_every) if cfg.adv_weight > 0 else None
        heads = {} if self.disc is None else {"heads": self.disc.heads}
        self.fake_nets = nn.ModuleDict({"model": fake_model, **heads}) if heads else fake_model

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.generator.model, "fake": self.fake_nets}

    def optimizer(self, name: str) -> OptimizerSpec:
        lr = self.cfg.fake_lr if name == "fake" else self.cfg.lr
        return OptimizerSpec(lr=lr, betas=self.cfg.betas)

    def guidance_scales(self) -> tuple[float, float, float]:
        """(teacher read, fake read, fake trained): the Ho-Salimans scales of the configured guidance mode."""
        cfg = self.cfg
        return {
            "cfg": (cfg.guidance, 1.0, 1.0),
            "lsg": (cfg.kappa4, cfg.kappa2, cfg.kappa1),
            "zero": (1.0, 0.0, 0.0),
            "anti": (1.0, cfg.anti_guidance, cfg.anti_guidance),
        }[cfg.guidance_mode]

    def scores(self, batch: Batch, k: int = 0) -> tuple[Any, Any]:
        """(real, fake) as (x_t, t) -> x0, as the generator loss of step k reads them."""
        c, u = batch.cond, batch.uncond
        real_w, fake_w, _ = self.guidance_scales()
        fake_k = self.fakes[k if self.cfg.fake_per_step else 0]
        real = lambda x, t: self.teacher.guided(x, t, c, u, real_w)  # noqa: E731
        fake = lambda x, t: fake_k.guided(x, t, c, u, fake_w)  # noqa: E731
        return real, fake

    def turns(self, batch: Batch, step: int) -> Iterator[dict[str, Tensor]]:
        """SiD's order (mingyuanzhou/SiD-LSG training/sid_training_loop.py, as SiD's EDM loop): the fake score steps
        first, on the generator's detached samples; the generator's loss then reads the updated fake score on fresh
        samples. (Both from one sample at the same weights, the first generator gradient is exactly zero, as the fake
        starts as the teacher, and Adam turns its rounding into a step.)"""
        if batch.x0 is None:
            raise FewstepError(
                "sid needs a batch shape: x0 (real or teacher samples) gives it; their values are unused"
            )
        yield {"fake": self.fake_loss(batch)}
        if step % self.cfg.fake_steps == 0:
            yield {"student": self.generator_loss(batch)}

    def loss(self, batch: Batch, step: int) -> dict[str, Tensor]:
        """Both turns at the current weights (the Trainer steps the fake score in between: ``turns``)."""
        return {name: value for turn in self.turns(batch, step) for name, value in turn.items()}

    def _sample(self, batch: Batch) -> tuple[int, Tensor]:
        """(k, x0_G) of the mixture: the generator's k-th step, k ~ U{0..n-1} (or drawn by ``step_weights``), from its
        own first k steps."""
        assert batch.x0 is not None
        plan, k = self.generator.draw([self.cfg.train_steps], self.cfg.step_weights or None)
        return k, self.generator.sample(batch.cond, batch_random.randn_like(batch.x0), plan, k)[2]

    def _trajectory(self, batch: Batch) -> list[Tensor]:
        """x0_G of every step of one run of the n-step plan (n forwards, without gradient)."""
        assert batch.x0 is not None
        plan, outputs = self.generator.plans[self.cfg.train_steps], []
        denoise = self.generator.bind(batch.cond)

        def recorded(x: Tensor, t: Tensor) -> Tensor:
            outputs.append(denoise(x, t))
            return outputs[-1]

        with torch.no_grad():
            x = plan_state(recorded, plan, batch_random.randn_like(batch.x0), plan.steps - 1)
            recorded(x, torch.full((x.shape[0],), plan.times[-1], dtype=x.dtype, device=x.device))
        return outputs

    def fake_loss(self, batch: Batch) -> Tensor:
        """DSM of the fake score on detached mixture samples, at its training scale (SiD-LSG's kappa1): the guided
        combination is what is regressed, so every branch that is read gets trained. With the GAN term, plus the
        critic's loss (its heads ride on the fake score's features). ``fake_per_step``: one run of the n-step plan,
        and fake k learns step k's outputs on the batch's rows k, k + n, ... (so n fakes cost one full-batch DSM
        pass; where a process's slice divides by n, its rows are the same rows of the global batch), summed."""
        cfg, native = self.cfg, self.teacher.native
        w = self.guidance_scales()[2]
        with torch.no_grad():
            samples = self._trajectory(batch) if cfg.fake_per_step else [self._sample(batch)[1]]
        parts = batch.interleaved([1] * len(samples), "sid: fake_per_step")
        t_f = uniform_times(native, samples[0].shape[0], cfg.t_min, cfg.t_max)
        eps = batch_random.randn_like(samples[0])
        losses = []
        for fake_k, x0_G, (rows, part) in zip(self.fakes, samples, parts, strict=True):
            fake_train = lambda x, t, f=fake_k, c=part: f.guided(x, t, c.cond, c.uncond, w)  # noqa: E731
            losses.append(
                fake_score_loss(x0_G[rows], t_f[rows], native, fake_train, eps=eps[rows], weighting=cfg.fake_weighting)
            )
        loss = torch.stack(losses).sum()
        if self.disc is not None:
            loss = loss + cfg.adv_critic_weight * self._gan(samples[0], batch)[1]
        return loss

    def generator_loss(self, batch: Batch) -> Tensor:
        """SiD's generator loss on fresh mixture samples, graph kept through x0_G into both scores' inputs."""
        cfg, native = self.cfg, self.teacher.native
        k, x0_G = self._sample(batch)
        real, fake = self.scores(batch, k)
        t = uniform_times(native, x0_G.shape[0], cfg.t_min, cfg.t_max)
        x_t = native.add_noise(x0_G, batch_random.randn_like(x0_G), t)
        loss = sid_generator_loss(x0_G, real(x_t, t), fake(x_t, t), cfg.alpha)
        if self.disc is not None:
            loss = loss + cfg.adv_weight * self._gan(x0_G, batch)[0]
        return loss

    def _gan(self, x0_G: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        assert self.disc is not None and batch.x0 is not None
        cfg = self.cfg
        t_d = discriminator_times(
            self.teacher.native, x0_G.shape[0], cfg.adv_p_mean, cfg.adv_p_std, cfg.adv_p_sigma_data
        )
        return score_gan_losses(self.disc, x0_G, batch.x0, t_d, batch.cond)

    @property
    def is_lora(self) -> bool:
        return self.cfg.lora_rank > 0

    def plan(self) -> dict[int, SamplingPlan]:
        return self.generator.plans
