"""``fewstep bench``: quality, latency, memory and NFE of any diffusers folder at several step counts.

Every row holds quality as the mean over ``seeds`` noise seeds (FID against the held-out and the train split and class
accuracy in the digits world; CLIP score and reference FID for text-to-image), latency per batch and per image
(warm-up, repeats, median and p90; CUDA events on a GPU), peak memory, and NFE counted by a hook on the backbone so
that CFG's second branch counts. Results merge into an existing report folder, replacing rows of the same model, step
count, guidance and runtime settings (dtype, attention backend, torch.compile: see ``runtime``), so students sit
next to their teacher and a compiled bf16 row next to the plain fp32 one; benches running at once into one folder all
keep their rows (the merge holds an inter-process lock).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import FewstepError
from ..io import atomic_dir, check_writable_parent, locked
from ..loading import model_label, resolve_source
from ..worlds import EMBEDDED
from .images import save_animation, save_grid
from .measure import environment, measure_speed, percentile
from .report import write_report
from .runtime import load_pipelines, runtime_of, runtime_tag, validate_runtime
from .worlds import DigitsWorld, TextOptions, TextWorld, VideoWorld

World = DigitsWorld | VideoWorld | TextWorld

VIDEO_METRICS = ("frame_fid", "motion_accuracy", "class_agreement", "jitter")


@dataclass(frozen=True)
class BenchConfig:
    steps: Sequence[int] = (1, 2, 4, 50)
    guidance: Sequence[float] = ()  # CFG scales; empty: each model at its own (guidance_of)
    num: int = 1000  # generated samples per seed
    seeds: int = 3
    batch_size: int = 500  # generation batch for the metrics
    latency_batch: int = 100
    warmup: int = 1
    repeats: int = 5
    floor_subsets: int = 3
    device: str = "cpu"
    progress: bool = True
    attention: str = "sdpa"  # "sdpa" (PyTorch, diffusers' default) or "xformers" (the gpu extra, CUDA only)
    compile: bool = False  # torch.compile of the denoiser (unet or transformer)
    dtype: str = "fp32"  # "fp32", "fp16" or "bf16": the dtype the pipeline loads in

    def validate(self) -> None:
        if not self.steps or any(s < 1 for s in self.steps):
            raise FewstepError(f"step counts must be >= 1, got {list(self.steps)}")
        if self.num < 1 or self.seeds < 1 or self.repeats < 1 or self.latency_batch < 1:
            raise FewstepError("--num, --seeds, --repeats and --latency-batch must be >= 1")
        if any(g < 0 for g in self.guidance):
            raise FewstepError(f"guidance must be >= 0, got {list(self.guidance)}")
        validate_runtime(self.attention, self.compile, self.dtype)


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
    diversity: float | None = None  # per-class mean pairwise feature distance (digits)
    clip_score: float | None = None
    patch_fid: float | None = None  # coco-dmd2 protocol: FID on center 299 x 299 crops (images of >= 299 px)
    fid_floor: float | None = None  # real-vs-real floor at this row's sample count
    frame_fid: float | None = None  # video world: FID of each frame's digit window (digits evaluator)
    motion_accuracy: float | None = None  # video world
    class_agreement: float | None = None  # video world: consecutive frames of one class
    jitter: float | None = None  # video world: wobble of the digit's track, px
    fid_seeds: list[float] = field(default_factory=list)
    fid_train_seeds: list[float] = field(default_factory=list)
    grid: str | None = None
    animation: str | None = None  # video world: the grid's clips as a GIF
    source: str = ""
    attention: str = "sdpa"
    compile: bool = False
    dtype: str = "fp32"
    guidance_interval: list[float] | None = None  # (lo, hi] of sigma where the pipeline applied ``guidance``


def source_key(source: str) -> str:
    """What identifies a model across runs: 'digits' or 'video', an absolute folder path, or a hub id."""
    return source if source in EMBEDDED or not Path(source).exists() else str(Path(source).resolve())


def unique_labels(keys: Sequence[str], taken: dict[str, str]) -> dict[str, str]:
    """A short row label per source key: the folder name, or parent-name where two folders share a name.

    taken: label -> source key of rows already in the report (kept as they are).
    """
    labels = {}
    used = dict(taken)
    for key in keys:
        reuse = [label for label, k in taken.items() if k == key]
        label = reuse[0] if reuse else model_label(key)
        if used.get(label, key) != key:
            path = Path(key)
            label = f"{path.parent.name}-{path.name}"
        used[label] = key
        labels[key] = label
    return labels


def guidance_of(cfg: BenchConfig, source: str) -> tuple[float, ...]:
    """The CFG scales to bench ``source`` at: the config's, else its own: an embedded world's teacher at the guidance
    it is sampled and distilled at (``worlds.TEACHER_GUIDANCE``), anything else (students, folders, hub ids) at 1."""
    from ..worlds import teacher_guidance

    return tuple(cfg.guidance) or (teacher_guidance(source),)


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def bench_model(
    pipe: Any, source: str, label: str, world: World, cfg: BenchConfig, out_dir: Path, bar: tqdm
) -> list[Row]:
    """One row per (guidance, steps): quality over ``cfg.seeds`` seeds, then speed on one latency batch."""
    rows = []
    for guidance in guidance_of(cfg, source):
        for steps in cfg.steps:
            per_seed: dict[str, list[float]] = {}
            grid = grid_name(label, steps, guidance, runtime_tag(asdict(cfg)))
            animation = None
            for seed in range(cfg.seeds):
                bar.set_postfix_str(f"{label} steps={steps} w={guidance:g} seed={seed}")
                scored = world.score(pipe, cfg.num, steps, guidance, seed, cfg.batch_size)
                for key, value in scored.metrics.items():
                    per_seed.setdefault(key, []).append(value)
                if seed == 0:
                    save_grid(scored.grid, out_dir / grid, nrow=scored.nrow, upscale=scored.upscale)
                    if scored.animation is not None:
                        animation = grid.removesuffix(".png") + ".gif"
                        save_animation(scored.animation, out_dir / animation, nrow=1, upscale=scored.upscale)
                bar.update(1)
            call = world.latency_call(steps, guidance, cfg.latency_batch)
            warmup = max(cfg.warmup, 1) if cfg.compile else cfg.warmup  # compiling the latency shape is not timed
            speed = measure_speed(pipe, call, cfg.latency_batch, torch.device(cfg.device), warmup, cfg.repeats)
            median = statistics.median(speed.times_ms)
            fids = per_seed.get("fid", [])
            rows.append(
                Row(
                    model=label,
                    steps=steps,
                    nfe=speed.nfe,
                    guidance=guidance,
                    fid=_mean(fids),
                    fid_std=statistics.stdev(fids) if len(fids) > 1 else 0.0,
                    latency_ms=median,
                    latency_ms_p90=percentile(speed.times_ms, 0.9),
                    latency_ms_per_image=median / cfg.latency_batch,
                    peak_mem_mb=speed.peak_mem_mb,
                    num_samples=cfg.num,
                    fid_train=_mean(per_seed.get("fid_train", [])),
                    accuracy=_mean(per_seed.get("accuracy", [])),
                    diversity=_mean(per_seed.get("diversity", [])),
                    clip_score=_mean(per_seed.get("clip_score", [])),
                    patch_fid=_mean(per_seed.get("patch_fid", [])),
                    **{key: _mean(per_seed.get(key, [])) for key in VIDEO_METRICS},
                    fid_seeds=fids,
                    fid_train_seeds=per_seed.get("fid_train", []),
                    grid=grid,
                    animation=animation,
                    source=source,
                    attention=cfg.attention,
                    compile=cfg.compile,
                    dtype=cfg.dtype,
                    guidance_interval=guidance_interval_of(pipe, guidance),
                )
            )
    return rows


def guidance_interval_of(pipe: Any, guidance: float) -> list[float] | None:
    """The interval a pipeline limits its guidance to by itself (a ``guidance_interval`` in its config, as the video
    teacher's folder has), where it guides at all."""
    interval = getattr(pipe, "config", {}).get("guidance_interval") if guidance not in (0.0, 1.0) else None
    return None if interval is None else [float(v) for v in interval]


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What a row measures: model, step count, guidance and runtime settings."""
    return (row["source"], row["steps"], row["guidance"], *runtime_of(row))


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Old rows not measured again, then the new ones (same source, steps, guidance and runtime settings replace)."""
    keys = {row_key(r) for r in new}
    return [r for r in old if row_key(r) not in keys] + new


def grid_name(label: str, steps: int, guidance: float, tag: str = "") -> str:
    """``tag``: the row's runtime settings away from the defaults (``runtime_tag``), so that grids do not collide."""
    settings = "".join(f"_{part}" for part in tag.split(", ") if part)
    return f"grid_{label}_{steps}steps_w{guidance:g}{settings}.png"


def merge_into_report(
    report_dir: Path, rows: list[dict[str, Any]], grids: Path, reference: dict[str, Any], config: dict[str, Any]
) -> dict[str, Any]:
    """Merge ``rows`` (their grids in the folder ``grids``) into ``report_dir`` and rewrite report.json, report.md and
    the plots: read, merge and atomic replace under the report's inter-process lock, so that benches running at once
    into one report all keep their rows. Labels are settled here, against the rows the report holds now."""
    with locked(report_dir), atomic_dir(report_dir, "report.json", keep_existing=True) as tmp:
        old = json.loads((tmp / "report.json").read_text()) if (tmp / "report.json").is_file() else {}
        keys = list(dict.fromkeys(r["source"] for r in rows))
        labels = unique_labels(keys, {r["model"]: r["source"] for r in old.get("rows", [])})
        new = []
        for row in rows:
            label = labels[row["source"]]
            grid = grid_name(label, row["steps"], row["guidance"], runtime_tag(row)) if row.get("grid") else None
            if grid is not None:
                shutil.copyfile(grids / row["grid"], tmp / grid)
            animation = grid.removesuffix(".png") + ".gif" if grid and row.get("animation") else None
            if animation is not None:
                shutil.copyfile(grids / row["animation"], tmp / animation)
            new.append({**row, "model": label, "grid": grid, "animation": animation})
        report = {
            "rows": merge_rows(old.get("rows", []), new),
            "reference": reference,
            "config": config,
            "env": environment(torch.device(config.get("device", "cpu"))),
        }
        write_report(report, tmp)
    return report


def check_protocol(report_dir: Path, text: TextOptions | None) -> None:
    """Rows merge into a report only under the protocol it was made with (their numbers mean different things)."""
    path = report_dir / "report.json"
    if text is None or not path.is_file():
        return
    old = (json.loads(path.read_text()).get("reference", {}).get("protocol") or {}).get("name")
    if old is not None and old != text.protocol:
        raise FewstepError(
            f"{report_dir} holds rows of the {old} protocol: bench {text.protocol} into another --report"
        )


def check_world(report_dir: Path, kind: str) -> None:
    """Rows of one world only in a report (a clip Frechet distance and an image FID are not one column)."""
    path = report_dir / "report.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("reference", {})
    world = old.get("world") or ("digits" if old.get("real_fid_floor") is not None else "text")
    if world != kind:
        raise FewstepError(f"{report_dir} holds {world} rows: bench {kind} pipelines into another --report")


def update_cards(report: dict[str, Any], keys: Sequence[str]) -> None:
    """Each benched student folder that carries a fewstep model card gets its rows of ``report`` in that card."""
    from ..export.card import add_bench_rows

    protocol = (report["reference"].get("protocol") or {}).get("name")
    for key in keys:
        if Path(key).is_dir():
            add_bench_rows(Path(key), [r for r in report["rows"] if r.get("source") == key], protocol)


def run_bench(
    sources: Sequence[str], report_dir: Path, cfg: BenchConfig, text: TextOptions | None = None
) -> dict[str, Any]:
    """Benchmark every source and merge the rows into report.json, report.md, grids and plots in ``report_dir``.

    The measuring runs without a lock, into a private folder next to the report; only the merge holds the report's
    lock (``merge_into_report``), so several benches into one report run side by side and lose no rows."""
    from ..worlds.digits.pipeline import DigitsPipeline
    from ..worlds.video.pipeline import VideoDigitsPipeline

    cfg.validate()
    for source in sources:  # every input checked before any work starts
        resolve_source(source)
    report_dir = report_dir.expanduser().absolute()
    check_writable_parent(report_dir, "report.json")
    check_protocol(report_dir, text)
    pipes = load_pipelines(sources, cfg.device, cfg.attention, cfg.compile, cfg.dtype)
    kinds = {"digits" if isinstance(p, DigitsPipeline) else "video" if isinstance(p, VideoDigitsPipeline) else "text"
             for p in pipes}  # fmt: skip
    if len(kinds) > 1:
        raise FewstepError(
            "bench pipelines of one world in one report (digits, video, or text-to-image), not " + " and ".join(kinds)
        )
    kind = kinds.pop()
    check_world(report_dir, kind)
    world: World = (
        DigitsWorld() if kind == "digits" else VideoWorld() if kind == "video"
        else TextWorld.load(pipes[0], text or TextOptions())
    )  # fmt: skip
    total = sum(len(guidance_of(cfg, s)) for s in sources) * len(cfg.steps) * cfg.seeds
    keys = [source_key(s) for s in sources]
    provisional = unique_labels(keys, {})  # grid names inside the private folder; final labels come at the merge
    work = Path(tempfile.mkdtemp(prefix=f".{report_dir.name}.rows-", dir=report_dir.parent))
    try:
        rows: list[Row] = []
        with tqdm(total=total, desc="bench", disable=not cfg.progress) as bar:
            for pipe, key in zip(pipes, keys, strict=True):
                rows += bench_model(pipe, key, provisional[key], world, cfg, work, bar)
        reference = world.reference(cfg.num, cfg.floor_subsets, cfg.seeds)
        for row in rows:  # each row keeps the floor of its own sample count
            row.fid_floor = reference["real_fid_floor"]
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
        report = merge_into_report(report_dir, [asdict(row) for row in rows], work, reference, config)
        update_cards(report, keys)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
