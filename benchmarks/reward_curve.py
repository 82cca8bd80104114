"""A digits reward model's score against FID over a run's checkpoints: what a feedback stage (Hyper-SD's ReFL stage,
``reward``) bought and what it cost, as the issue asks to report it.

    python benchmarks/reward_curve.py RUN [RUN ...] [--steps 2,4] [--num 1000] [--seeds 3] [--reward digits]
                                       [--output DIR]

RUN is a `fewstep distill` folder of a LoRA student of a digits teacher (``checkpoints/`` and ``student/``, as the
run writes them; keep the checkpoints you want scored with ``train.keep_checkpoints``). Each checkpoint's EMA adapter
is put on the teacher's network and sampled with the run's exported scheduler at each step count; every point is the
mean over --seeds noise seeds of --num class-balanced samples (as `fewstep bench` scores them): FID against the
held-out and the train split, class accuracy, and the mean reward (``objectives.reward.load_reward``; on digits log
p(class | x0) of the scorer kept apart from the bench's evaluator). The table is printed and written with a plot
(reward against FID, one line per run and step count, checkpoints in order) to OUT/reward_curve.json and .png
(OUT: the first RUN/reward).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fewstep.bench.worlds import DigitsWorld, generate_digits
from fewstep.io import atomic_file
from fewstep.loading import load_pipeline
from fewstep.objectives.reward import load_reward
from fewstep.training.checkpoint import list_checkpoints, load_checkpoint
from fewstep.training.lora import add_lora


def student_at(run: Path, checkpoint: Path) -> Any:
    """The run's student pipeline with the adapter of ``checkpoint`` (its EMA weights, as export takes them)."""
    pipe = load_pipeline(str(run / "student"))  # the base, the final adapter merged, the student's scheduler
    base = json.loads((run / "student" / "fewstep_base.json").read_text())["base"]
    adapter = json.loads((run / "student" / "adapter_config.json").read_text())
    # the adapter's own layers (a recipe's extra targets, e.g. hyper_sd's lora_extra_targets, beside the default set)
    targets = tuple(adapter["target_modules"])
    model = add_lora(
        copy.deepcopy(load_pipeline(base).transformer), int(adapter["r"]), int(adapter["lora_alpha"]), targets
    )
    _, state = load_checkpoint(run / "checkpoints", checkpoint)
    model.load_state_dict(state["ema"]["student"])
    pipe.transformer = model.eval()
    return pipe


def measure(runs: list[Path], steps: list[int], num: int, seeds: int, reward: str, batch: int = 500) -> list[dict]:
    """One row per (run, checkpoint, steps): mean FID (held-out, train), accuracy and reward over ``seeds``."""
    world, score = DigitsWorld(), load_reward(reward)
    jobs = [(run, ckpt) for run in runs for ckpt in list_checkpoints(run / "checkpoints")]
    if not jobs:
        raise SystemExit(f"no checkpoints under {', '.join(str(r) for r in runs)}")
    rows = []
    with tqdm(total=len(jobs) * len(steps) * seeds, desc="reward") as bar, torch.no_grad():
        for run, ckpt in jobs:
            pipe = student_at(run, ckpt)
            for n in steps:
                values: dict[str, list[float]] = {}
                for seed in range(seeds):
                    images, labels = generate_digits(pipe, num, n, 1.0, seed, batch)
                    metrics = world.metrics
                    values.setdefault("fid", []).append(metrics.fid_held_out(images))
                    values.setdefault("fid_train", []).append(metrics.fid_train(images))
                    values.setdefault("accuracy", []).append(metrics.accuracy(images, labels))
                    x0 = 2 * images - 1  # the teacher's pixel space, where the reward reads x0
                    values.setdefault("reward", []).append(float(score(x0, {"class_labels": labels}).mean()))
                    bar.update(1)
                step = int(json.loads((ckpt / "meta.json").read_text())["step"])
                rows.append({"run": str(run), "checkpoint": step, "steps": n,
                             **{k: statistics.mean(v) for k, v in values.items()}})  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | step | steps | FID held-out | FID train | accuracy | reward |", "|---|" + "---:|" * 6]
    for r in rows:
        lines.append(
            f"| {Path(r['run']).name} | {r['checkpoint']} | {r['steps']} | {r['fid']:.2f} | {r['fid_train']:.2f} | "
            f"{100 * r['accuracy']:.1f}% | {r['reward']:.4f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("fid", "fid_train"), ("FID vs held-out", "FID vs train"), strict=True):
        for run in dict.fromkeys(r["run"] for r in rows):
            for n in sorted({r["steps"] for r in rows}):
                points = [(r[key], r["reward"]) for r in rows if r["run"] == run and r["steps"] == n]
                ax.plot(*zip(*points, strict=True), marker="o", label=f"{Path(run).name}, {n} steps")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean reward (checkpoints in order)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reward", default="digits")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    out = args.output or args.runs[0].resolve() / "reward"
    rows = measure(args.runs, args.steps, args.num, args.seeds, args.reward)
    out.mkdir(parents=True, exist_ok=True)
    print(table(rows))
    with atomic_file(out / "reward_curve.json") as tmp:
        tmp.write_text(json.dumps({"runs": [str(r) for r in args.runs], "num": args.num, "seeds": args.seeds,
                                   "reward": args.reward, "rows": rows}))  # fmt: skip
    plot(rows, out / "reward_curve.png")
    print(f"wrote {out / 'reward_curve.json'} and {out / 'reward_curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
