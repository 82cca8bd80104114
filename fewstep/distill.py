"""``fewstep distill``: teacher -> recipe -> Trainer -> exported student (-> bench report on an embedded world).

Run folder layout:
  checkpoints/   resumable training state (``--resume``)
  student/       the few-step student: a diffusers folder, or LoRA weights plus ``scheduler/`` for LoRA recipes
  bench/         (digits and video worlds) report.json / report.md / plots: the student's rows next to the teacher's
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import FewstepError
from .recipes.base import Recipe
from .teacher import Denoiser


def training_data(pipe: Any, teacher: Denoiser, source: str, cfg: Any, cache_dir: Path) -> Any:
    """Batches for the teacher's world: digits images with class labels, moving-digits clips with their condition
    tokens, or cached prompt conditions with the teacher's own samples as x0 (image-free)."""
    from .training.data import DigitsBatches, PromptBatches, null_class_of
    from .worlds.digits.pipeline import DigitsPipeline
    from .worlds.video.pipeline import VideoDigitsPipeline

    train = cfg.train
    if isinstance(pipe, VideoDigitsPipeline):
        from .training.data import VideoBatches

        if cfg.data.image_free:
            raise FewstepError("the video world trains on its own clips; data.image_free is for the digits world")
        return VideoBatches(train.batch_size, train.seed)
    if isinstance(pipe, DigitsPipeline):
        null = null_class_of(teacher.model)
        if cfg.data.image_free:
            return PromptBatches.digits_image_free(teacher, null, cfg.data, train.batch_size, train.seed, cache_dir)
        return DigitsBatches(null, train.batch_size, train.seed)
    return PromptBatches.for_teacher(pipe, teacher, source, cfg.data, train.batch_size, train.seed, cache_dir)


def prepare_teacher(pipe: Any, denoiser: Denoiser, cfg: Any) -> Denoiser:
    """The teacher as recipes see it: checked for every component its family needs (one line naming a missing one,
    before any work), at the time shift it samples with at the training size (FLUX.1-dev's dynamic shifting),
    carrying its pipeline's stock samplers (``export.stock``), which set the recipes' default plans, and its VAE's
    decoder for rewards on images (``training.families.image_decoder``)."""
    from .export.stock import StockPlans
    from .worlds.digits.pipeline import DigitsPipeline
    from .worlds.video.pipeline import VideoDigitsPipeline

    native, decode = denoiser.native, None
    if not isinstance(pipe, DigitsPipeline | VideoDigitsPipeline):
        from .training.data import teacher_geometry
        from .training.families import check_components, dynamic_shift_schedule, image_decoder

        check_components(pipe)
        _, _, shape = teacher_geometry(pipe, cfg.data)
        native = dynamic_shift_schedule(pipe, denoiser.native, shape)
        decode = image_decoder(pipe)
    stock = StockPlans.of(pipe, native, denoiser.prediction)
    return Denoiser(
        denoiser.model, native, denoiser.prediction, backbone=denoiser.backbone, stock=stock, decode=decode
    )


def check_exportable(recipe: Recipe, pipe: Any, teacher: Denoiser) -> None:
    """Refuse, before any work, a plan the teacher's pipeline cannot run: SanaSprintPipeline's loop runs only
    SCMScheduler (it drops the scheduler's final timestep and hands it sigma_d F), so its students need SCM's plans."""
    if type(pipe).__name__ != "SanaSprintPipeline":
        return
    from .export.pipeline import scheduler_for_plan

    plans = teacher_plans(recipe, teacher.native)
    if type(scheduler_for_plan(plans, teacher.prediction, teacher.stock)).__name__ != "SCMScheduler":
        times = {n: [round(t, 4) for t in p.times] for n, p in plans.items()}
        raise FewstepError(
            f"SanaSprintPipeline samples only SCMScheduler's plans (fresh noise at 1.5708, 1.3 for 2 steps, else "
            f"uniform in angle); {recipe.name}'s plans {times} (gamma {next(iter(plans.values())).gamma}) are not"
        )


def export_student(
    recipe: Recipe, student: torch.nn.Module, pipe: Any, native: Any, prediction: str, out: Path, stock: Any = None,
    base: str | None = None,
) -> Path:  # fmt: skip
    """Write the student with the scheduler that reproduces the recipe's plans in the teacher's own time: the
    pipeline's stock one (``stock``) where it does, else FewStepScheduler. A LoRA student's folder also names its
    ``base`` (the teacher's source; ``loading.LORA_BASE``), so fewstep's commands load it as they load a pipeline."""
    import os

    from .export.pipeline import export_lora, export_pipeline, scheduler_for_plan
    from .io import atomic_dir
    from .loading import LORA_BASE

    plans = teacher_plans(recipe, native)
    scheduler = scheduler_for_plan(plans, prediction, stock)
    model = recipe.export_module(student)
    if not recipe.is_lora:
        return Path(export_pipeline(pipe, model, scheduler, out))
    export_lora(pipe, model, out)
    with atomic_dir(out / "scheduler", "scheduler_config.json") as tmp:
        scheduler.save_pretrained(tmp)
    if base is not None:  # a local folder by its absolute path, so the run folder can move; hub ids and worlds as is
        _write_text(out / LORA_BASE, json.dumps({"base": os.path.abspath(base) if os.path.isdir(base) else base}))
    return out


def teacher_plans(recipe: Recipe, native: Any) -> dict[int, Any]:
    """The recipe's plans (in whatever time it keeps them) in the teacher's own time."""
    from .sampling import plan_in

    return {n: plan_in(p, native) for n, p in recipe.plan().items()}


def native_plans(recipe: Recipe, native: Any) -> dict[str, Any]:
    """The recipe's plans in the teacher's own time, as training.json records them: {"plans": {n: times}, "gamma"},
    "gammas" {n: gamma} where the plans' gammas differ, and "rule" where gamma takes TCD's (``sampling.RULES``)."""
    plans = teacher_plans(recipe, native)
    gamma = next(iter(plans.values())).gamma
    out: dict[str, Any] = {"plans": {str(n): list(p.times) for n, p in plans.items()}, "gamma": gamma}
    if any(p.gamma != gamma for p in plans.values()):
        out["gammas"] = {str(n): p.gamma for n, p in plans.items()}
    rule = next(iter(plans.values())).rule
    if rule != "ratio":
        out["rule"] = rule
    return out


def _write_text(path: Path, text: str) -> None:
    from .io import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(text)


def run_distill(
    recipe_cls: type[Recipe], cfg: Any, teacher: str, output: Path, resume: str | None = None, bench: bool = True,
    bench_seeds: int | None = None,
) -> Path:  # fmt: skip
    """Train ``recipe_cls`` with ``cfg`` on ``teacher`` into ``output``; returns the student folder.

    ``resume``: None starts fresh (refusing a folder that already holds checkpoints), "" continues from the last good
    checkpoint in ``output/checkpoints``, a path continues from that checkpoint.

    Under a launcher (``torchrun``, ``accelerate launch``) with ``train.parallel`` set, every process trains its slice
    of each batch; the first then reads the final (sharded) checkpoint back into one process, whole, and exports
    from it exactly as a one-process run does, while the others end. ``bench_seeds``: the noise seeds of the bench
    report on an embedded world (None: the bench's own default).
    """
    from .training.config import to_toml, validate_config
    from .training.parallel import Processes, alone
    from .training.trainer import Trainer
    from .worlds import EMBEDDED

    validate_config(cfg)  # callers that built cfg themselves: still nothing written for a bad value
    processes = Processes.start(cfg.train.parallel, cfg.train.dist_timeout_s)
    ckpt_dir = output / "checkpoints"
    if resume is None and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise FewstepError(f"{output} already holds checkpoints: pass --resume to continue or choose another --output")
    denoiser, pipe, recipe = _setup(recipe_cls, cfg, teacher)
    data = training_data(pipe, denoiser, teacher, cfg, output / "cache")
    processes.barrier()  # every process has checked the folder before the first one writes to it
    trainer = Trainer(recipe, cfg.train, ckpt_dir, data, processes=processes)
    if resume is not None:
        found = trainer.resume(Path(resume) if resume else None)
        if processes.is_main:
            print(f"resumed from {found} (step {trainer.step})")
    if processes.is_main:
        output.mkdir(parents=True, exist_ok=True)
        _write_text(output / "config.toml", to_toml(cfg))
    trainer.fit()
    if processes.active:
        processes.finish()
        if not processes.is_main:
            return output / "student"
        del trainer, recipe, denoiser, pipe, data  # sharded on a group that is gone: read the checkpoint back whole
        with alone():
            denoiser, pipe, recipe = _setup(recipe_cls, cfg, teacher)
            trainer = Trainer(recipe, cfg.train, ckpt_dir, None, processes=Processes())
            trainer.resume()
    student = trainer.ema.get("student") or trainer.accelerator.unwrap_model(trainer.nets["student"])
    folder = export_student(
        recipe, student, pipe, denoiser.native, denoiser.prediction, output / "student", denoiser.stock, teacher
    )
    summary = {
        "steps": trainer.step, "skipped": trainer.skipped, "recipe": recipe.name, "teacher": teacher,
        "processes": processes.world, "parallel": cfg.train.parallel if processes.active else "none",
        **native_plans(recipe, denoiser.native),
    }  # fmt: skip
    _write_text(output / "training.json", json.dumps(summary) + "\n")
    write_card(folder, recipe, pipe, teacher, denoiser.native)
    if bench and teacher in EMBEDDED:
        bench_student(folder, teacher, sorted(recipe.plan()), output / "bench", bench_seeds)
        write_card(folder, recipe, pipe, teacher, denoiser.native, output / "bench" / "report.json")
    return folder


def _setup(recipe_cls: type[Recipe], cfg: Any, teacher: str) -> tuple[Denoiser, Any, Recipe]:
    """(teacher Denoiser, its pipeline, the recipe on it), checked as exportable before any training."""
    from .loading import load_denoiser

    # networks a recipe initializes (critic heads, logvar heads, LoRA adapters) start from the run's seed: the same
    # run twice, and every process of one run, begin from the same weights
    torch.manual_seed(cfg.train.seed)
    denoiser, pipe = load_denoiser(teacher)
    denoiser = prepare_teacher(pipe, denoiser, cfg)
    recipe = recipe_cls(denoiser, cfg)  # type: ignore[call-arg]
    check_exportable(recipe, pipe, denoiser)
    return denoiser, pipe, recipe


def write_card(folder: Path, recipe: Recipe, pipe: Any, teacher: str, native: Any, report: Path | None = None) -> None:
    """The student's model card (export/card.py), with the bench rows of ``report`` when given."""
    from .export.card import write_model_card
    from .teacher import VIDEO_BACKBONES, backbone_of, backbone_slot

    plans_in_time = teacher_plans(recipe, native)
    plans = {n: list(p.times) for n, p in plans_in_time.items()}
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    index = folder / "model_index.json"
    libraries = (
        [v[0] for v in json.loads(index.read_text()).values() if isinstance(v, list)] if index.is_file() else []
    )
    scheduler = str(scheduler_config.get("_class_name", ""))
    needs_fewstep = scheduler == "FewStepScheduler" or any(str(lib).startswith("fewstep") for lib in libraries)
    rows = json.loads(report.read_text()).get("rows", []) if report is not None and report.is_file() else []
    write_model_card(
        folder, recipe=recipe.name, paper=type(recipe).paper, teacher=teacher, pipeline=type(pipe).__name__,
        plans=plans, scheduler=scheduler, lora=recipe.is_lora, needs_fewstep=needs_fewstep, bench_rows=rows,
        slot=backbone_slot(pipe), video=type(backbone_of(pipe)).__name__ in VIDEO_BACKBONES,
        gammas={n: p.gamma for n, p in plans_in_time.items()},
    )  # fmt: skip


def bench_cache_dir() -> Path:
    """Where teacher bench rows are kept between runs: $FEWSTEP_CACHE, else ~/.cache/fewstep."""
    import os

    return Path(os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep")


def teacher_bench_key(teacher: str, cfg: Any) -> str:
    """A digest of everything a teacher's bench rows depend on: what they measure (``bench.shipped.rows_key``: the
    teacher's files, the shipped evaluators, the bench settings, the row's columns), and the software and thread count
    that fix the float rounding (and, for latency, this machine)."""
    import hashlib
    import platform

    from . import __version__
    from .bench.shipped import rows_key

    env = [__version__, torch.__version__, str(torch.get_num_threads()), platform.machine(), platform.node()]
    return hashlib.sha256(json.dumps([rows_key(teacher, cfg), env]).encode()).hexdigest()[:16]


def teacher_bench_config(teacher: str, steps: list[int], seeds: int | None = None) -> Any:
    """The settings a student's report benches its teacher under: the student's step counts and 50, at the teacher's
    world's guidance (``worlds.TEACHER_GUIDANCE``, which the presets distil in; named, so that the cache key holds
    it), over ``seeds`` noise seeds (None: the bench's default)."""
    from .bench.run import BenchConfig
    from .worlds import teacher_guidance

    seeds = BenchConfig().seeds if seeds is None else seeds
    return BenchConfig(steps=tuple(sorted({*steps, 50})), guidance=(teacher_guidance(teacher),), seeds=seeds)


def bench_student(student: Path, teacher: str, steps: list[int], report: Path, seeds: int | None = None) -> None:
    """The student at its plan's step counts next to the teacher at the same counts and at 50 steps (one report): the
    teacher at its world's guidance (``worlds.TEACHER_GUIDANCE``, which the presets distil in), the student at 1,
    both averaged over the same ``seeds`` noise seeds (None: the bench's default). Benching a student again (with more
    seeds, say) replaces the earlier rows.

    The teacher's rows are deterministic for a given teacher, bench settings and machine, so they are measured once
    and then copied from the cache (about 1.5 of the 2 minutes a digits bench takes on 2 cores). The cache entry is
    read and written under its inter-process lock: of several runs that need it at once, one measures and the others
    wait and copy. Where this machine has no entry, an embedded world's teacher rows shipped with the package stand in
    if they measured the same thing (``bench.shipped``; the video teacher's take about 40 minutes of 2 cores), marked
    as measured elsewhere in the report."""
    import shutil
    from contextlib import ExitStack

    from .bench.run import BenchConfig, run_bench
    from .bench.shipped import shipped_rows
    from .io import atomic_dir, check_writable_parent, locked

    teacher_cfg = teacher_bench_config(teacher, steps, seeds)
    entry = bench_cache_dir() / "teacher-bench" / teacher_bench_key(teacher, teacher_cfg)
    with ExitStack() as stack:
        cache: Path | None = entry
        try:
            check_writable_parent(entry, "report.json")
            stack.enter_context(locked(entry))
        except (OSError, FewstepError):  # an unwritable cache only costs time: the teacher is measured into the report
            cache = None
        source: Path | None = cache
        if cache is not None and (cache / "report.json").is_file():
            print(f"teacher rows from {cache}")
        elif (shipped := shipped_rows(teacher, teacher_cfg)) is not None:
            where = json.loads((shipped / "report.json").read_text())["shipped"]["measured"]
            counts = ",".join(str(n) for n in teacher_cfg.steps)
            print(f"teacher rows shipped with fewstep (measured {where}; `fewstep bench {teacher} --steps {counts}`")
            print("measures them on this machine)")
            source = shipped
        else:
            run_bench([teacher], cache or report, teacher_cfg)
        if source is not None:
            with locked(report), atomic_dir(report, "report.json") as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
    run_bench([str(student)], report, BenchConfig(steps=tuple(steps), seeds=teacher_cfg.seeds))
