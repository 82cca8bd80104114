"""The Trainer: one explicit loop over a Recipe, on accelerate.

Per step: draw the batch (a pure function of the step, so data order survives a resume), ask the recipe for its
losses, back-propagate each loss into its own network only (``backward(inputs=...)``), clip, step those optimizers
(turn by turn, where a recipe computes later losses with networks its earlier ones stepped: ``Recipe.turns``),
update the evaluation EMAs, let the recipe update its own targets. Non-finite losses or gradients skip the step;
``nan_patience`` of them in a row stop the run with a clear message. Checkpoints hold weights, EMAs, optimizers, the
grad scaler, the recipe's own state and every RNG stream, so a resumed run repeats the uninterrupted one exactly.

On several processes (``parallel.py``) each takes its slice of the global batch, draws its per-sample noise as a slice
of the global draw (``batch_random``), and the engine averages gradients; losses are averaged over the processes, so
a run's losses do not depend on how many there are. Checkpoints are then sharded (torch.distributed.checkpoint) and
load into any number of processes. SIGTERM (a cluster's notice before it kills a job) and Ctrl-C finish the current
step, save one consistent checkpoint on every process and stop with one line.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import batch_random
from ..errors import FewstepError
from ..recipes.base import Recipe
from .checkpoint import load_checkpoint, save_checkpoint, save_sharded_checkpoint
from .parallel import Parallel, Processes, first_line, lost_peer, recipe_networks, slice_batch


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
    # several processes (torchrun / accelerate launch): "ddp" replicates every network, "fsdp" shards them (FSDP2)
    parallel: Parallel = "none"
    dist_timeout_s: float = 600.0  # how long a process waits for the others (rendezvous, every collective)


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


@torch.no_grad()
def ema_update(ema: nn.Module, live: Iterable[Tensor], decay: float) -> None:
    """ema <- decay ema + (1 - decay) live, parameter by parameter (in the EMA's dtype)."""
    for p_ema, p in zip(ema.parameters(), live, strict=True):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)


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


def _distribute_like(local: Any, full: Any) -> Any:
    """``full`` (whole tensors) laid out as ``local`` is: each tensor of ``local`` that is a DTensor gets the matching
    full tensor distributed on its mesh and placements; everything else is taken from ``full`` as it is."""
    if isinstance(local, dict) and isinstance(full, dict):
        return {k: _distribute_like(local[k], v) if k in local else v for k, v in full.items()}
    placements = getattr(local, "placements", None)
    if placements is not None and isinstance(full, Tensor):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(local.dtype), local.device_mesh, placements)
    return full


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

    def __init__(
        self, recipe: Recipe, cfg: TrainConfig, run_dir: Path, data: Callable[[int], Any] | None = None,
        processes: Processes | None = None,
    ):  # fmt: skip
        from accelerate import Accelerator

        self.recipe, self.cfg, self.run_dir, self.data = recipe, cfg, Path(run_dir), data
        self.processes = processes or Processes.start(cfg.parallel, cfg.dist_timeout_s)
        par = self.processes
        self.accelerator = Accelerator(
            mixed_precision="no" if par.active else cfg.mixed_precision, cpu=not torch.cuda.is_available()
        )
        self.nets = recipe.trainable()
        if not self.nets:
            raise FewstepError(f"recipe {recipe.name!r} has nothing to train")
        self.optimizers = {}
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.nets.values())
        self.ema = {name: copy.deepcopy(self.nets[name]).eval().requires_grad_(False) for name in recipe.ema()}
        # the engine changes every network in place, before the optimizers see their (replicated or sharded) params
        par.apply([*recipe_networks(recipe), *self.nets.values(), *self.ema.values()], cfg.mixed_precision)
        for name, net in self.nets.items():
            spec = recipe.optimizer(name)
            opt = torch.optim.AdamW(
                _param_groups(net, spec.lr_by_prefix), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                eps=spec.eps,
            )  # fmt: skip
            if par.active:
                self.optimizers[name] = opt
            else:
                self.nets[name], self.optimizers[name] = self.accelerator.prepare(net, opt)
        self.base_lr = {name: [g["lr"] for g in opt.param_groups] for name, opt in self.optimizers.items()}
        self.step = 0
        self._signal: str | None = None
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

    def _module(self, name: str) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.nets[name])

    def _optimizer(self, name: str) -> torch.optim.Optimizer:
        opt = self.optimizers[name]
        return getattr(opt, "optimizer", opt)  # accelerate's wrapper holds the torch optimizer

    def tensor_state(self, stepped: list[str] | None = None) -> dict[str, Any]:
        """The tensors of a checkpoint, keyed by parameter name (sharded under FSDP): trained networks, the
        optimizers that have stepped (``stepped``; default all that hold state), EMAs, the recipe's own networks."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        if stepped is None:
            stepped = self._stepped()
        return {
            "nets": {k: get_model_state_dict(self._module(k)) for k in self.nets},
            # an optimizer that never stepped is left out: reading its state would take a zero step and change it
            "optimizers": {k: get_optimizer_state_dict(self._module(k), self._optimizer(k)) for k in stepped},
            "ema": {k: v.state_dict() for k, v in self.ema.items()},
            "recipe": self.recipe.state_dict(),
        }

    def _stepped(self) -> list[str]:
        """The networks whose optimizers hold state (have stepped), in the trainer's order."""
        return [k for k in self.nets if self._optimizer(k).state]

    def extra_state(self) -> dict[str, Any]:
        """Everything else (the same on every process): counters, loss history, scaler, RNG streams, config."""
        return {
            "step": self.step,
            "skipped": self.skipped,
            "history": self.history,
            "stepped": self._stepped(),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "rng": _rng_state(),
            "config": asdict(self.cfg),
            "processes": self.processes.world,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self.tensor_state(), **self.extra_state()}

    def load_state_dict(self, state: dict[str, Any], full: bool = True) -> None:
        """Load a checkpoint's state; ``full``: its tensors are whole (a one-process checkpoint), else they are in
        this run's own layout (read through torch.distributed.checkpoint)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if set(state["nets"]) != set(self.nets):
            raise FewstepError(f"checkpoint trains {sorted(state['nets'])}, this recipe {sorted(self.nets)}")
        options = StateDictOptions(full_state_dict=full and self.processes.active)
        # parameters that never had a gradient have no Adam state, in the checkpoint as in the uninterrupted run
        partial = StateDictOptions(full_state_dict=full and self.processes.active, strict=False)
        for name in self.nets:
            set_model_state_dict(self._module(name), state["nets"][name], options=options)
            if name in state["optimizers"]:
                set_optimizer_state_dict(
                    self._module(name), self._optimizer(name), state["optimizers"][name], options=partial
                )
        # whole tensors into a sharded run: the EMAs' and the recipe's own state take the layout they have here
        distribute = full and self.processes.active
        for name, ema in self.ema.items():
            value = state["ema"][name]
            ema.load_state_dict(_distribute_like(ema.state_dict(), value) if distribute else value)
        recipe_state = state["recipe"]
        local = self.recipe.state_dict() if distribute else None
        self.recipe.load_state_dict(_distribute_like(local, recipe_state) if distribute else recipe_state)
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step, self.skipped, self.history = state["step"], state["skipped"], list(state["history"])
        _set_rng_state(state["rng"])

    def save(self) -> Path:
        if self.processes.active:
            return save_sharded_checkpoint(
                self.run_dir, self.step, self.tensor_state(), self.extra_state(), self.processes,
                keep=self.cfg.keep_checkpoints,
            )  # fmt: skip
        return save_checkpoint(self.run_dir, self.step, self.state_dict(), keep=self.cfg.keep_checkpoints)

    def resume(self, path: Path | None = None) -> Path:
        """Continue from the newest good checkpoint of the run (or ``path``), written by any number of processes."""
        found, state = load_checkpoint(self.run_dir, path, template=self._template)
        self.load_state_dict(state, full=not state.pop("sharded", False))
        return found

    def _template(self, extra: dict[str, Any]) -> dict[str, Any]:
        """This run's own tensor layout for reading a sharded checkpoint into (its optimizers as the checkpoint's)."""
        return self.tensor_state(list(extra.get("stepped", [])))

    # -----------------------------------------------------------------------------------------------------------
    # The loop

    def _params(self, name: str) -> list[Tensor]:
        """The trained parameters of network ``name`` as its optimizer holds them: under an engine, the sharded (or
        replicated) ones, which the module itself swaps for gathered copies between a forward and its backward."""
        return [p for group in self._optimizer(name).param_groups for p in group["params"]]

    def train_step(self) -> dict[str, float] | None:
        """One step: each turn of the recipe's losses (``Recipe.turns``; one turn for most recipes) over ``grad_accum``
        micro-batches, then an optimizer step of that turn's networks before the next turn is computed. None when a
        turn was skipped as non-finite (the turns before it stay stepped)."""
        cfg, par = self.cfg, self.processes
        turns = []
        for micro in range(cfg.grad_accum):
            batch = self.data(self.step * cfg.grad_accum + micro) if self.data is not None else None
            turns.append(self.recipe.turns(slice_batch(batch, par.rank, par.world), self.step))
        totals: dict[str, float] = {}
        while True:
            stepping: set[str] = set()
            done = False
            for it in turns:
                with self.accelerator.autocast(), batch_random.batch_slice(par.rank, par.world):
                    losses = next(it, None)
                if losses is None:  # every micro-batch has the same turns
                    done = True
                    break
                if unknown := set(losses) - set(self.nets):
                    raise FewstepError(f"recipe {self.recipe.name!r} returned losses for unknown networks {unknown}")
                values = par.mean({k: float(v.detach().float().mean()) for k, v in losses.items()})
                if not all(math.isfinite(v) for v in values.values()):
                    self._skip()
                    return None
                names = list(losses)
                for i, name in enumerate(names):  # each loss reaches only its own network
                    self._backward(name, losses[name] / cfg.grad_accum, retain=i + 1 < len(names))
                    totals[name] = totals.get(name, 0.0) + values[name] / cfg.grad_accum
                stepping |= set(names)
            if done:
                break
            if not self._step_networks(stepping):
                self._skip()
                return None
        self._update_ema()
        self.recipe.after_step(self.step)
        return totals

    def _step_networks(self, stepping: set[str]) -> bool:
        """Clip and step the optimizers of ``stepping`` (gradients in place); False if a norm is not finite."""
        cfg = self.cfg
        self.processes.reshard()
        # in the trainer's own order: a set's order differs between processes (string hashing is seeded per process),
        # and clipping under FSDP is a collective per network, which every process must reach in the same order
        ordered = [name for name in self.nets if name in stepping]
        for name in ordered:
            if cfg.grad_clip is not None:
                norm = self._clip(name, cfg.grad_clip)
                if not math.isfinite(norm):
                    return False
        factor = self.lr_factor(self.step)  # the schedule follows the trainer's step, whichever networks step
        for name in ordered:
            scale = factor * self.recipe.lr_scale(name, self.step)
            for group, lr in zip(self.optimizers[name].param_groups, self.base_lr[name], strict=True):
                group["lr"] = lr * scale
            self.optimizers[name].step()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        return True

    def _backward(self, name: str, loss: Tensor, retain: bool) -> None:
        """Gradients of ``loss`` into network ``name`` only. One process: ``backward(inputs=...)``. Several: the
        engines' hooks reduce gradients as autograd reaches each (unsharded) parameter, which ``inputs=`` of the
        sharded ones would skip, so the backward runs whole and any gradient it leaves on other networks is
        discarded (their own gradients, from earlier losses of this step, are put back)."""
        if not self.processes.active:
            self.accelerator.backward(loss, inputs=self._params(name), retain_graph=retain)
            return
        others = [p for other in self.nets if other != name for p in self._params(other)]
        kept = [p.grad for p in others]
        for p in others:
            p.grad = None
        loss.backward(retain_graph=retain)
        for p, g in zip(others, kept, strict=True):
            p.grad = g

    def _clip(self, name: str, max_norm: float) -> float:
        """Clip network ``name``'s gradient to ``max_norm``; returns its norm before clipping (over all processes)."""
        if not self.processes.active:
            return float(torch.as_tensor(self.accelerator.clip_grad_norm_(self._params(name), max_norm)))
        return self.processes.clip_grad_norm(self._params(name), max_norm)

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
            ema_update(ema, self._module(name).parameters(), decay)

    def fit(self) -> list[dict[str, float]]:
        """Train until ``max_steps`` or the wall-time budget; checkpoint on the way and at the end."""
        cfg = self.cfg
        if self.step == 0:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
        par = self.processes
        writer = self._tensorboard() if par.is_main else None
        start, in_a_row = time.perf_counter(), 0
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, desc=self.recipe.name or "train",
            disable=not cfg.progress or not par.is_main,
        )  # fmt: skip
        restore = self._catch_signals()
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
                spent = cfg.max_minutes is not None and (time.perf_counter() - start) / 60 >= cfg.max_minutes
                # every process stops at the same step: a signal or a spent budget on any one stops them all
                if par.any(spent or self._signal is not None):
                    break
        except RuntimeError as err:
            restore()
            if par.active and lost_peer(err):
                raise FewstepError(
                    f"another process of this run stopped at step {self.step} ({first_line(err)}); the last "
                    "checkpoint is intact: continue with --resume"
                ) from None
            raise
        except KeyboardInterrupt:  # a second Ctrl-C, or one while the handler was not installed
            bar.close()
            restore()
            if par.active:
                raise FewstepError(f"interrupted at step {self.step}; resume from the last checkpoint") from None
            path = self.save()
            raise FewstepError(f"interrupted at step {self.step}; saved {path}, continue with --resume") from None
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        try:  # the handlers stay until the last checkpoint is written: a launcher's SIGTERM then waits for it
            stopped = par.any(self._signal is not None) and self.step < cfg.max_steps
            final = self.save() if self.step % cfg.checkpoint_every else None  # else the loop just wrote this one
        finally:
            restore()
        if stopped:
            what = self._signal or "another process's signal"
            saved = f"saved {final}" if final is not None else "its checkpoint is saved"
            raise FewstepError(f"stopped by {what} at step {self.step}; {saved}, continue with --resume")
        if par.is_main:
            (self.run_dir / "losses.json").write_text(json.dumps(self.history) + "\n")
        return self.history

    def _catch_signals(self) -> Callable[[], None]:
        """SIGTERM and SIGINT set a flag the loop reads between steps (a second SIGINT interrupts at once); returns
        the function that puts the previous handlers back. Only the main thread can install handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        self._signal = None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._signal = signal.Signals(signum).name

        for sig in previous:
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _tensorboard(self) -> Any:
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FewstepError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))
