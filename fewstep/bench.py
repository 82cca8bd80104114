"""``fewstep bench``: quality, latency, memory and NFE of any diffusers folder at several step counts.

For the digits world every row holds FID against the held-out split and against the whole train split (each the
mean over ``seeds`` noise seeds), class accuracy of the conditional samples, latency per batch and per image (warm-up,
repeats, median and p90; CUDA events on a GPU), peak memory and NFE counted by a hook on the backbone, so CFG's
second branch counts. Results merge into an existing report folder, replacing rows of the same model, step count and
guidance, so students sit next to their teacher.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .digits.data import NUM_CLASSES, balanced_labels
from .errors import FewstepError
from .images import save_grid
from .io import atomic_dir, check_writable_parent
from .metrics import DigitsMetrics, FeatureFID
from .report import write_report
from .teacher import load_pipeline, resolve_source


@dataclass(frozen=True)
class BenchConfig:
    steps: Sequence[int] = (1, 2, 4, 50)
    guidance: Sequence[float] = (1.0,)
    num: int = 1000  # generated samples per seed
    seeds: int = 3
    batch_size: int = 500  # generation batch for the metrics
    latency_batch: int = 100
    warmup: int = 1
    repeats: int = 5
    floor_subsets: int = 3
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> None:
        if not self.steps or any(s < 1 for s in self.steps):
            raise FewstepError(f"step counts must be >= 1, got {list(self.steps)}")
        if self.num < 1 or self.seeds < 1 or self.repeats < 1 or self.latency_batch < 1:
            raise FewstepError("--num, --seeds, --repeats and --latency-batch must be >= 1")
        if any(g < 0 for g in self.guidance):
            raise FewstepError(f"guidance must be >= 0, got {list(self.guidance)}")


@dataclass
class Row:
    model: str
    steps: int
    nfe: int
    guidance: float | None
    fid: float | None
    fid_std: float
    latency_ms: float
    latency_ms_p90: float
    latency_ms_per_image: float
    peak_mem_mb: float
    num_samples: int
    fid_train: float | None = None
    accuracy: float | None = None
    clip_score: float | None = None
    fid_seeds: list[float] = field(default_factory=list)
    fid_train_seeds: list[float] = field(default_factory=list)
    grid: str | None = None
    source: str = ""


def model_label(source: str) -> str:
    return "digits-teacher" if source == "digits" else Path(source.rstrip("/")).name or source


def backbone_of(pipe: Any) -> torch.nn.Module:
    model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if model is None:
        raise FewstepError(f"{type(pipe).__name__} has neither a transformer nor a unet")
    return model


@contextmanager
def count_nfe(model: torch.nn.Module, batch: int) -> Iterator[list[float]]:
    """Count network evaluations per sample: each forward adds (its batch / ``batch``), so batched CFG counts 2."""
    total = [0.0]

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        if x is not None:
            total[0] += x.shape[0] / batch

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield total
    finally:
        handle.remove()


class PeakMemory:
    """Peak memory of a block in MB: CUDA's allocator peak on a GPU, else resident-set growth sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self._base = self._peak = self._rss_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.002):
                self._peak = max(self._peak, self._rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._peak, self._rss_mb()) - self._base


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall time of ``fn`` in ms, ``repeats`` times after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def generate_digits(pipe: Any, num: int, steps: int, guidance: float, seed: int, batch: int) -> tuple[Tensor, Tensor]:
    """``num`` class-balanced samples in [0, 1] with one generator per seed, in batches of ``batch``."""
    labels = balanced_labels(num)
    gen = torch.Generator().manual_seed(seed)
    images = [
        pipe(class_labels=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images.cpu()
        for chunk in labels.split(batch)
    ]
    return torch.cat(images), labels


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    from . import __version__

    env: dict[str, Any] = {
        "fewstep": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


@dataclass
class Speed:
    nfe: int
    peak_mem_mb: float
    times_ms: list[float]


def measure_speed(pipe: Any, call: dict[str, Any], batch: int, cfg: BenchConfig) -> Speed:
    """NFE and peak memory of one call, then its latency over ``cfg.repeats`` runs after ``cfg.warmup``."""
    device = torch.device(cfg.device)
    run = functools.partial(pipe, **call)
    with count_nfe(backbone_of(pipe), batch) as nfe, PeakMemory(device) as mem:
        run()
    return Speed(round(nfe[0]), mem.peak_mb, time_call(run, device, cfg.warmup, cfg.repeats))


def make_row(
    label: str,
    source: str,
    steps: int,
    guidance: float,
    speed: Speed,
    batch: int,
    num: int,
    fids: list[float],
    **extra: Any,
) -> Row:
    median = statistics.median(speed.times_ms)
    return Row(
        model=label,
        steps=steps,
        nfe=speed.nfe,
        guidance=guidance,
        fid=statistics.mean(fids) if fids else None,
        fid_std=statistics.stdev(fids) if len(fids) > 1 else 0.0,
        latency_ms=median,
        latency_ms_p90=percentile(speed.times_ms, 0.9),
        latency_ms_per_image=median / batch,
        peak_mem_mb=speed.peak_mem_mb,
        num_samples=num,
        fid_seeds=fids,
        source=source,
        **extra,
    )


def bench_digits_model(
    pipe: Any, source: str, cfg: BenchConfig, metrics: DigitsMetrics, out_dir: Path, bar: tqdm
) -> list[Row]:
    label = model_label(source)
    rows = []
    for guidance in cfg.guidance:
        for steps in cfg.steps:
            fids, fids_train, accs = [], [], []
            for seed in range(cfg.seeds):
                bar.set_postfix_str(f"{label} steps={steps} w={guidance:g} seed={seed}")
                images, labels = generate_digits(pipe, cfg.num, steps, guidance, seed, cfg.batch_size)
                fids.append(metrics.fid_held_out(images))
                fids_train.append(metrics.fid_train(images))
                accs.append(metrics.accuracy(images, labels))
                if seed == 0:
                    grid = f"grid_{label}_{steps}steps_w{guidance:g}.png"
                    first = torch.cat([images[labels == c][:NUM_CLASSES] for c in range(NUM_CLASSES)])
                    save_grid(first, out_dir / grid, nrow=NUM_CLASSES)
                bar.update(1)
            call = dict(
                class_labels=balanced_labels(cfg.latency_batch), num_inference_steps=steps, guidance_scale=guidance
            )
            speed = measure_speed(pipe, call, cfg.latency_batch, cfg)
            rows.append(
                make_row(
                    label,
                    source,
                    steps,
                    guidance,
                    speed,
                    cfg.latency_batch,
                    cfg.num,
                    fids,
                    fid_train=statistics.mean(fids_train),
                    fid_train_seeds=fids_train,
                    accuracy=statistics.mean(accs),
                    grid=grid,
                )
            )
    return rows


@dataclass
class TextWorld:
    """What a text-to-image bench measures against: prompts, an optional CLIP scorer and reference FID."""

    prompts: list[str]
    clip: Any = None  # ClipScorer
    fid: FeatureFID | None = None


def generate_text(pipe: Any, prompts: list[str], steps: int, guidance: float, seed: int, batch: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch):
        result = pipe(
            prompt=prompts[i : i + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="pt",
        )
        out.append(result.images.float().cpu())
    return torch.cat(out)


def bench_text_model(
    pipe: Any, source: str, cfg: BenchConfig, world: TextWorld, out_dir: Path, bar: tqdm
) -> list[Row]:
    label = model_label(source)
    prompts = [world.prompts[i % len(world.prompts)] for i in range(cfg.num)]
    rows = []
    for guidance in cfg.guidance:
        for steps in cfg.steps:
            fids, clips = [], []
            for seed in range(cfg.seeds):
                bar.set_postfix_str(f"{label} steps={steps} w={guidance:g} seed={seed}")
                images = generate_text(pipe, prompts, steps, guidance, seed, cfg.batch_size)
                if world.fid is not None:
                    fids.append(world.fid(images))
                if world.clip is not None:
                    clips.append(world.clip(images, prompts))
                if seed == 0:
                    grid = f"grid_{label}_{steps}steps_w{guidance:g}.png"
                    save_grid(images[:16], out_dir / grid, nrow=4, upscale=1)
                bar.update(1)
            call = dict(prompt=prompts[: cfg.latency_batch], num_inference_steps=steps, guidance_scale=guidance)
            speed = measure_speed(pipe, call, min(cfg.latency_batch, len(prompts)), cfg)
            rows.append(
                make_row(
                    label,
                    source,
                    steps,
                    guidance,
                    speed,
                    min(cfg.latency_batch, len(prompts)),
                    cfg.num,
                    fids,
                    clip_score=statistics.mean(clips) if clips else None,
                    grid=grid,
                )
            )
    return rows


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Old rows not measured again, then the new ones (same model, steps and guidance replace)."""
    keys = {(r["model"], r["steps"], r["guidance"]) for r in new}
    return [r for r in old if (r["model"], r["steps"], r["guidance"]) not in keys] + new


@dataclass(frozen=True)
class TextOptions:
    """Inputs of a text-to-image bench: prompts file, ``ARCH:CHECKPOINT`` for CLIP, a reference image folder."""

    prompts: str | None = None
    clip: str | None = None
    reference: str | None = None
    fid_features: str = "inception"


def text_world(pipe: Any, options: TextOptions) -> TextWorld:
    from .clip import ClipScorer
    from .metrics import reference_fid
    from .prompts import read_prompts

    if options.prompts is None:
        raise FewstepError(f"{type(pipe).__name__} is a text-to-image pipeline: pass --prompts FILE")
    world = TextWorld(prompts=read_prompts(options.prompts))
    if options.clip:
        world.clip = ClipScorer.load(options.clip)
    if options.reference:
        probe = pipe(prompt=world.prompts[:1], num_inference_steps=1, output_type="pt").images
        world.fid = reference_fid(options.reference, options.fid_features, tuple(probe.shape[-2:]))
    if world.clip is None and world.fid is None:
        raise FewstepError("nothing to measure quality with: pass --clip ARCH:CHECKPOINT and/or --reference DIR")
    return world


def run_bench(
    sources: Sequence[str], report_dir: Path, cfg: BenchConfig, text: TextOptions | None = None
) -> dict[str, Any]:
    """Benchmark every source and write report.json, report.md, grids and plots to ``report_dir`` atomically."""
    from .digits.pipeline import DigitsPipeline

    cfg.validate()
    for source in sources:  # every input checked before any work starts
        resolve_source(source)
    check_writable_parent(report_dir)
    pipes = [load_pipeline(source, device=cfg.device) for source in sources]
    digits = [isinstance(p, DigitsPipeline) for p in pipes]
    if any(digits) and not all(digits):
        raise FewstepError("bench either digits-world pipelines or text-to-image pipelines in one report, not both")
    metrics = DigitsMetrics.load() if all(digits) else None
    world = None if metrics is not None else text_world(pipes[0], text or TextOptions())
    total = len(sources) * len(cfg.guidance) * len(cfg.steps) * cfg.seeds
    with atomic_dir(report_dir, keep_existing=True) as tmp:
        old: dict[str, Any] = {}
        if (tmp / "report.json").is_file():
            old = json.loads((tmp / "report.json").read_text())
        rows: list[Row] = []
        with tqdm(total=total, desc="bench", disable=not cfg.progress) as bar:
            for pipe, source in zip(pipes, sources, strict=True):
                if metrics is not None:
                    rows += bench_digits_model(pipe, source, cfg, metrics, tmp, bar)
                else:
                    assert world is not None
                    rows += bench_text_model(pipe, source, cfg, world, tmp, bar)
        report = {
            "rows": merge_rows(old.get("rows", []), [row.__dict__ for row in rows]),
            "reference": digits_reference(metrics, cfg) if metrics is not None else text_reference(text, world),
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
            "env": environment(torch.device(cfg.device)),
        }
        write_report(report, tmp)
    return report


def digits_reference(metrics: DigitsMetrics, cfg: BenchConfig) -> dict[str, Any]:
    from .digits.data import load_split
    from .metrics import to_unit

    floor, floor_std, floor_count = metrics.floor(cfg.num, subsets=cfg.floor_subsets)
    return {
        "real_fid_floor": floor,
        "real_fid_floor_std": floor_std,
        "real_fid_floor_subsets": cfg.floor_subsets,
        "floor_num_samples": floor_count,
        "held_out_vs_train_fid": metrics.fid_train(to_unit(load_split("held_out").images)),
        "evaluator": "digits CNN, 128-d penultimate features",
    }


def text_reference(text: TextOptions | None, world: TextWorld | None) -> dict[str, Any]:
    assert text is not None and world is not None
    return {
        "real_fid_floor": None,  # one reference set gives no real-vs-real floor
        "reference_dir": text.reference,
        "fid_features": text.fid_features if text.reference else None,
        "clip": text.clip,
        "prompts": text.prompts,
        "num_prompts": len(world.prompts),
    }
