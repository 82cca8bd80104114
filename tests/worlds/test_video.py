"""The embedded video world: clips (exact motion identities), split, condition tokens, pipeline, evaluator helpers,
metrics identities, the bench and ``fewstep sample`` on a tiny random Wan teacher, and the teacher's resumable
training through the Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.worlds.digits.data import load_split
from fewstep.worlds.video.data import (
    CANVAS,
    COND_DIM,
    FREE,
    MOTIONS,
    NUM_FRAMES,
    VELOCITY,
    balanced_conditions,
    condition_tokens,
    null_tokens,
    random_clips,
    reference_clips,
    render,
    start_positions,
)
from fewstep.worlds.video.evaluator import crop_corners, frame_crops, jitter, track


def test_reference_sets_follow_the_digits_split() -> None:
    """Every held-out clip is a held-out digit in each of the 5 motions (and likewise for train): the video split is
    the image split, so no held-out digit is ever seen in training."""
    for split, n in (("train", 1437), ("held_out", 360)):
        ref = reference_clips(split)
        assert ref.clips.shape == (5 * n, 1, NUM_FRAMES, CANVAS, CANVAS) and len(ref) == 5 * n
        assert ref.clips.min() >= -1 and ref.clips.max() <= 1
        assert torch.equal(torch.bincount(ref.motions), torch.full((5,), n))
        assert torch.equal(ref.labels, load_split(split).labels.repeat(5))


def test_every_frame_is_the_first_moved_by_the_velocity() -> None:
    """Frame f is frame 0 shifted by f v exactly, the whole digit stays on the canvas (constant ink), and the digit's
    own 8x8 box at frame 0 holds the source image."""
    digits = load_split("held_out").images[:50]
    motions = torch.arange(50) % len(MOTIONS)
    starts = start_positions(motions)
    clips = render(digits, motions, starts)[:, 0]  # (N, F, H, W)
    ink = (clips + 1).sum((-2, -1))
    assert torch.allclose(ink, (digits[:, 0] + 1).sum((-2, -1))[:, None].expand_as(ink))
    for i in range(50):
        (y, x), (dy, dx) = starts[i].tolist(), VELOCITY[motions[i]].tolist()
        assert torch.equal(clips[i, 0, y : y + 8, x : x + 8], digits[i, 0])
        for f in range(NUM_FRAMES):
            moved = torch.roll(clips[i, 0], shifts=(f * dy, f * dx), dims=(0, 1))
            assert torch.equal(clips[i, f], moved)


def test_paths_are_centred_across_the_motion_and_span_the_canvas_along_it() -> None:
    """Each motion has one path: it stays on the canvas, sits at the centre across the motion (on the 4-px token
    grid), and along it moves from one edge by F - 1 px; a still digit sits at the centre."""
    starts = start_positions(torch.arange(len(MOTIONS)))
    for m, v in enumerate(VELOCITY.tolist()):
        end = starts[m] + (NUM_FRAMES - 1) * VELOCITY[m]
        assert starts[m].min() >= 0 and starts[m].max() <= FREE and end.min() >= 0 and end.max() <= FREE
        for axis in range(2):
            expected = FREE // 2 if v[axis] == 0 else (0 if v[axis] > 0 else FREE)
            assert int(starts[m, axis]) == expected
    assert FREE // 2 % 4 == 0  # the centre is on the (1, 4, 4) teacher's token grid


def test_condition_tokens_are_one_hot_and_null_is_zero() -> None:
    labels, motions = balanced_conditions(100)
    assert torch.equal(torch.bincount(labels * 5 + motions), torch.full((50,), 2))
    tokens = condition_tokens(labels, motions)
    assert tokens.shape == (100, 2, COND_DIM) and torch.equal(tokens.sum(-1), torch.ones(100, 2))
    assert torch.equal(tokens[:, 0].argmax(-1), labels) and torch.equal(tokens[:, 1].argmax(-1) - 10, motions)
    assert null_tokens(3).abs().sum() == 0


def test_random_clips_are_a_pure_function_of_the_generator() -> None:
    a = random_clips("train", 8, torch.Generator().manual_seed(3))
    b = random_clips("train", 8, torch.Generator().manual_seed(3))
    assert torch.equal(a.clips, b.clips) and torch.equal(a.motions, b.motions)


def test_track_jitter_and_crops_on_real_and_broken_clips() -> None:
    ref = reference_clips("held_out")
    clips = (ref.clips[:200, 0] + 1) / 2
    assert jitter(clips).abs().max() < 1e-4  # constant velocity
    c = track(clips)
    v = VELOCITY[ref.motions[:200]].float()
    assert torch.allclose(c[:, 1:] - c[:, :-1], v[:, None].expand(-1, NUM_FRAMES - 1, -1), atol=1e-4)
    swapped = clips.clone()
    swapped[:, 3], swapped[:, 4] = clips[:, 4], clips[:, 3]  # out of order: the track wobbles
    moving = ref.motions[:200] != 0
    assert (jitter(swapped)[moving] > 0.5).all()
    # the digit window holds all of a real frame's ink
    frames = clips.flatten(0, 1)
    crops = frame_crops(frames)
    assert torch.allclose(crops.sum((1, 2, 3)), frames.sum((1, 2)), atol=1e-3)
    assert crop_corners(frames).min() >= 0 and crop_corners(frames).max() <= FREE


def test_pipeline_loads_samples_and_refuses_bad_conditions(random_video: Path) -> None:
    from diffusers import DiffusionPipeline

    import fewstep.worlds.video.pipeline  # noqa: F401  (registers VideoDigitsPipeline)
    from fewstep.teacher import Denoiser

    pipe = DiffusionPipeline.from_pretrained(str(random_video))
    assert type(pipe).__name__ == "VideoDigitsPipeline"
    pipe.set_progress_bar_config(disable=True)
    denoiser = Denoiser.from_pipeline(pipe)
    assert denoiser.native.kind == "flow" and denoiser.prediction == "flow"
    kw = dict(class_labels=[0, 7], motions=["still", "up"], num_inference_steps=2)
    out = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    gen = torch.Generator().manual_seed(0)
    again = pipe(class_labels=[0, 7], motions=[0, 4], num_inference_steps=2, generator=gen)
    assert out.shape == (2, NUM_FRAMES, 1, CANVAS, CANVAS) and torch.equal(out, again.frames)
    assert 0 <= out.min() and out.max() <= 1
    guided = pipe(**kw, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)).frames
    assert not torch.equal(guided, out)
    for bad in (dict(class_labels=[10]), dict(motions=["sideways"]), dict(class_labels=[1, 2], motions=[0])):
        with pytest.raises(ValueError):
            pipe(num_inference_steps=1, **bad)


def test_guidance_interval_guides_only_the_steps_inside_it(random_video: Path) -> None:
    """4 Euler steps sit at sigma 1, .75, .5, .25: an interval holding none of them is w = 1 (one branch, 4 NFE), one
    holding all is plain guidance, one holding .75 and .5 is neither and doubles exactly those two steps."""
    from fewstep.worlds.video.pipeline import VideoDigitsPipeline

    pipe = VideoDigitsPipeline.from_pretrained(str(random_video))
    pipe.set_progress_bar_config(disable=True)
    batches: list[int] = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))

    def frames(w: float, interval: tuple[float, float] | None) -> torch.Tensor:
        batches.clear()
        kw = dict(class_labels=[3, 8], motions=[1, 2], num_inference_steps=4, guidance_scale=w)
        return pipe(**kw, guidance_interval=interval, generator=torch.Generator().manual_seed(0)).frames

    plain, guided = frames(1.0, None), frames(2.0, None)
    assert torch.equal(frames(2.0, (0.0, 0.1)), plain) and batches == [2, 2, 2, 2]
    assert torch.equal(frames(2.0, (0.0, 1.0)), guided)
    middle = frames(2.0, (0.4, 0.8))
    assert batches == [2, 4, 4, 2] and not torch.equal(middle, plain) and not torch.equal(middle, guided)
    with pytest.raises(ValueError, match="guidance_interval"):
        frames(2.0, (0.8, 0.4))


def test_a_folder_carries_its_guidance_interval(random_video: Path, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    from fewstep.loading import embedded_path
    from fewstep.worlds import TEACHER_GUIDANCE_INTERVAL
    from fewstep.worlds.video.pipeline import VideoDigitsPipeline

    pipe = VideoDigitsPipeline.from_pretrained(str(random_video))
    assert pipe.config.guidance_interval is None
    interval = VideoDigitsPipeline(pipe.transformer, pipe.scheduler, guidance_interval=(0.4, 0.8))
    interval.save_pretrained(tmp_path / "interval")
    assert DiffusionPipeline.from_pretrained(str(tmp_path / "interval")).config.guidance_interval == [0.4, 0.8]
    shipped = json.loads((Path(str(embedded_path("teacher", world="video"))) / "model_index.json").read_text())
    assert shipped["guidance_interval"] == list(TEACHER_GUIDANCE_INTERVAL["video"])


def test_metrics_identities() -> None:
    """A set against itself has clip FD and frame FID ~0, noise is far away; real clips have full class agreement
    except where the digits evaluator itself errs, and zero jitter."""
    from fewstep.bench.video_metrics import VideoMetrics
    from fewstep.worlds.video.evaluator import VideoEvaluator

    torch.manual_seed(0)
    metrics = VideoMetrics.load(clip_path=None) if _shipped() else VideoMetrics(VideoEvaluator().eval(), _digits())
    held_out = metrics.reference("held_out")
    assert abs(metrics.fd_held_out(held_out)) < 1e-2
    assert abs(metrics.frame_fid(held_out)) < 1e-2
    assert metrics.fd_held_out(torch.rand_like(held_out[:500])) > 100 * max(abs(metrics.fd_held_out(held_out)), 1e-3)
    assert metrics.class_agreement(held_out) > 0.95
    ref = reference_clips("held_out")
    assert metrics.diversity(held_out[:10].repeat(3, 1, 1, 1), torch.zeros(30).long(), torch.zeros(30).long()) > 0
    same = held_out[:1].expand(5, -1, -1, -1)
    # zero up to cdist's rounding (it expands |a - b|^2; 4e-6 seen on CI) against a real diversity of about 27
    assert metrics.diversity(same, ref.labels[:5] * 0, ref.motions[:5] * 0) == pytest.approx(0.0, abs=1e-3)


def _shipped() -> bool:
    from fewstep.loading import embedded_path

    return (Path(str(embedded_path("evaluator", world="video"))) / "TRAINING.md").is_file()


def _digits() -> torch.nn.Module:
    from fewstep.bench.metrics import load_evaluator

    return load_evaluator()


@pytest.mark.skipif(not _shipped(), reason="the trained video evaluator is not shipped in this checkout")
def test_shipped_evaluator_reads_real_clips() -> None:
    from fewstep.bench.video_metrics import VideoMetrics

    metrics = VideoMetrics.load()
    ref = reference_clips("held_out")
    clips = metrics.reference("held_out")
    accuracy, motion = metrics.accuracies(clips, ref.labels, ref.motions)
    assert accuracy > 0.95 and motion > 0.95
    shuffled = ref.motions[torch.randperm(len(ref.motions), generator=torch.Generator().manual_seed(0))]
    assert metrics.accuracies(clips, ref.labels, shuffled)[1] < 0.4


def test_bench_on_video_pipeline_writes_clip_columns_and_gifs(random_video: Path, tmp_path: Path) -> None:
    from fewstep.bench.run import BenchConfig, run_bench
    from fewstep.errors import FewstepError

    cfg = BenchConfig(
        steps=(1, 2), num=50, seeds=2, batch_size=50, latency_batch=5, repeats=1, floor_subsets=2, progress=False
    )
    report = run_bench([str(random_video)], tmp_path / "report", cfg)
    ref = report["reference"]
    assert ref["world"] == "video" and ref["real_jitter"] < 1e-4 and ref["floor_num_samples"] == 50
    for row in report["rows"]:
        for key in ("fid", "fid_train", "frame_fid", "accuracy", "motion_accuracy", "class_agreement", "jitter"):
            assert isinstance(row[key], float), key
        assert (tmp_path / "report" / row["grid"]).is_file() and (tmp_path / "report" / row["animation"]).is_file()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "clip FD" in md and "frame FID" in md and "[gif]" in md
    with pytest.raises(FewstepError, match="video rows"):  # a digits bench into this report is refused
        run_bench(["digits"], tmp_path / "report", BenchConfig(steps=(1,), num=10, seeds=1, progress=False))


def test_bench_names_and_counts_a_folders_guidance_interval(random_video: Path, tmp_path: Path) -> None:
    """2 Euler steps sit at sigma 1 and .5: on (0.4, 0.8] only the second is guided (NFE 1 + 2 at w 2, 2 at w 1)."""
    from fewstep.bench.run import BenchConfig, run_bench
    from fewstep.worlds.video.pipeline import VideoDigitsPipeline

    pipe = VideoDigitsPipeline.from_pretrained(str(random_video))
    VideoDigitsPipeline(pipe.transformer, pipe.scheduler, guidance_interval=(0.4, 0.8)).save_pretrained(tmp_path / "m")
    cfg = BenchConfig(
        steps=(2,), guidance=(1.0, 2.0), num=50, seeds=1, batch_size=50, latency_batch=5, repeats=1, floor_subsets=1,
        progress=False,
    )  # fmt: skip
    rows = {r["guidance"]: r for r in run_bench([str(tmp_path / "m")], tmp_path / "report", cfg)["rows"]}
    assert rows[2.0]["guidance_interval"] == [0.4, 0.8] and rows[2.0]["nfe"] == 3
    assert rows[1.0]["guidance_interval"] is None and rows[1.0]["nfe"] == 2
    assert "| 2.0 on (0.4, 0.8] |" in (tmp_path / "report" / "report.md").read_text()


def test_sample_writes_frame_strips_gif_and_clips(random_video: Path, tmp_path: Path) -> None:
    import numpy as np

    from fewstep.sample import run_sample

    out = run_sample(str(random_video), tmp_path / "s", steps=1, num=6, guidance=1.0, seed=0)
    assert {p.name for p in out.iterdir()} == {"grid.png", "samples.gif", "samples.npz", "meta.json"}
    clips = np.load(out / "samples.npz")["images"]
    assert clips.shape == (6, NUM_FRAMES, CANVAS, CANVAS) and clips.dtype == np.uint8
    meta = json.loads((out / "meta.json").read_text())
    assert meta["motions"][:2] == ["still", "still"] and meta["labels"][:2] == [0, 1]


def test_teacher_training_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four steps in one go equal two steps, a stop, and two more from the checkpoint (the Trainer's exact resume)."""
    from conftest import tiny_video_model

    import fewstep.worlds.video.train as train

    monkeypatch.setattr(train, "make_video_teacher_model", tiny_video_model)
    cfg = train.VideoTeacherConfig(steps=4, batch_size=4, checkpoint_every=2, max_minutes=None)
    whole = train.train_video_teacher(tmp_path / "a", tmp_path / "ca", cfg, progress=False)
    half = train.VideoTeacherConfig(steps=2, batch_size=4, checkpoint_every=2, max_minutes=None)
    train.train_video_teacher(tmp_path / "b0", tmp_path / "cb", half, progress=False)
    resumed = train.train_video_teacher(tmp_path / "b", tmp_path / "cb", cfg, resume=True, progress=False)
    from safetensors.torch import load_file

    a = load_file(whole / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "steps 2..4" in (resumed / "TRAINING.md").read_text()


def test_teacher_train_refuses_to_restart_over_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One line, exit 2, nothing written: a video run over existing checkpoints without --resume, and --resume for the
    digits teacher (which trains in one go)."""
    from fewstep.cli import main

    step = tmp_path / "runs" / "teacher-run" / "checkpoints" / "step-00000250"
    step.mkdir(parents=True)
    assert main(["teacher", "train", "--world", "video", "--what", "teacher", "--output", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and len(err.splitlines()) == 1
    assert main(["teacher", "train", "--what", "teacher", "--resume", "--output", str(tmp_path / "d")]) == 2
    assert "video teacher" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["teacher-run"] and not (tmp_path / "d").exists()


def test_shipped_teacher_rows_are_what_a_bench_measures_now() -> None:
    """The video teacher's rows shipped with the package (fewstep/assets/video/teacher_bench, what distill reports a
    first video student against) stand for today's teacher, evaluators, bench settings and columns, and today's code
    measures them again: seed 0 of the 2-step row (Euler at sigma 1 and 0.5, guided at 0.5, inside the teacher's
    interval), to float rounding (they were measured with another thread count; 1 and 2 threads agreed to the bit)."""
    from fewstep.bench.shipped import shipped_rows
    from fewstep.bench.worlds import VideoWorld
    from fewstep.distill import teacher_bench_config
    from fewstep.loading import load_pipeline

    cfg = teacher_bench_config("video", [1, 2, 4])
    folder = shipped_rows("video", cfg)
    assert folder is not None, "stale: python benchmarks/ship_teacher_bench.py --world video measures them again"
    rows = {r["steps"]: r for r in json.loads((folder / "report.json").read_text())["rows"]}
    assert sorted(rows) == [1, 2, 4, 50] and all((folder / r["grid"]).is_file() for r in rows.values())
    metrics = VideoWorld().score(load_pipeline("video"), cfg.num, 2, cfg.guidance[0], 0, cfg.batch_size).metrics
    assert metrics["fid"] == pytest.approx(rows[2]["fid_seeds"][0], rel=1e-4)
    assert metrics["fid_train"] == pytest.approx(rows[2]["fid_train_seeds"][0], rel=1e-4)
