"""What a recipe gives the Trainer. Recipes compose loss pieces from ``losses.py``; they do not inherit behaviour.

A recipe owns its networks (students, critics, frozen teacher, target copies) and says, step by step, which of its
trainable networks take an optimizer step: ``loss(batch, step)`` returns one scalar per optimizer stepping now
(``turns`` splits them where a later loss must see an earlier step).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import FewstepError
from ..sampling import SamplingPlan


@dataclass
class Batch:
    """One training batch as every recipe sees it.

    x0: clean samples (B, C, H, W) (real images, or teacher samples for image-free runs), or None.
    cond / uncond: the Denoiser's condition for each sample and for the unconditional branch of guidance.
    images: for video worlds, still images that go with each clip (B, M, ...frame shape), from an image set apart from
        the clips (MCM's adversarial real frames); None where the world has none.
    """

    x0: Tensor | None
    cond: dict[str, Any]
    uncond: dict[str, Any]
    images: Tensor | None = None

    def rows(self, rows: slice | Tensor, n: int) -> Batch:
        """The samples ``rows`` of this batch of ``n``: every tensor whose first dimension is n is cut (x0, per-sample
        conditions); the rest (a shared unconditional row, settings) is kept whole."""

        def cut(value: Any) -> Any:
            return per_sample(value, n, lambda t: t[rows])

        return Batch(cut(self.x0), cut(self.cond), cut(self.uncond), cut(self.images))

    def interleaved(self, weights: Sequence[int], what: str) -> list[tuple[Tensor, Batch]]:
        """The batch dealt into ``len(weights)`` parts, each as (its row indices, its samples): rows go round a
        repeating cycle of ``weights[j]`` rows to part j, so (1,) * m gives part j the rows j, j + m, ... and (2, 1)
        gives part 0 rows 0, 1, 3, 4, ... and part 1 rows 2, 5, .... Where a process's slice divides by the cycle,
        its parts are the same rows of the global batch. ``what`` names the caller in the one-line error for a batch
        shorter than the cycle (a part would be empty)."""
        if self.x0 is None:
            raise FewstepError(f"{what} needs x0 samples to deal the batch")
        n, cycle = self.x0.shape[0], sum(weights)
        if n < cycle:
            raise FewstepError(f"{what} needs at least {cycle} samples per process, got {n}")
        device = self.x0.device
        part = torch.repeat_interleave(torch.arange(len(weights), device=device), torch.tensor(weights, device=device))
        owner = part[torch.arange(n, device=device) % cycle]
        return [
            (rows, self.rows(rows, n)) for rows in (torch.nonzero(owner == j).flatten() for j in range(len(weights)))
        ]


def per_sample(value: Any, n: int, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor of ``value`` (nested dicts walked into) whose first dimension is the batch's
    ``n``; other entries (a shared unconditional row, settings) are returned as they are."""
    if isinstance(value, Tensor) and value.ndim and value.shape[0] == n:
        return fn(value)
    if isinstance(value, dict):
        return {k: per_sample(v, n, fn) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW settings of one trainable network."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    lr_by_prefix: dict[str, float] = field(default_factory=dict)  # own lr for parameters under these name prefixes


class Recipe(ABC):
    """The training side of a few-step method (paper defaults live in its config dataclass)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # shown by ``fewstep recipes``

    @abstractmethod
    def trainable(self) -> dict[str, nn.Module]:
        """Networks with their own optimizer, by name (e.g. {"student": ..., "critic": ...})."""

    def optimizer(self, name: str) -> OptimizerSpec:
        return OptimizerSpec()

    def lr_scale(self, name: str, step: int) -> float:
        """Multiplier of network ``name``'s learning rates at iteration ``step``, on top of the Trainer's schedule (a
        stage's own rate). A function of the step, so a resumed run steps exactly as an uninterrupted one."""
        return 1.0

    def ema(self) -> list[str]:
        """Trainable networks of which the Trainer keeps an evaluation EMA (kept apart from the trained weights)."""
        return ["student"] if "student" in self.trainable() else []

    @abstractmethod
    def loss(self, batch: Any, step: int) -> dict[str, Tensor]:
        """Scalar losses keyed by the networks that step now; each loss only updates its own network."""

    def turns(self, batch: Any, step: int) -> Iterator[dict[str, Tensor]]:
        """This step's losses in turns: the Trainer back-propagates and steps the networks of each yielded dict before
        it asks for the next, so a later turn sees the networks an earlier one updated (SiD steps its fake score, then
        the generator against it). One turn, ``loss``, by default."""
        yield self.loss(batch, step)

    def after_step(self, step: int) -> None:
        """The recipe's own bookkeeping after the optimizers stepped (e.g. an EMA target network)."""
        return None

    def export_module(self, student: nn.Module) -> nn.Module:
        """The backbone to export from the (EMA copy of the) ``"student"`` network (a recipe may train extra heads)."""
        return student

    @property
    def is_lora(self) -> bool:
        """Whether the student is a LoRA adapter on the teacher (exported as LoRA weights, not a full folder)."""
        return False

    def plan(self) -> dict[int, SamplingPlan]:
        """The sampling plan for each supported step count (drives sampling, bench and export)."""
        raise NotImplementedError(f"recipe {self.name!r} has no sampling plan")

    def state_dict(self) -> dict[str, Any]:
        """Recipe state beyond the trainable networks (target networks, counters) for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
