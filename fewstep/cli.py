"""The ``fewstep`` command line. Parsing imports nothing heavy: torch and diffusers load inside each subcommand, so
``fewstep --help`` answers at once. Bad input gives one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .errors import FewstepError
from .worlds import EMBEDDED

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"step counts must be integers >= 1, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fewstep", description="Distill diffusion and flow-matching models into 1-4 step samplers.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("distill", help="distill a teacher into a few-step student with a recipe")
    p.add_argument("--recipe", required=True, help="recipe name (see `fewstep recipes`)")
    p.add_argument(
        "--teacher",
        help="diffusers folder, hub id, 'digits' or 'video' (embedded worlds; default: the recipe's world, "
        "digits for image recipes, video for mcm and dcm)",
    )
    p.add_argument("--output", type=Path, help="run folder (default: runs/<recipe>-<teacher>)")
    p.add_argument("--config", type=Path, help="TOML file of config overrides")
    p.add_argument("--preset", help="preset name under recipes/<recipe>/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value")
    p.add_argument("--resume", nargs="?", const="", metavar="DIR", help="continue from the last checkpoint")
    p.add_argument("--prompts", help="prompt file (text, JSONL or parquet) for text-to-image teachers")
    p.add_argument("--data", metavar="DIR", help="text-to-image: captioned real images, encoded by the teacher's VAE")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-bench", action="store_true", help="digits: skip the bench report after training")
    p.add_argument(
        "--bench-seeds", type=_positive_int, metavar="N",
        help="digits and video: noise seeds the bench report averages, student and teacher alike (default 3)",
    )  # fmt: skip

    p = sub.add_parser("sample", help="sample a model at any step count and save a grid")
    p.add_argument("model", help="diffusers folder (teacher or student), hub id, or 'digits'")
    p.add_argument("--steps", type=_positive_int, default=4)
    p.add_argument("--num", type=_positive_int, default=100)
    p.add_argument("--guidance", type=float, help="CFG scale (default: an embedded teacher's own, else 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", help="text prompt (text-to-image pipelines)")
    p.add_argument("--output", type=Path, help="folder (default: runs/sample-<model>-<steps>steps)")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("bench", help="FID, accuracy, latency, memory and NFE report with plots")
    p.add_argument("model", nargs="+", help="diffusers folders, hub ids, or 'digits'")
    p.add_argument("--steps", type=_int_list, default=[1, 2, 4, 50], help="comma-separated (default 1,2,4,50)")
    p.add_argument(
        "--guidance", type=_float_list, default=[],
        help="comma-separated CFG scales (default: each model's own, an embedded teacher's world guidance, else 1)",
    )  # fmt: skip
    p.add_argument("--num", type=_positive_int, default=1000, help="generated samples per seed (default 1000)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="noise seeds averaged (default 3)")
    p.add_argument("--report", type=Path, help="report folder (default: runs/bench-<model>); rows merge in")
    p.add_argument("--batch-size", type=_positive_int, default=500, help="generation batch for metrics")
    p.add_argument("--latency-batch", type=_positive_int, default=100, help="batch timed for latency")
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed repeats after one warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", help="text-to-image: prompt file (.txt, one per line, or .jsonl)")
    p.add_argument("--clip", metavar="ARCH:CHECKPOINT", help="text-to-image: open_clip model and local weights")
    p.add_argument("--reference", metavar="DIR", help="text-to-image: folder of real images for FID")
    p.add_argument(
        "--fid-features", default="inception", help="'inception' (needs torch-fidelity) or TorchScript file"
    )
    p.add_argument(
        "--protocol", default="mjhq", choices=("mjhq", "coco-dmd2"),
        help="text-to-image: mjhq (FID at the generated size, CLIP score 100 max(cos, 0)) or coco-dmd2 (DMD2's COCO "
        "evaluator: center crop + LANCZOS to --fid-resolution, patch-FID, CLIP cos with 'A photo depicts ')",
    )  # fmt: skip
    p.add_argument("--fid-resolution", type=_positive_int, help="coco-dmd2: side FID compares at (default 512)")
    from .bench.runtime import ATTENTION, DTYPES

    p.add_argument(
        "--attention",
        choices=ATTENTION,
        default="sdpa",
        help="attention backend: PyTorch SDPA (default) or xformers (needs CUDA and the gpu extra: fewstep[gpu])",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the denoiser (a warm-up call, not timed, compiles it)"
    )
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype the pipeline loads in (default fp32)")

    sub.add_parser("recipes", help="list the registered recipes")

    p = sub.add_parser("teacher", help="the embedded worlds' teachers and evaluators (digits, video)")
    tsub = p.add_subparsers(dest="teacher_command", required=True, parser_class=_Parser)
    t = tsub.add_parser("train", help="train a world's teacher and/or evaluator (reproduces the shipped ones)")
    t.add_argument("--world", choices=("digits", "video"), default="digits")
    t.add_argument(
        "--what", choices=("all", "teacher", "evaluator", "scorer"), default="all",
        help="scorer: the digits reward model of Hyper-SD's feedback stage",
    )  # fmt: skip
    t.add_argument("--output", type=Path, help="writes <output>/teacher, /evaluator, /scorer (default runs/<world>)")
    t.add_argument("--steps", type=_positive_int, help="teacher training steps (default 6000)")
    t.add_argument("--seed", type=int, help="default 0 (the scorer's own: 1)")
    t.add_argument(
        "--resume", action="store_true", help="video: continue the teacher from <output>/teacher-run/checkpoints"
    )
    t = tsub.add_parser("inspect", help="describe a model folder as fewstep sees it")
    t.add_argument("model", nargs="?", default="digits")
    return parser


def cmd_distill(args: argparse.Namespace) -> int:
    from .recipes import default_world, resolve
    from .training.config import find_preset, resolve_config, to_toml

    recipe = resolve(args.recipe)  # one-line error for unknown recipes, before anything heavy loads
    args.teacher = args.teacher or default_world(args.recipe)
    default = getattr(recipe, "Config", None)
    if default is None:
        raise FewstepError(f"recipe {args.recipe!r} has no Config dataclass")
    preset = find_preset(args.recipe, args.preset) if args.preset else _default_preset(args.recipe, args.teacher)
    sets = [*args.set, *([f"data.prompts={json.dumps(str(args.prompts))}"] if args.prompts else [])]
    sets += [f"data.images={json.dumps(str(args.data))}"] if args.data else []
    cfg = resolve_config(default(), preset, args.config, sets)
    if args.dry_run:
        print(f"# fewstep distill --recipe {args.recipe} --teacher {args.teacher}: resolved config")
        if preset is not None:
            print(f"# preset: {preset}")
        print(to_toml(cfg), end="")
        return 0
    from .distill import run_distill
    from .loading import resolve_source

    if preset is not None and not args.preset:
        print(f"preset {preset.parent.name}/{preset.stem} (the teacher's; --preset NAME for another)")

    resolve_source(args.teacher)
    out = args.output or Path("runs") / f"{args.recipe}-{_run_name(args.teacher)}"
    folder = run_distill(
        recipe,
        cfg,
        teacher=args.teacher,
        output=out,
        resume=args.resume,
        bench=not args.no_bench,
        bench_seeds=args.bench_seeds,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {folder}")
    return 0


def _default_preset(recipe: str, teacher: str) -> Path | None:
    """The recipe's preset for the teacher's world or family, when it has one: ``digits.toml`` for the embedded
    teacher, ``<family>.toml`` (sdxl, sd3, pixart, sana, flux, wan, ...) for a local pipeline folder."""
    from .training.config import presets_dir

    name = teacher if teacher in EMBEDDED else teacher_family(teacher)
    path = presets_dir() / recipe / f"{name}.toml"
    return path if name is not None and path.is_file() else None


def teacher_family(teacher: str) -> str | None:
    """The family name of a local pipeline folder, from its model_index.json (None when unknown or not local)."""
    index = Path(teacher) / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    from .training.families import BY_PIPELINE

    family = BY_PIPELINE.get(str(name))
    return None if family is None else family.name


def _run_name(teacher: str) -> str:
    return teacher if teacher in EMBEDDED else Path(teacher.rstrip("/")).name or "teacher"


def cmd_sample(args: argparse.Namespace) -> int:
    from .loading import model_label
    from .sample import run_sample

    out = args.output or Path("runs") / f"sample-{model_label(args.model)}-{args.steps}steps"
    guidance = args.guidance
    if guidance is None:
        from .worlds import teacher_guidance

        guidance = teacher_guidance(args.model)
    path = run_sample(args.model, out, args.steps, args.num, guidance, args.seed, args.prompt, args.device)
    print(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.run import BenchConfig, run_bench
    from .bench.worlds import TextOptions

    cfg = BenchConfig(
        steps=tuple(args.steps),
        guidance=tuple(args.guidance),
        num=args.num,
        seeds=args.seeds,
        batch_size=args.batch_size,
        latency_batch=args.latency_batch,
        repeats=args.repeats,
        device=args.device,
        attention=args.attention,
        compile=args.compile,
        dtype=args.dtype,
    )
    from .loading import model_label

    report_dir = args.report or Path("runs") / f"bench-{model_label(args.model[0])}"
    text = TextOptions(args.prompts, args.clip, args.reference, args.fid_features, args.protocol, args.fid_resolution)
    report = run_bench(args.model, report_dir, cfg, text)
    floor = report["reference"]["real_fid_floor"]
    if floor is not None:
        print(f"real-vs-real FID floor {floor:.2f}")
    for r in report["rows"]:
        fid = "" if r["fid"] is None else f"  FID {r['fid']:.2f}+-{r['fid_std']:.2f}"
        fid += "" if r.get("fid_train") is None else f" (train {r['fid_train']:.2f})"
        acc = "" if r.get("accuracy") is None else f"  acc {100 * r['accuracy']:.1f}%"
        clip = "" if r.get("clip_score") is None else f"  CLIP {r['clip_score']:.2f}"
        print(
            f"{r['model']:>24} steps {r['steps']:>3} w {r['guidance']:g}{fid}{acc}{clip}  "
            f"{r['latency_ms']:.1f} ms/batch  NFE {r['nfe']}"
        )
    print(f"wrote {report_dir}/report.md")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .recipes import available, resolve

    registry = available()
    if not registry:
        print("no recipes are registered yet")
        return 0
    for name in sorted(registry):
        cls = resolve(name)
        print(f"{name:<12} {getattr(cls, 'paper', '') or cls.__doc__.splitlines()[0]}")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    if args.teacher_command == "inspect":
        from .describe import describe

        print(describe(args.model))
        return 0
    from .io import atomic_dir

    args.output = args.output or Path("runs") / args.world
    scorer_seed, args.seed = args.seed, 0 if args.seed is None else args.seed
    if args.world == "video":
        if args.what == "scorer":
            raise FewstepError("the scorer (a reward model) is the digits world's; --world video has none")
        return _train_video_world(args)
    if args.resume:
        raise FewstepError("--resume applies to the video teacher (the digits teacher trains in one go)")
    from .worlds.digits import train

    if args.what in ("all", "evaluator"):
        with atomic_dir(args.output / "evaluator", "config.json") as tmp:
            train.train_evaluator(tmp, train.EvaluatorTrainConfig(seed=args.seed))
        print(f"wrote {args.output / 'evaluator'}")
    if args.what in ("all", "scorer"):
        with atomic_dir(args.output / "scorer", "config.json") as tmp:  # its own seed (1) unless one is given
            train.train_scorer(tmp, train.ScorerTrainConfig(**({} if scorer_seed is None else {"seed": scorer_seed})))
        print(f"wrote {args.output / 'scorer'}")
    if args.what in ("all", "teacher"):
        steps = {"steps": args.steps} if args.steps else {}
        with atomic_dir(args.output / "teacher", "model_index.json") as tmp:
            train.train_teacher(tmp, train.TeacherTrainConfig(seed=args.seed, **steps))
        print(f"wrote {args.output / 'teacher'}")
    return 0


def _train_video_world(args: argparse.Namespace) -> int:
    from .io import atomic_dir
    from .worlds.video.train import VideoTeacherConfig, train_video_teacher

    if args.what in ("all", "teacher"):
        run = args.output / "teacher-run"  # the Trainer's checkpoints go to <run>/checkpoints
        checkpoints = run / "checkpoints"
        if not args.resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
            raise FewstepError(f"{checkpoints} already holds checkpoints: pass --resume or choose another --output")
        steps = {"steps": args.steps} if args.steps else {}
        with atomic_dir(args.output / "teacher", "model_index.json") as tmp:
            train_video_teacher(tmp, run, VideoTeacherConfig(seed=args.seed, **steps), resume=args.resume)
        print(f"wrote {args.output / 'teacher'}")
    if args.what in ("all", "evaluator"):
        from .worlds.video.train import VideoEvaluatorConfig, train_video_evaluator

        with atomic_dir(args.output / "evaluator", "config.json") as tmp:
            train_video_evaluator(tmp, VideoEvaluatorConfig(seed=args.seed))
        print(f"wrote {args.output / 'evaluator'}")
    return 0


COMMANDS = {
    "distill": cmd_distill,
    "sample": cmd_sample,
    "bench": cmd_bench,
    "recipes": cmd_recipes,
    "teacher": cmd_teacher,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FewstepError as err:
        print(f"fewstep: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fewstep: interrupted; nothing partial was written", file=sys.stderr)
        return 130
    except Exception as err:  # a failure we did not foresee: still one line, the traceback on request
        if os.environ.get("FEWSTEP_DEBUG"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"fewstep: error: {type(err).__name__}: {first} (FEWSTEP_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
