"""Train and bench every registered recipe on an embedded teacher, then compare them in one table and one plot.

    python benchmarks/compare_recipes.py [--recipes lcm,scm,...] [--output runs/compare] [--reuse] [--threads N]
                                         [--train-seeds N] [--bench-seeds N] [--world digits|video]

Runs `fewstep distill --recipe NAME --teacher WORLD --output OUT/NAME` for each recipe (its preset for that world;
by default every recipe whose world it is: the image recipes on digits, MCM and DCM on video), reads each run's
bench/report.json and writes OUT/compare.json, OUT/compare.md and OUT/quality_vs_nfe.png. --reuse keeps finished runs
and resumes unfinished ones. A failed run is a row of the table; the script then exits 1. --train-seeds N trains each
recipe N times (OUT/NAME/seed0 .. seedN-1, --set train.seed=k) and reports each number as the mean +- std over the
N trainings (each training's FID is itself the mean over the bench's sampling seeds). --bench-seeds N sets those
sampling seeds (default 3) for student and teacher alike; with --reuse, finished runs benched with another number are
benched again (their training is kept). On digits the held-out FID of one 1,000-sample seed spreads by about 0.5, so
a held-out difference of 0.4 (1.1x the teacher) needs about 10 seeds to resolve.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewstep.io import atomic_file
from fewstep.recipes import available, default_world
from fewstep.worlds import EMBEDDED, teacher_guidance

TEACHER = "teacher (Euler)"
TIMING = "compare_timing.json"
ROW_KEYS = (
    "steps", "nfe", "guidance", "fid", "fid_std", "fid_train", "accuracy", "diversity",
    "latency_ms", "latency_ms_p90", "latency_ms_per_image",
    "frame_fid", "motion_accuracy", "jitter",  # the video world's own measures (None on digits)
)  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One recipe's run folder and how its `fewstep distill` went (returncode None: not run, an earlier run reused)."""

    recipe: str
    folder: Path
    returncode: int | None = 0
    train_wall_s: float | None = None  # start -> training.json written (training, export)
    run_wall_s: float | None = None  # the whole command (training, export, bench)
    reused: bool = False
    seed: int | None = None  # the training seed (--train-seeds); None: the preset's


def has_checkpoints(folder: Path) -> bool:
    return (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())


def is_finished(folder: Path) -> bool:
    return (folder / "bench" / "report.json").is_file() and (folder / "training.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:  # an interruption leaves the old file or none, never half of one
        tmp.write_text(text)


def _is_teacher(row: dict[str, Any]) -> bool:
    return row.get("source") in EMBEDDED or row.get("model") in {f"{world}-teacher" for world in EMBEDDED}


def _with_ratios(row: dict[str, Any], recipe: str, teacher_50: dict[str, Any]) -> dict[str, Any]:
    out = {"recipe": recipe, **{k: row.get(k) for k in ROW_KEYS}}
    for key in ("fid", "fid_train"):
        ref = teacher_50.get(key)
        out[f"{key}_ratio"] = out[key] / ref if out[key] is not None and ref else None
    return out


def aggregate(runs: Sequence[Run]) -> dict[str, Any]:
    """Every run's bench/report.json -> one comparison: the students' rows with the teacher's 50-step FID ratios,
    the teacher's Euler rows (first run that has a step count wins: they are the same in every run) and each run's
    status. Reads files only; trains nothing."""
    reports = {run.folder: _read_json(run.folder / "bench" / "report.json") for run in runs}
    first = next((r for r in reports.values() if r), {})
    world = first.get("reference", {}).get("world", "digits")
    guidance = teacher_guidance(world)  # the teacher's own guidance: its 50-step row is the reference
    teacher_rows: dict[tuple[int, Any], dict[str, Any]] = {}
    for report in reports.values():
        for row in report.get("rows", []):
            if _is_teacher(row):
                teacher_rows.setdefault((row["steps"], row.get("guidance")), row)
    teacher_50 = next((r for (s, g), r in teacher_rows.items() if s == 50 and (g or 1.0) == guidance), {})
    rows, statuses = [], []
    for run in runs:
        report, training = reports[run.folder], _read_json(run.folder / "training.json")
        students = sorted((r for r in report.get("rows", []) if not _is_teacher(r)), key=lambda r: r["steps"])
        if run.returncode not in (0, None):
            status = "failed"
        else:
            status = "ok" if students else "no bench report"
        statuses.append(
            {
                "recipe": run.recipe,
                "seed": run.seed,
                "status": status,
                "returncode": run.returncode,
                "folder": str(run.folder),
                "reused": run.reused,
                "train_steps": training.get("steps"),
                "train_wall_s": run.train_wall_s,
                "run_wall_s": run.run_wall_s,
            }
        )
        if status == "ok":
            extra = {k: statuses[-1][k] for k in ("train_steps", "train_wall_s", "run_wall_s")}
            rows += [{**_with_ratios(r, run.recipe, teacher_50), **extra, "seed": run.seed} for r in students]
    rows = over_seeds(rows, teacher_50)
    return {
        "rows": rows,
        "teacher": [_with_ratios(r, TEACHER, teacher_50) for _, r in sorted(teacher_rows.items(), key=_order)],
        "teacher_50": {k: teacher_50.get(k) for k in ("fid", "fid_std", "fid_train")} if teacher_50 else None,
        "runs": statuses,
        "world": world,
        "teacher_guidance": guidance,
        "reference": first.get("reference", {}),
        "latency_batch": first.get("config", {}).get("latency_batch"),
        "env": first.get("env", {}),
    }


SEED_MEANS = (
    "fid", "fid_train", "accuracy", "diversity", "latency_ms", "train_steps", "train_wall_s", "run_wall_s",
    "frame_fid", "motion_accuracy", "jitter",
)  # fmt: skip


def over_seeds(rows: list[dict[str, Any]], teacher_50: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (recipe, steps, guidance): a recipe trained with several seeds gets the mean of each number over
    its trainings, ``fid_std`` / ``fid_train_std`` their std across trainings (``fid_sampling_std``: the mean of the
    runs' own spreads over sampling seeds) and the per-training values; a single training's row is unchanged."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["steps"], r.get("guidance")), []).append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        row = dict(group[0])
        for key in SEED_MEANS:
            values = [g[key] for g in group if g.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
        for key in ("fid", "fid_train"):
            values = [g[key] for g in group if g.get(key) is not None]
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
            row[f"{key}_per_seed"] = values
        row["fid_sampling_std"] = statistics.fmean(g["fid_std"] for g in group if g.get("fid_std") is not None)
        row["train_seeds"] = [g["seed"] for g in group]
        out.append(row | _with_ratios(row, row["recipe"], teacher_50))  # ratios of the means
    return out


def _order(item: tuple[tuple[int, Any], dict[str, Any]]) -> tuple[float, int]:
    (steps, guidance), _ = item
    return (guidance or 1.0, steps)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _fid_cell(value: float | None, ratio: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    spread = "" if std is None else f" +- {std:.2f}"
    return f"{value:.2f}{spread}" + ("" if ratio is None else f" ({ratio:.2f}x)")


def _table_row(r: dict[str, Any], wall: str, video: bool = False) -> str:
    label = r["recipe"] if r.get("guidance") in (None, 1.0) else f"{r['recipe']} (w={r['guidance']:g})"
    cells = [
        label,
        f"{r['steps']} ({r['nfe']})",
        _fid_cell(r["fid"], r["fid_ratio"], r["fid_std"]),
        _fid_cell(r["fid_train"], r["fid_train_ratio"], r.get("fid_train_std")),
        "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%",
        "-" if r["diversity"] is None else f"{r['diversity']:.2f}",
        "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}",
        wall,
    ]
    if video:
        cells[-1:-1] = [
            "-" if r.get("frame_fid") is None else f"{r['frame_fid']:.2f}",
            "-" if r.get("motion_accuracy") is None else f"{100 * r['motion_accuracy']:.1f}%",
            "-" if r.get("jitter") is None else f"{r['jitter']:.3f}",
        ]
    return "| " + " | ".join(cells) + " |"


def markdown(compare: dict[str, Any]) -> str:
    """The comparison as a Markdown table: the teacher's Euler rows, then one row per recipe and step count."""
    t50 = compare["teacher_50"] or {}
    batch = compare.get("latency_batch")
    world = compare.get("world", "digits")
    video = world == "video"
    fid = "clip FD" if video else "FID"
    w = compare.get("teacher_guidance", 1.0)
    guided = "" if w == 1.0 else f" and its guidance w {w:g}, which the students distil"
    lines = [
        f"# fewstep recipes on the {world} teacher",
        "",
        f"{fid} is the mean over noise seeds (std after +-); the ratio in brackets is to the teacher's own {fid} at "
        f"50 steps{guided} (held-out {_fid_cell(t50.get('fid'), None)}, "
        f"train {_fid_cell(t50.get('fid_train'), None)}). "
        f"Latency is the median ms per batch of {batch or '?'}. Training wall time runs from the start of "
        "`fewstep distill` to the exported student (the bench after it not counted).",
        "",
        f"| recipe | steps (NFE) | {fid} held-out (x teacher-50) | {fid} train (x teacher-50) | accuracy | diversity "
        + (
            "| latency ms | frame FID | motion accuracy | jitter px | training wall time |"
            if video
            else "| latency ms | training wall time |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if video else "") + "---:|",
    ]
    shown = {r["steps"] for r in compare["rows"]} | {50}
    lines += [_table_row(r, "-", video) for r in compare["teacher"] if not compare["rows"] or r["steps"] in shown]
    for recipe in dict.fromkeys(run["recipe"] for run in compare["runs"]):
        ok = [r for r in compare["rows"] if r["recipe"] == recipe]
        if ok:
            first = ok[0]
            wall = _duration(first["train_wall_s"])
            steps = first["train_steps"]
            wall += f" ({steps:.0f} steps)" if steps is not None else ""
            seeds = first.get("train_seeds")
            wall += f", mean of {len(seeds)} seeds" if seeds else ""
            lines += [_table_row(r, wall, video) for r in ok]
        for run in compare["runs"]:
            if run["recipe"] == recipe and run["status"] != "ok":
                why = f"failed (exit {run['returncode']})" if run["status"] == "failed" else run["status"]
                seed = "" if run.get("seed") is None else f" seed {run['seed']}"
                dashes = " - |" * (8 if video else 5)
                lines.append(f"| {recipe}{seed} | {why} |{dashes} {_duration(run['run_wall_s'])} |")
    if any(r.get("train_seeds") for r in compare["rows"]):
        lines += ["", "Recipes trained with several seeds: each number is the mean over the trainings, +- their std."]
    return "\n".join(lines) + "\n"


def plot_series(compare: dict[str, Any], key: str) -> list[tuple[str, list[int], list[float], list[float]]]:
    """(name, NFEs, FIDs, error bars) for one panel (``key`` "fid" or "fid_train"): the teacher's Euler sampler, then
    one series per recipe however many trainings it has (``compare["runs"]`` holds a run per training seed). The bars
    are the std over trainings where there are several, else, on the held-out panel, over the bench's sampling
    seeds; a single training has no train-split spread."""
    std = {"fid": "fid_std", "fid_train": "fid_train_std"}[key]
    series = []
    for name in dict.fromkeys([TEACHER, *(run["recipe"] for run in compare["runs"])]):
        rows = compare["teacher"] if name == TEACHER else compare["rows"]
        w = compare.get("teacher_guidance", 1.0) if name == TEACHER else 1.0  # each at the guidance it samples at
        pts = sorted(
            (r for r in rows if r["recipe"] == name and r[key] is not None and (r["guidance"] or 1.0) == w),
            key=lambda r: r["nfe"],
        )
        if pts:
            errs = [r.get(std) or 0.0 for r in pts]
            series.append((name, [r["nfe"] for r in pts], [r[key] for r in pts], errs))
    return series


def plot_quality(compare: dict[str, Any], path: Path) -> None:
    """FID against NFE (log x), held-out and train panels: a line per recipe, the teacher's Euler sampler dashed,
    and a dotted line at 1.1x the teacher's 50-step FID."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    t50 = compare["teacher_50"] or {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in zip(axes, ("fid", "fid_train"), ("FID vs held-out", "FID vs train"), strict=True):
        nfes: set[int] = set()
        for name, xs, ys, errs in plot_series(compare, key):
            style = "--" if name == TEACHER else "-"
            color = "gray" if name == TEACHER else None
            ax.errorbar(xs, ys, yerr=errs, ls=style, marker="o", capsize=3, color=color, label=name)
            nfes.update(xs)
        if t50.get(key):
            line = 1.1 * t50[key]
            ax.axhline(line, color="black", ls=":", lw=1, label=f"1.1x teacher at 50 steps ({line:.2f})")
        ax.set_xscale("log")
        if nfes:
            ax.set_yscale("log")
            ax.set_xticks(sorted(nfes))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_ylabel(f"{title} (lower is better)")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_outputs(compare: dict[str, Any], out_dir: Path) -> str:
    """compare.json, compare.md and quality_vs_nfe.png into ``out_dir``, each written atomically; returns the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(compare)
    plot_quality(compare, out_dir / "quality_vs_nfe.png")
    _write_text(out_dir / "compare.json", json.dumps(compare, indent=2) + "\n")
    _write_text(out_dir / "compare.md", table + "\n![quality against NFE](quality_vs_nfe.png)\n")
    return table


def distill_command(
    recipe: str, folder: Path, resume: bool, sets: Sequence[str], world: str = "digits", bench_seeds: int | None = None
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "fewstep.cli",
        "distill",
        "--recipe",
        recipe,
        "--teacher",
        world,
        "--output",
        str(folder),
    ]
    cmd += [f"--bench-seeds={bench_seeds}"] if bench_seeds is not None else []
    return cmd + [f"--set={s}" for s in sets] + (["--resume"] if resume else [])


def train(
    recipe: str, folder: Path, resume: bool, sets: Sequence[str], threads: int | None, world: str = "digits",
    bench_seeds: int | None = None,
) -> Run:  # fmt: skip
    """One `fewstep distill` in a child process, timed; its timing is kept in the run folder for --reuse."""
    env = dict(os.environ)
    if threads is not None:  # torch reads these at start-up for its intra-op pool
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = distill_command(recipe, folder, resume, sets, world, bench_seeds)
    print(f"== {recipe}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:  # the child got the Ctrl-C too: let it checkpoint, then stop
        proc.wait()
        raise
    run_wall = time.perf_counter() - t0
    train_wall = training_wall(folder, run_wall) if returncode == 0 else None
    run = Run(recipe, folder, returncode, train_wall, run_wall)
    if returncode == 0:
        timing = {"train_wall_s": train_wall, "run_wall_s": run_wall, "threads": threads, "resumed": resume}
        _write_text(folder / TIMING, json.dumps(timing) + "\n")
    return run


def training_wall(folder: Path, run_wall: float) -> float | None:
    """The run's time up to training.json (training and export): the whole command's monotonic time less the bench's,
    the bench's read from the two files' times. Only that short span reads the wall clock, which jumps on machines
    that are paused (it did here: a wall-clock span once came out longer than the monotonic time of the whole run)."""
    done, report = folder / "training.json", folder / "bench" / "report.json"
    if not done.is_file():
        return None
    bench = max(0.0, report.stat().st_mtime - done.stat().st_mtime) if report.is_file() else 0.0
    return max(0.0, run_wall - bench)


def bench_seeds_of(folder: Path) -> int | None:
    """The noise seeds a finished run's bench report averages (None: no report)."""
    return _read_json(folder / "bench" / "report.json").get("config", {}).get("seeds")


def bench_again(folder: Path, world: str, seeds: int, threads: int | None) -> None:
    """Bench a finished run's exported student again, next to the teacher, with ``seeds`` noise seeds (the report is
    replaced; the training and its timing stay): more seeds resolve the small held-out differences of the digits
    world, whose per-seed spread is about 0.5 FID."""
    report = _read_json(folder / "bench" / "report.json")
    steps = sorted({int(r["steps"]) for r in report.get("rows", []) if not _is_teacher(r)})
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from fewstep.distill import bench_student

    bench_student(folder / "student", world, steps, folder / "bench", seeds)


def reused(recipe: str, folder: Path) -> Run:
    timing = _read_json(folder / TIMING)
    return Run(recipe, folder, None, timing.get("train_wall_s"), timing.get("run_wall_s"), reused=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--recipes", help="comma-separated (default: every registered recipe of the world)")
    parser.add_argument("--world", choices=EMBEDDED, default="digits", help="the embedded teacher (default digits)")
    parser.add_argument("--output", type=Path, default=Path("runs/compare"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs, resume unfinished ones")
    parser.add_argument("--threads", type=int, help="torch threads of each run (default: torch's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every distill")
    parser.add_argument("--train-seeds", type=int, default=1, help="trainings per recipe (seeds 0..N-1; default 1)")
    parser.add_argument(
        "--bench-seeds", type=int,
        help="noise seeds of each run's bench (default: the bench's, 3); with --reuse, finished runs benched with "
        "another number are benched again",
    )  # fmt: skip
    args = parser.parse_args(argv)

    registry = available()
    mine = [n for n in registry if default_world(n) == args.world]
    names = [n.strip() for n in args.recipes.split(",") if n.strip()] if args.recipes else mine
    unknown = [n for n in names if n not in registry]
    if unknown or not names:
        what = f"unknown recipe(s) {', '.join(unknown)}" if unknown else "no recipes given"
        print(f"compare_recipes: error: {what}; registered: {', '.join(sorted(registry))}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"compare_recipes: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.train_seeds < 1:
        print(f"compare_recipes: error: --train-seeds must be >= 1, got {args.train_seeds}", file=sys.stderr)
        return 2
    if args.bench_seeds is not None and args.bench_seeds < 1:
        print(f"compare_recipes: error: --bench-seeds must be >= 1, got {args.bench_seeds}", file=sys.stderr)
        return 2
    seeds: list[int | None] = [None] if args.train_seeds == 1 else list(range(args.train_seeds))
    folders = {
        (name, seed): args.output / name / ("" if seed is None else f"seed{seed}") for name in names for seed in seeds
    }
    if not args.reuse:  # distill refuses a folder with checkpoints: say so before hours of training, not after
        taken = ", ".join(str(f) for f in folders.values() if has_checkpoints(f))
        if taken:
            print(f"compare_recipes: error: runs already there: {taken}; pass --reuse or remove them", file=sys.stderr)
            return 2

    runs = []
    try:
        for (name, seed), folder in folders.items():
            if args.reuse and is_finished(folder):
                print(f"== {name}: reusing {folder}")
                if args.bench_seeds is not None and bench_seeds_of(folder) != args.bench_seeds:
                    print(f"== {name}: benching {folder} again with {args.bench_seeds} noise seeds", flush=True)
                    bench_again(folder, args.world, args.bench_seeds, args.threads)
                runs.append(dataclasses.replace(reused(name, folder), seed=seed))
            else:
                resume = args.reuse and has_checkpoints(folder)
                sets = args.set if seed is None else [*args.set, f"train.seed={seed}"]
                run = train(name, folder, resume, sets, args.threads, args.world, args.bench_seeds)
                runs.append(dataclasses.replace(run, seed=seed))
    except KeyboardInterrupt:
        print("compare_recipes: interrupted; finished runs are kept (--reuse picks them up)", file=sys.stderr)
        return 130
    compare = aggregate(runs)
    print()
    print(write_outputs(compare, args.output), end="")
    print(f"wrote {args.output}/compare.md, compare.json, quality_vs_nfe.png")
    failed = [r.recipe for r in runs if r.returncode not in (0, None)]
    if failed:
        print(f"compare_recipes: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
