"""Reward models for feedback learning (ReFL, Xu et al. 2023, ImageReward; Hyper-SD's human-feedback stage).

A reward model is a callable (x0, cond) -> (B,) scores, higher is better and differentiable in x0, where x0 is a
sample in the teacher's own space (pixels on the digits world) and cond the Denoiser's condition. ``load_reward``
turns a spec into one, or fails on one line before any training: a student should never train for minutes and then
find its reward missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import FewstepError

RewardModel = Callable[[Tensor, dict[str, Any]], Tensor]

REWARD_SPECS = "'digits' (the digits world's scorer) or a folder holding a DigitsScorer"


def load_reward(spec: str) -> RewardModel:
    """The reward model named by ``spec``: "digits" is the scorer shipped with the digits world (``fewstep teacher
    train --what scorer``), a folder is a scorer trained likewise; its reward is log p(class | x0), read from the
    condition's class labels. The model is frozen; gradients flow to x0 only."""
    from ..loading import embedded_path
    from ..worlds.digits.scorer import DigitsScorer

    folder = Path(str(embedded_path("scorer"))) if spec == "digits" else Path(spec)
    if not (folder / "config.json").is_file():
        raise FewstepError(f"reward model {spec!r} not found: expected {REWARD_SPECS}")
    try:
        scorer = DigitsScorer.from_pretrained(str(folder)).eval().requires_grad_(False)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FewstepError(f"reward model {spec!r} does not load: {reason}") from None

    def reward(x0: Tensor, cond: dict[str, Any]) -> Tensor:
        labels = cond.get("class_labels")
        if labels is None:
            raise FewstepError(f"reward model {spec!r} scores class-conditional samples; this teacher has no classes")
        return scorer.to(x0.device).reward(x0, labels.to(x0.device))

    return reward
