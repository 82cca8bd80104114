"""The eta (gamma) trade-off of a few-step digits student: FID at each step count as the sampler's stochasticity moves.

    python benchmarks/eta_tradeoff.py STUDENT [--gammas 0,0.1,0.2,0.3,0.5,0.7,1] [--steps 1,2,4,8]
                                              [--num 1000] [--seeds 3] [--first-seed 0] [--output DIR]

TCD's gamma (its eta; ``sampling.renoise``) sets how much of each step's own noise survives into the next: 0 is DDIM,
1 is fresh noise (LCM's multistep sampler). Hyper-SD's card runs its one LoRA with TCDScheduler and a lower eta for
more steps; this script measures that choice on the digits world. STUDENT is a student folder whose scheduler is a
FewStepScheduler (a full pipeline or a LoRA folder, as `fewstep distill` writes them); each gamma replaces the
scheduler's gamma at every step count (its per-step ``gammas`` too) and keeps its plans. Each point is scored as
`fewstep bench` scores (the mean over --seeds noise seeds of --num class-balanced samples): FID against the held-out
and the train split, and class accuracy. `--first-seed` moves the noise seeds (default 0, the bench's own), so that a
gamma can be picked on seeds the bench does not score (e.g. 100). One step does not re-noise, so its row is flat by
construction. The table is printed and written with the plot to OUT/eta_tradeoff.json and OUT/eta_tradeoff.png (OUT:
STUDENT/../eta).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fewstep.bench.worlds import DigitsWorld
from fewstep.export.scheduling_fewstep import FewStepScheduler
from fewstep.io import atomic_file
from fewstep.loading import load_pipeline


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def measure(
    student: str, gammas: list[float], steps: list[int], num: int, seeds: int, batch: int = 500, first_seed: int = 0
) -> list[dict[str, Any]]:
    """One row per (steps, gamma): mean FID (held-out, train) and accuracy over noise seeds ``first_seed`` to
    ``first_seed + seeds - 1``."""
    pipe = load_pipeline(student)
    if type(pipe.scheduler).__name__ != "FewStepScheduler":
        raise SystemExit(f"{student}: its scheduler is {type(pipe.scheduler).__name__}, not FewStepScheduler")
    config = dict(pipe.scheduler.config)
    world = DigitsWorld()
    rows = []
    with tqdm(total=len(gammas) * len(steps) * seeds, desc="eta") as bar:
        for gamma in gammas:
            pipe.scheduler = FewStepScheduler.from_config({**config, "gamma": gamma, "gammas": None})
            for n in steps:
                values: dict[str, list[float]] = {}
                for seed in range(first_seed, first_seed + seeds):
                    for key, value in world.score(pipe, num, n, 1.0, seed, batch).metrics.items():
                        values.setdefault(key, []).append(value)
                    bar.update(1)
                row = {"steps": n, "gamma": gamma, **{k: statistics.mean(v) for k, v in values.items()}}
                row["fid_std"] = statistics.stdev(values["fid"]) if seeds > 1 else 0.0
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| steps | gamma | FID vs held-out | FID vs train | accuracy |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['steps']} | {r['gamma']:g} | {r['fid']:.2f} +- {r['fid_std']:.2f} | {r['fid_train']:.2f} | "
            f"{100 * r['accuracy']:.1f}% |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("fid", "fid_train"), ("FID vs held-out", "FID vs train"), strict=True):
        for n in sorted({r["steps"] for r in rows}):
            points = [(r["gamma"], r[key]) for r in rows if r["steps"] == n]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{n} step{'s' if n > 1 else ''}")
        ax.set_xlabel("gamma (TCD's eta)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FID (mean of seeds)")
    axes[1].legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student")
    parser.add_argument("--gammas", type=_floats, default=[0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    parser.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    out = args.output or Path(args.student).resolve().parent / "eta"
    rows = measure(args.student, args.gammas, args.steps, args.num, args.seeds, first_seed=args.first_seed)
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    print(text)
    with atomic_file(out / "eta_tradeoff.json") as tmp:
        tmp.write_text(
            json.dumps(
                {
                    "student": args.student,
                    "num": args.num,
                    "seeds": args.seeds,
                    "first_seed": args.first_seed,
                    "rows": rows,
                }
            )
        )
    plot(rows, out / "eta_tradeoff.png")
    print(f"wrote {out / 'eta_tradeoff.json'} and {out / 'eta_tradeoff.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
