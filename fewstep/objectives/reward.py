"""Reward models for feedback learning (ReFL, Xu et al. 2023, ImageReward; Hyper-SD's human-feedback stage).

A reward model is a callable (x0, cond) -> (B,) scores, higher is better and differentiable in x0, where x0 is a
sample in the teacher's own space (pixels on the digits world, VAE latents on text-to-image teachers) and cond the
Denoiser's condition. ``load_reward`` turns a spec into one, or fails on one line before any training: a student
should never train for minutes and then find its reward missing.

- "digits", or a folder holding a ``DigitsScorer``: log p(class | x0) of the digits world's scorer (kept apart from
  the bench's evaluator, so the bench cannot be gamed).
- "aesthetic:HEAD": an aesthetic head on CLIP image embeddings, as the LAION aesthetic predictor (Schuhmann et al.,
  improved-aesthetic-predictor) and Hyper-SD's feedback stage use it: score = head(e / ||e||), e the open_clip image
  embedding (``clip`` = ARCH:CHECKPOINT, a local checkpoint) of the decoded image. HEAD is a state dict
  (``torch.save`` or safetensors) of linear layers ``layers.<i>.weight`` / ``.bias`` applied in index order with
  nothing between them (the LAION MLP's dropouts are identities at evaluation), or one linear ``weight`` / ``bias``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import FewstepError

RewardModel = Callable[[Tensor, dict[str, Any]], Tensor]
Decode = Callable[[Tensor], Tensor]  # x0 -> images (B, 3, H, W) in [0, 1]

REWARD_SPECS = "'digits' (the digits world's scorer), a folder holding a DigitsScorer, or 'aesthetic:HEAD'"


def load_reward(spec: str, clip: str = "", decode: Decode | None = None) -> RewardModel:
    """The reward model named by ``spec`` (module docstring), frozen: gradients flow to x0 only. ``clip``: the
    open_clip ARCH:CHECKPOINT an aesthetic head reads; ``decode``: the teacher's x0 -> images in [0, 1] (its VAE);
    None where x0 are pixels in [-1, 1] (digits)."""
    if spec.startswith("aesthetic:"):
        return _aesthetic(spec, clip, decode)
    return _digits(spec)


def _digits(spec: str) -> RewardModel:
    from ..loading import embedded_path
    from ..worlds.digits.scorer import DigitsScorer

    folder = Path(str(embedded_path("scorer"))) if spec == "digits" else Path(spec)
    if not (folder / "config.json").is_file():
        raise FewstepError(f"reward model {spec!r} not found: expected {REWARD_SPECS}")
    try:
        scorer = DigitsScorer.from_pretrained(str(folder)).eval().requires_grad_(False)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        raise FewstepError(f"reward model {spec!r} does not load: {_first_line(err)}") from None

    def reward(x0: Tensor, cond: dict[str, Any]) -> Tensor:
        labels = cond.get("class_labels")
        if labels is None:
            raise FewstepError(f"reward model {spec!r} scores class-conditional samples; this teacher has no classes")
        return scorer.to(x0.device).reward(x0, labels.to(x0.device))

    return reward


def _aesthetic(spec: str, clip: str, decode: Decode | None) -> RewardModel:
    from ..bench.clip import ClipScorer

    path = Path(spec.removeprefix("aesthetic:"))
    if not clip:
        raise FewstepError(f"reward model {spec!r} scores CLIP image embeddings: set reward_clip = 'ARCH:CHECKPOINT'")
    if not path.is_file():
        raise FewstepError(f"reward model {spec!r}: aesthetic head {path} does not exist")
    scorer = ClipScorer.load(clip)  # one-line errors of its own (missing checkpoint, unknown architecture)
    scorer.model.requires_grad_(False)
    head = aesthetic_head(path)
    width = int(getattr(scorer.model.visual, "output_dim", 0) or 0)
    first = next(m for m in head if isinstance(m, nn.Linear))
    if width and first.in_features != width:
        raise FewstepError(
            f"reward model {spec!r}: the head takes {first.in_features}-d embeddings, {clip} gives {width}-d"
        )
    to_images = decode if decode is not None else lambda x0: ((x0 + 1) / 2).clamp(0, 1)

    def reward(x0: Tensor, cond: dict[str, Any]) -> Tensor:
        images = to_images(x0)
        if images.shape[1] == 1:  # grayscale (digits): CLIP reads RGB
            images = images.expand(-1, 3, -1, -1)
        model = scorer.model.to(x0.device)
        embedding = model.encode_image(scorer.preprocess(images).to(x0.device)).float()
        return head.to(x0.device)(F.normalize(embedding, dim=-1)).squeeze(-1)

    return reward


def aesthetic_head(path: Path) -> nn.Sequential:
    """The linear layers of an aesthetic head file (module docstring), frozen."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: its reason on one line
        raise FewstepError(f"aesthetic head {path} does not load: {_first_line(err)}") from None
    if not isinstance(state, dict):
        raise FewstepError(f"aesthetic head {path} holds no state dict")
    layers: list[tuple[Tensor, Tensor | None]]
    if "weight" in state and "bias" in state:
        layers = [(state["weight"], state["bias"])]
    else:
        index = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
        layers = [(state[f"layers.{i}.weight"], state.get(f"layers.{i}.bias")) for i in index]
    if not layers or any(w.ndim != 2 for w, _ in layers):
        raise FewstepError(f"aesthetic head {path}: expected linear layers 'layers.<i>.weight' or 'weight' / 'bias'")
    modules = []
    for (weight, bias), nxt in zip(layers, [*layers[1:], None], strict=True):
        if nxt is not None and nxt[0].shape[1] != weight.shape[0]:
            raise FewstepError(f"aesthetic head {path}: layer widths do not chain ({tuple(weight.shape)})")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        modules.append(linear)
    if modules[-1].out_features != 1:
        raise FewstepError(f"aesthetic head {path}: the last layer gives {modules[-1].out_features} scores, not 1")
    return nn.Sequential(*modules).eval().requires_grad_(False)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
