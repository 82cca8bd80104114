"""The Trainer: one explicit loop over a Recipe, on accelerate.

Per step: draw the batch (a pure function of the step, so data order survives a resume), ask the recipe for its
losses, back-propagate each loss into its own network only (``backward(inputs=...)``), clip, step those optimizers,
update the evaluation EMAs, let the recipe update its own targets. Non-finite losses or gradients skip the step;
``nan_patience`` of them in a row stop the run with a clear message. Checkpoints hold weights, EMAs, optimizers, the
grad scaler, the recipe's own state and every RNG stream, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import FewstepError
from ..recipes.base import Recipe
from .checkpoint import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    max_minutes: float | None = None  # wall-time budget; the run checkpoints and stops when it is spent
    batch_size: int = 128
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    grad_clip: float | None = 1.0
    gradient_checkpointing: bool = False  # recompute activations in backward, where the backbone supports it
    lr_warmup_steps: int = 0  # linear warm-up of every learning rate from 0
    lr_decay: Literal["constant", "cosine"] = "constant"  # cosine: down to 0 at max_steps
    ema_decay: float = 0.999  # bias-corrected (ema_decay_at): the EMA never holds the initial weights
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    nan_patience: int = 10
    seed: int = 0
    progress: bool = True
    tensorboard: bool = False


class DataStream:
    """Batches drawn from fixed tensors in a seeded per-epoch permutation; batch k depends only on k."""

    def __init__(self, tensors: Sequence[Tensor], batch_size: int, seed: int = 0):
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("DataStream needs tensors of one common length")
        self.tensors, self.batch_size, self.seed = tuple(tensors), batch_size, seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self.tensors[0]), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))}  # fmt: skip
        return self._perms[epoch]

    def batch(self, index: int) -> tuple[Tensor, ...]:
        n = len(self.tensors[0])
        positions = torch.arange(index * self.batch_size, (index + 1) * self.batch_size)
        idx = torch.stack([self._perm(int(p) // n)[int(p) % n] for p in positions])
        return tuple(t[idx] for t in self.tensors)


def ema_decay_at(decay: float, n: int) -> float:
    """The decay of the n-th EMA update (n >= 1) that makes the EMA the bias-corrected average of the trained weights,
    sum_i decay^(n-i) theta_i / sum_i decay^(n-i), as Adam corrects its moments: the first update copies, and a run cut
    short by its time budget exports no share of the initial (teacher) weights."""
    return 1.0 - (1.0 - decay) / (1.0 - decay**n)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _param_groups(net: torch.nn.Module, lr_by_prefix: dict[str, float]) -> list[dict[str, Any]]:
    """AdamW parameter groups: trainable parameters under each prefix at their own lr, the rest at the default."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    rest = [p for n, p in named if not any(n.startswith(k) for k in lr_by_prefix)]
    groups: list[dict[str, Any]] = [{"params": rest}]
    for prefix, lr in lr_by_prefix.items():
        groups.append({"params": [p for n, p in named if n.startswith(prefix)], "lr": lr})
    return [g for g in groups if g["params"]]


def enable_gradient_checkpointing(nets: Any) -> int:
    """Turn on diffusers' gradient checkpointing in every model inside ``nets`` that supports it; returns how many."""
    count = 0
    for net in nets:
        for module in net.modules():
            if getattr(module, "_supports_gradient_checkpointing", False) and hasattr(
                module, "enable_gradient_checkpointing"
            ):
                module.enable_gradient_checkpointing()
                count += 1
    return count


class Trainer:
    """Trains ``recipe`` into ``run_dir``; ``data`` gives the batch for a step (None for image-free recipes)."""

    def __init__(self, recipe: Recipe, cfg: TrainConfig, run_dir: Path, data: Callable[[int], Any] | None = None):
        from accelerate import Accelerator

        self.recipe, self.cfg, self.run_dir, self.data = recipe, cfg, Path(run_dir), data
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
        self.nets = recipe.trainable()
        if not self.nets:
            raise FewstepError(f"recipe {recipe.name!r} has nothing to train")
        self.optimizers = {}
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.nets.values())
        for name, net in self.nets.items():
            spec = recipe.optimizer(name)
            opt = torch.optim.AdamW(
                _param_groups(net, spec.lr_by_prefix), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                eps=spec.eps,
            )  # fmt: skip
            self.nets[name], self.optimizers[name] = self.accelerator.prepare(net, opt)
        self.base_lr = {name: [g["lr"] for g in opt.param_groups] for name, opt in self.optimizers.items()}
        self.ema = {
            name: copy.deepcopy(self.accelerator.unwrap_model(self.nets[name])).eval().requires_grad_(False)
            for name in recipe.ema()
        }
        self.step = 0
        self.skipped = 0
        self.history: list[dict[str, float]] = []

    def lr_factor(self, step: int) -> float:
        """Multiplier of every base learning rate at ``step``: linear warm-up, then constant or cosine to 0."""
        cfg = self.cfg
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        if cfg.lr_decay == "cosine":
            span = max(cfg.max_steps - cfg.lr_warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - cfg.lr_warmup_steps, span) / span))
        return 1.0

    # -----------------------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped": self.skipped,
            "history": self.history,
            "nets": {k: self.accelerator.unwrap_model(v).state_dict() for k, v in self.nets.items()},
            "ema": {k: v.state_dict() for k, v in self.ema.items()},
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "recipe": self.recipe.state_dict(),
            "rng": _rng_state(),
            "config": asdict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["nets"]) != set(self.nets):
            raise FewstepError(f"checkpoint trains {sorted(state['nets'])}, this recipe {sorted(self.nets)}")
        for name, net in self.nets.items():
            self.accelerator.unwrap_model(net).load_state_dict(state["nets"][name])
            self.optimizers[name].load_state_dict(state["optimizers"][name])
        for name, ema in self.ema.items():
            ema.load_state_dict(state["ema"][name])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.recipe.load_state_dict(state["recipe"])
        self.step, self.skipped, self.history = state["step"], state["skipped"], list(state["history"])
        _set_rng_state(state["rng"])

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.state_dict(), keep=self.cfg.keep_checkpoints)

    def resume(self, path: Path | None = None) -> Path:
        found, state = load_checkpoint(self.run_dir, path)
        self.load_state_dict(state)
        return found

    # -----------------------------------------------------------------------------------------------------------
    # The loop

    def _params(self, name: str) -> list[Tensor]:
        return [p for p in self.nets[name].parameters() if p.requires_grad]

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step (over ``grad_accum`` micro-batches); None when it was skipped as non-finite."""
        cfg = self.cfg
        stepping: set[str] = set()
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = self.data(self.step * cfg.grad_accum + micro) if self.data is not None else None
            with self.accelerator.autocast():
                losses = self.recipe.loss(batch, self.step)
            if unknown := set(losses) - set(self.nets):
                raise FewstepError(f"recipe {self.recipe.name!r} returned losses for unknown networks {unknown}")
            if not all(torch.isfinite(v.detach()).all() for v in losses.values()):
                self._skip()
                return None
            names = list(losses)
            for i, name in enumerate(names):  # each loss reaches only its own network
                retain = i + 1 < len(names)
                scaled = losses[name] / cfg.grad_accum
                self.accelerator.backward(scaled, inputs=self._params(name), retain_graph=retain)
                totals[name] = totals.get(name, 0.0) + float(losses[name].detach()) / cfg.grad_accum
            stepping |= set(names)
        for name in stepping:
            if cfg.grad_clip is not None:
                norm = self.accelerator.clip_grad_norm_(self._params(name), cfg.grad_clip)
                if not torch.isfinite(torch.as_tensor(norm)):
                    self._skip()
                    return None
        factor = self.lr_factor(self.step)  # the schedule follows the trainer's step, whichever networks step
        for name in stepping:
            for group, lr in zip(self.optimizers[name].param_groups, self.base_lr[name], strict=True):
                group["lr"] = lr * factor
            self.optimizers[name].step()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self._update_ema()
        self.recipe.after_step(self.step)
        return totals

    def _skip(self) -> None:
        """Drop this step's gradients and count it."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.skipped += 1
        return None

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = ema_decay_at(self.cfg.ema_decay, self.step + 1)
        for name, ema in self.ema.items():
            live = self.accelerator.unwrap_model(self.nets[name]).parameters()
            for p_ema, p in zip(ema.parameters(), live, strict=True):
                p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)

    def fit(self) -> list[dict[str, float]]:
        """Train until ``max_steps`` or the wall-time budget; checkpoint on the way and at the end."""
        cfg = self.cfg
        if self.step == 0:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
        writer = self._tensorboard()
        start, in_a_row = time.perf_counter(), 0
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.recipe.name or "train", disable=not cfg.progress)
        try:
            while self.step < cfg.max_steps:
                losses = self.train_step()
                if losses is None:
                    in_a_row += 1
                    if in_a_row >= cfg.nan_patience:
                        raise FewstepError(
                            f"stopped at step {self.step}: {in_a_row} non-finite losses or gradients in a row "
                            f"({self.skipped} skipped in all); lower the learning rate or resume from a checkpoint"
                        )
                else:
                    in_a_row = 0
                    self.history.append({"step": self.step, **losses})
                    bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()})
                    if writer is not None:
                        for key, value in losses.items():
                            writer.add_scalar(f"loss/{key}", value, self.step)
                self.step += 1
                bar.update(1)
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
                if cfg.max_minutes is not None and (time.perf_counter() - start) / 60 >= cfg.max_minutes:
                    break
        except KeyboardInterrupt:
            bar.close()
            path = self.save()
            raise FewstepError(f"interrupted at step {self.step}; saved {path}, continue with --resume") from None
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if self.step % cfg.checkpoint_every:  # else the loop just wrote this step's checkpoint
            self.save()
        (self.run_dir / "losses.json").write_text(json.dumps(self.history) + "\n")
        return self.history

    def _tensorboard(self) -> Any:
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FewstepError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))
