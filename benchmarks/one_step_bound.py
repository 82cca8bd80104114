"""How close can a one-step student of the digits teacher's own network get to the teacher's ODE map at all?

    python benchmarks/one_step_bound.py [--pairs 16384] [--steps 3000] [--eval-every 1000] [--output DIR]

Consistency recipes (LCM, sCM) train the student towards the teacher's probability-flow map noise -> x0, so a
one-step consistency student is at best that map. This script gives the map to a student directly: it draws
``--pairs`` noises with balanced class labels, solves the teacher's ODE from each (Euler, ``--teacher-steps``), and
regresses a copy of the teacher (the students' initialization) onto the pairs, x0_theta(eps, t_max) ~ ODE(eps), by
MSE (Luhman & Luhman 2021's knowledge distillation). Every ``--eval-every`` steps the bias-corrected EMA (as the
Trainer exports) is scored at one step like `fewstep bench`: 3 seeds x 1,000 samples, FID against the held-out and the
train split, class accuracy. The table is printed and written to OUT/one_step_bound.json (OUT: runs/one-step-bound by
default); the pairs are cached in OUT.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fewstep.config import find_preset, resolve_config
from fewstep.data import null_class_of, teacher_samples
from fewstep.digits.data import balanced_labels
from fewstep.io import atomic_file
from fewstep.metrics import DigitsMetrics, to_unit
from fewstep.recipes import resolve
from fewstep.sampling import euler_sample, euler_times, initial_noise, plan_in, sample_plan
from fewstep.schedules import NoiseSchedule
from fewstep.teacher import Denoiser, load_denoiser
from fewstep.train import ema_decay_at

SHAPE = (1, 8, 8)


def ode_pairs(teacher: Denoiser, num: int, steps: int, seed: int, cache: Path) -> dict[str, torch.Tensor]:
    """``num`` (noise, label, x0) triples: x0 is the teacher's ``steps``-step Euler solution from that noise."""
    if cache.is_file():
        return torch.load(cache)
    labels = balanced_labels(num)[torch.randperm(num, generator=torch.Generator().manual_seed(seed))]
    uncond = {"class_labels": torch.full((1,), null_class_of(teacher.model))}
    x0 = teacher_samples(teacher, {"class_labels": labels}, uncond, SHAPE, 1.0, steps, seed, batch=1024)
    noise = torch.randn((num, *SHAPE), generator=torch.Generator().manual_seed(seed))  # the noise teacher_samples drew
    pairs = {"noise": noise, "labels": labels, "x0": x0}
    with atomic_file(cache) as tmp:
        torch.save(pairs, tmp)
    return pairs


def ode_map(teacher: Denoiser, labels: torch.Tensor, steps: int) -> Any:
    """x0 = the teacher's ODE solution from (x_t, t): Euler on the teacher's grid density (``steps`` over the whole
    range), i.e. the x0 an exact consistency student would return."""
    native: NoiseSchedule = teacher.native

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t0 = float(t[0])
        n = max(1, round(steps * (t0 - native.t_min) / (native.t_max - native.t_min)))
        times = euler_times(native, n, t_max=t0)
        # euler_sample scales its input by the prior std at times[0]; hand it x_t in that unit
        scale = initial_noise(native, t0, torch.ones(()))
        x0 = euler_sample(lambda x, s: teacher(x, s, {"class_labels": labels}), native, x_t / scale, times)
        assert isinstance(x0, torch.Tensor)
        return x0

    return denoise


@torch.no_grad()
def score_ideal_plans(
    teacher: Denoiser, metrics: DigitsMetrics, recipes: list[str], steps: int
) -> list[dict[str, Any]]:
    """Each recipe's digits-preset plans run with the teacher's exact ODE map as the student (3 seeds x 1,000)."""
    rows = []
    for name in recipes:
        cls = resolve(name)
        cfg = resolve_config(cls.Config(), find_preset(name, "digits"))
        for n, plan in cls(teacher, cfg).plan().items():
            plan = plan_in(plan, teacher.native)
            scores = []
            for seed in range(3):
                labels = balanced_labels(1000)
                gen = torch.Generator().manual_seed(seed)
                eps = torch.randn((1000, *SHAPE), generator=gen)
                images = to_unit(sample_plan(ode_map(teacher, labels, steps), plan, eps, gen).clamp(-1, 1))
                scores.append((metrics.fid_held_out(images), metrics.fid_train(images)))
            fid, fid_train = (sum(sc[i] for sc in scores) / 3 for i in range(2))
            rows.append({"recipe": name, "steps": n, "times": list(plan.times), "fid": fid, "fid_train": fid_train})
            print(f"ideal {name} {n}-step plan {tuple(round(t, 3) for t in plan.times)}: FID {fid:.2f} / train "
                  f"{fid_train:.2f}", flush=True)  # fmt: skip
    return rows


@torch.no_grad()
def score_one_step(student: Denoiser, metrics: DigitsMetrics, num: int = 1000, seeds: int = 3) -> dict[str, float]:
    """One-step samples from t_max, scored as `fewstep bench` scores digits (mean over seeds)."""
    t_max = student.native.t_max
    rows = []
    for seed in range(seeds):
        labels = balanced_labels(num)
        eps = torch.randn((num, *SHAPE), generator=torch.Generator().manual_seed(seed))
        x0 = student(initial_noise(student.native, t_max, eps), torch.full((num,), t_max), {"class_labels": labels})
        images = to_unit(x0.clamp(-1, 1))
        rows.append((metrics.fid_held_out(images), metrics.fid_train(images), 100 * metrics.accuracy(images, labels)))
    return {key: sum(r[i] for r in rows) / seeds for i, key in enumerate(("fid", "fid_train", "accuracy"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16384)
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ideal", default="lcm,scm", help="recipes whose plans run with the exact ODE map ('' none)")
    parser.add_argument("--output", type=Path, default=Path("runs/one-step-bound"))
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    teacher, _ = load_denoiser("digits")
    teacher.model.requires_grad_(False).eval()
    start = time.perf_counter()
    pairs = ode_pairs(teacher, args.pairs, args.teacher_steps, args.seed, args.output / f"pairs_{args.pairs}.pt")
    pair_s = time.perf_counter() - start

    metrics = DigitsMetrics.load()
    ideal = score_ideal_plans(teacher, metrics, [r for r in args.ideal.split(",") if r], args.teacher_steps)
    model = copy.deepcopy(teacher.model).requires_grad_(True).eval()
    ema = copy.deepcopy(model).requires_grad_(False)
    student, student_ema = teacher.with_model(model), teacher.with_model(ema)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    t_max = torch.full((args.batch_size,), teacher.native.t_max)
    rows: list[dict[str, Any]] = [{"step": 0, "mse": None, **score_one_step(teacher, metrics)}]
    start = time.perf_counter()
    for step in tqdm(range(1, args.steps + 1), desc="regress", disable=not os.isatty(2)):
        idx = torch.randint(0, args.pairs, (args.batch_size,))
        x_T = initial_noise(teacher.native, teacher.native.t_max, pairs["noise"][idx])
        x0_theta = student(x_T, t_max, {"class_labels": pairs["labels"][idx]})
        loss = ((x0_theta - pairs["x0"][idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = ema_decay_at(args.ema, step)
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        if step % args.eval_every == 0 or step == args.steps:
            rows.append({"step": step, "mse": loss.item(), **score_one_step(student_ema, metrics)})
            print(f"step {step:6d}  mse {loss.item():.4f}  FID {rows[-1]['fid']:.2f} / train "
                  f"{rows[-1]['fid_train']:.2f}  acc {rows[-1]['accuracy']:.1f}%", flush=True)  # fmt: skip
    train_s = time.perf_counter() - start

    lines = [
        "| regression steps | batch MSE | 1-step FID held-out | 1-step FID train | accuracy |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mse = "teacher" if r["mse"] is None else f"{r['mse']:.4f}"
        lines.append(f"| {r['step']} | {mse} | {r['fid']:.2f} | {r['fid_train']:.2f} | {r['accuracy']:.1f}% |")
    print("\n".join(lines))
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "ideal_plans": ideal,
        "pairs_seconds": pair_s,
        "train_seconds": train_s,
        "threads": torch.get_num_threads(),
    }
    with atomic_file(args.output / "one_step_bound.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output / 'one_step_bound.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
