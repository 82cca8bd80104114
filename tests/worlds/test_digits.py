"""The embedded digits world: split, shipped teacher and evaluator, metrics identities."""

from __future__ import annotations

import pytest
import torch

from fewstep.bench.metrics import DigitsMetrics, FeatureFID, to_unit
from fewstep.worlds.digits.data import NUM_CLASSES, balanced_labels, load_split


def test_split_is_fixed_and_disjoint() -> None:
    train, held_out = load_split("train"), load_split("held_out")
    assert (len(train), len(held_out)) == (1437, 360)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.min() >= -1 and train.images.max() <= 1
    assert torch.bincount(held_out.labels, minlength=NUM_CLASSES).min() >= 35  # stratified
    flat_train = {tuple(x.flatten().tolist()) for x in train.images}
    overlap = sum(tuple(x.flatten().tolist()) in flat_train for x in held_out.images)
    assert overlap <= 5  # the raw data holds a few duplicate images, no more
    with pytest.raises(ValueError):
        load_split("test")


def test_balanced_labels() -> None:
    counts = torch.bincount(balanced_labels(1000), minlength=NUM_CLASSES)
    assert counts.eq(100).all()


def test_stock_diffusion_pipeline_loads_shipped_teacher() -> None:
    from diffusers import DiffusionPipeline

    import fewstep.worlds.digits.pipeline  # noqa: F401  (registers DigitsPipeline)
    from fewstep.loading import embedded_path
    from fewstep.teacher import Denoiser

    pipe = DiffusionPipeline.from_pretrained(str(embedded_path("teacher")))
    assert type(pipe).__name__ == "DigitsPipeline"
    denoiser = Denoiser.from_pipeline(pipe)
    assert denoiser.native.kind == "flow" and denoiser.prediction == "flow"
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    again = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 1, 8, 8) and torch.equal(out, again)
    with pytest.raises(ValueError):
        pipe(class_labels=[10], num_inference_steps=1)


@pytest.fixture(scope="module")
def metrics() -> DigitsMetrics:
    return DigitsMetrics.load()


def test_fid_identities(metrics: DigitsMetrics) -> None:
    held_out = to_unit(load_split("held_out").images)
    fid = FeatureFID(metrics._features, held_out)
    assert abs(fid(held_out)) < 1e-2  # a set against itself
    noise = torch.rand_like(held_out)
    assert fid(noise) > 100 * max(abs(fid(held_out)), 1e-3)


def test_evaluator_reads_real_digits(metrics: DigitsMetrics) -> None:
    held_out = load_split("held_out")
    assert metrics.accuracy(to_unit(held_out.images), held_out.labels) > 0.95
    shuffled = held_out.labels[torch.randperm(len(held_out.labels), generator=torch.Generator().manual_seed(0))]
    assert metrics.accuracy(to_unit(held_out.images), shuffled) < 0.3


def test_diversity_identities(metrics: DigitsMetrics) -> None:
    """Zero for a collapsed sampler (one image per class repeated), equal to the mean pairwise feature distance
    within classes (a loop over pairs here), and lower for a sampler that covers half of each class."""
    held_out = load_split("held_out")
    images, labels = to_unit(held_out.images), held_out.labels
    collapsed = torch.cat([images[labels == c][:1].expand(5, -1, -1, -1) for c in range(10)])
    assert metrics.diversity(collapsed, torch.arange(10).repeat_interleave(5)) == pytest.approx(0.0, abs=1e-6)
    few, few_labels = images[:40], labels[:40]
    feats = metrics._features(few).double()
    per_class = []
    for c in few_labels.unique():
        f = feats[few_labels == c]
        pairs = [float((f[i] - f[j]).norm()) for i in range(len(f)) for j in range(len(f)) if i != j]
        if pairs:
            per_class.append(sum(pairs) / len(pairs))
    assert metrics.diversity(few, few_labels) == pytest.approx(sum(per_class) / len(per_class), rel=1e-6)
    full = metrics.diversity(images, labels)
    half = torch.cat([images[labels == c][: int((labels == c).sum()) // 4].repeat(2, 1, 1, 1) for c in range(10)])
    half_labels = torch.arange(10).repeat_interleave(
        torch.tensor([2 * (int((labels == c).sum()) // 4) for c in range(10)])
    )
    assert metrics.diversity(half, half_labels) < full


def test_floor_uses_requested_count(metrics: DigitsMetrics) -> None:
    mean, std, count = metrics.floor(200, subsets=2)
    assert count == 200 and mean > 0 and std >= 0
    assert metrics.floor(5000, subsets=1)[2] == 1437  # capped at the train split


@torch.no_grad()
def test_fewstep_scheduler_gamma0_is_the_teachers_euler(tmp_path) -> None:
    """Swapping in FewStepScheduler(gamma=0) on the same schedule reproduces the teacher's Euler sampler, and the
    folder reloads with the stock DiffusionPipeline loader (scheduler from the fewstep library)."""
    from diffusers import DiffusionPipeline

    from fewstep import DigitsPipeline, FewStepScheduler
    from fewstep.loading import load_pipeline

    teacher = load_pipeline("digits")
    swapped = DigitsPipeline(transformer=teacher.transformer, scheduler=FewStepScheduler.from_config(
        teacher.scheduler.config, gamma=0.0))  # fmt: skip
    swapped.save_pretrained(tmp_path / "swapped")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "swapped")
    assert type(reloaded.scheduler).__name__ == "FewStepScheduler"
    reloaded.set_progress_bar_config(disable=True)
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    for steps in (1, 2, 4):
        a = teacher(class_labels=labels, num_inference_steps=steps, latents=noise).images
        b = reloaded(class_labels=labels, num_inference_steps=steps, latents=noise).images
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_training_scripts_run_and_save(tmp_path) -> None:
    """The commands that reproduce the shipped assets run end to end (a few steps here)."""
    from diffusers import DiffusionPipeline

    from fewstep.worlds.digits.evaluator import DigitsEvaluator
    from fewstep.worlds.digits.train import EvaluatorTrainConfig, TeacherTrainConfig, train_evaluator, train_teacher

    train_teacher(tmp_path / "teacher", TeacherTrainConfig(steps=2, warmup_steps=1, batch_size=8), progress=False)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "teacher")
    assert type(pipe).__name__ == "DigitsPipeline" and (tmp_path / "teacher" / "TRAINING.md").is_file()
    train_evaluator(tmp_path / "evaluator", EvaluatorTrainConfig(epochs=1), progress=False)
    assert isinstance(DigitsEvaluator.from_pretrained(tmp_path / "evaluator"), DigitsEvaluator)


def test_shipped_teacher_still_classifies(metrics: DigitsMetrics) -> None:
    """Acceptance guard: 50 Euler steps at w = 1 give >= 95% class accuracy (100 samples, about 3 s)."""
    from fewstep.loading import load_pipeline

    pipe = load_pipeline("digits")
    labels = balanced_labels(100)
    images = pipe(class_labels=labels, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images
    assert metrics.accuracy(images, labels) >= 0.95
