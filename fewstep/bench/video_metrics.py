"""Quality of moving-digits clips (the video world): a Frechet distance on the clip evaluator's features against the
held-out and the train clips (FVD-style), class and motion accuracy, a frame-level FID on the digits evaluator's
features of each frame's digit window, and temporal consistency (how often consecutive frames show the same class,
and how much the digit's track wobbles), each with the real clips' value beside it.

Frechet distances at a few thousand samples are biased (../shared/DIGITS.md), so the floors are measured at exactly
the generated sets' sizes: ``num`` train clips against the held-out clips, averaged over subsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from ..worlds.digits.evaluator import DigitsEvaluator, FIDFeatures
from ..worlds.video.data import reference_clips
from ..worlds.video.evaluator import ClipFeatures, VideoEvaluator, frame_crops, jitter
from .metrics import FeatureFID, load_evaluator, to_unit


def load_video_evaluator(path: str | None = None) -> VideoEvaluator:
    from ..loading import embedded_path

    return VideoEvaluator.from_pretrained(str(path or embedded_path("evaluator", world="video"))).eval()


def frames_of(clips: Tensor) -> Tensor:
    """Clips (N, F, H, W) in [0, 1] -> the digit window of every frame (N F, 1, 8, 8)."""
    return frame_crops(clips.flatten(0, 1))


@dataclass
class VideoMetrics:
    """Every measure of a set of clips (N, F, H, W) in [0, 1] with their class labels and motions."""

    clip_evaluator: VideoEvaluator
    frame_evaluator: DigitsEvaluator

    @classmethod
    def load(cls, clip_path: str | None = None, frame_path: str | None = None) -> VideoMetrics:
        return cls(load_video_evaluator(clip_path), load_evaluator(frame_path))

    @staticmethod
    def reference(split: str) -> Tensor:
        """The split's reference clips as (N, F, H, W) in [0, 1]."""
        return to_unit(reference_clips(split).clips[:, 0])

    @cached_property
    def fd_held_out(self) -> FeatureFID:
        return FeatureFID(ClipFeatures(self.clip_evaluator), self.reference("held_out"))

    @cached_property
    def fd_train(self) -> FeatureFID:
        return FeatureFID(ClipFeatures(self.clip_evaluator), self.reference("train"))

    @cached_property
    def frame_fid_held_out(self) -> FeatureFID:
        return FeatureFID(FIDFeatures(self.frame_evaluator), frames_of(self.reference("held_out")), batch_size=4000)

    def frame_fid(self, clips: Tensor) -> float:
        return self.frame_fid_held_out(frames_of(clips))

    @torch.no_grad()
    def accuracies(self, clips: Tensor, labels: Tensor, motions: Tensor) -> tuple[float, float]:
        """Fractions of clips the clip evaluator gives the class and the motion they were generated for."""
        logits = [self.clip_evaluator(chunk[:, None] * 2 - 1) for chunk in clips.float().split(1000)]
        cls = torch.cat([c for c, _ in logits]).argmax(1)
        mot = torch.cat([m for _, m in logits]).argmax(1)
        return float((cls == labels).float().mean()), float((mot == motions).float().mean())

    @torch.no_grad()
    def class_agreement(self, clips: Tensor) -> float:
        """Fraction of consecutive frame pairs whose digit windows the digits evaluator puts in the same class."""
        n, f = clips.shape[:2]
        crops = frames_of(clips)
        classes = torch.cat([self.frame_evaluator(c * 2 - 1).argmax(1) for c in crops.split(4000)]).reshape(n, f)
        return float((classes[:, 1:] == classes[:, :-1]).float().mean())

    @torch.no_grad()
    def diversity(self, clips: Tensor, labels: Tensor, motions: Tensor) -> float:
        """Mean pairwise distance of clip features within one (class, motion) condition, averaged over conditions."""
        features = torch.cat([ClipFeatures(self.clip_evaluator)(c) for c in clips.split(1000)]).double()
        means = []
        for key in (labels * 100 + motions).unique():
            f = features[(labels * 100 + motions) == key]
            if len(f) > 1:
                means.append(torch.cdist(f, f).sum() / (len(f) * (len(f) - 1)))
        return float(torch.stack(means).mean()) if means else 0.0

    def score(self, clips: Tensor, labels: Tensor, motions: Tensor) -> dict[str, float]:
        accuracy, motion_accuracy = self.accuracies(clips, labels, motions)
        return {
            "fid": self.fd_held_out(clips),
            "fid_train": self.fd_train(clips),
            "frame_fid": self.frame_fid(clips),
            "accuracy": accuracy,
            "motion_accuracy": motion_accuracy,
            "class_agreement": self.class_agreement(clips),
            "jitter": float(jitter(clips).mean()),
            "diversity": self.diversity(clips, labels, motions),
        }

    def floor(self, num: int, subsets: int = 3, seed: int = 0) -> dict[str, Any]:
        """Real-vs-real: ``num`` random train clips against the held-out clips (clip FD and frame FID, mean and std
        over subsets), and the real clips' own temporal and diversity figures."""
        train = reference_clips("train")
        clips = self.reference("train")
        count = min(num, len(clips))
        gen = torch.Generator().manual_seed(seed)
        fd, frame = [], []
        for _ in range(subsets):
            idx = torch.randperm(len(clips), generator=gen)[:count]
            fd.append(self.fd_held_out(clips[idx]))
            frame.append(self.frame_fid(clips[idx]))
        held_out = self.reference("held_out")
        return {
            "real_fid_floor": _mean(fd),
            "real_fid_floor_std": _std(fd),
            "real_frame_fid_floor": _mean(frame),
            "real_frame_fid_floor_std": _std(frame),
            "floor_num_samples": count,
            "held_out_vs_train_fid": self.fd_train(held_out),
            "real_class_agreement": self.class_agreement(held_out),
            "real_jitter": float(jitter(held_out).mean()),
            "real_diversity": self.diversity(clips, train.labels, train.motions),
        }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    mean = _mean(values)
    return (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
