"""How close can a one-step student of the digits teacher's own network get to the teacher's ODE map at all?

    python benchmarks/one_step_bound.py [--pairs 16384] [--steps 3000] [--eval-every 1000] [--output DIR]
                                        [--plan-recipe scm --plan-steps 2] [--noise-seeds 3]

Consistency recipes (LCM, sCM) train the student towards the teacher's probability-flow map noise -> x0, so a
one-step consistency student is at best that map. This script gives the map to a student directly: it draws
``--pairs`` noises with balanced class labels, solves the teacher's ODE from each (Euler, ``--teacher-steps``), and
regresses a copy of the teacher (the students' initialization) onto the pairs, x0_theta(eps, t_max) ~ ODE(eps), by
MSE (Luhman & Luhman 2021's knowledge distillation). Every ``--eval-every`` steps the bias-corrected EMA (as the
Trainer exports) is scored at one step like `fewstep bench`: 3 seeds x 1,000 samples (``--noise-seeds``), FID
against the held-out and the train split, class accuracy. The table is printed and written to
OUT/one_step_bound.json (OUT: runs/one-step-bound by default); the pairs are cached in OUT. The exact map also runs
each ``--ideal`` recipe's digits-preset plans (the pipeline's stock times, as the presets export them).

With ``--plan-steps N`` (N > 1) the student is instead regressed onto every time of ``--plan-recipe``'s N-step digits
plan: at the first, noise -> ODE(noise) as above; at each later time t, a pair's x0 re-noised there with fresh noise
(the plan's own re-noising) -> the ODE's x0 from that point. Each sample of a batch draws one of the plan's times. The
EMA is scored on the 1-step and the N-step plan: what a student given its plan's exact targets reaches in that many
steps.
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

from fewstep.bench.metrics import DigitsMetrics, to_unit
from fewstep.io import atomic_file
from fewstep.loading import load_denoiser
from fewstep.recipes import resolve
from fewstep.sampling import SamplingPlan, euler_sample, euler_times, initial_noise, plan_in, sample_plan
from fewstep.schedules import NoiseSchedule
from fewstep.teacher import Denoiser
from fewstep.training.config import find_preset, resolve_config
from fewstep.training.data import null_class_of, teacher_samples
from fewstep.training.trainer import ema_decay_at
from fewstep.worlds.digits.data import balanced_labels

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


def plan_pairs(
    teacher: Denoiser, pairs: dict[str, torch.Tensor], plan: SamplingPlan, steps: int, seed: int, cache: Path
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x_t, x0 target) at each of ``plan``'s times: pure noise -> the pairs' x0 at the first; a pair's x0 re-noised
    at each later time with fresh noise -> the ODE's solution from there (cached per time beside ``cache``)."""
    native = teacher.native
    out = [(initial_noise(native, plan.times[0], pairs["noise"]), pairs["x0"])]
    for k, t in enumerate(plan.times[1:], start=1):
        path = cache.with_name(f"{cache.stem}_t{t:.4f}.pt")
        if path.is_file():
            out.append(tuple(torch.load(path)))
            continue
        eps = torch.randn(pairs["x0"].shape, generator=torch.Generator().manual_seed(seed + 1000 * k))
        x_t = native.add_noise(pairs["x0"], eps, torch.full((len(eps),), t))
        chunks = []
        with torch.no_grad():
            for i in tqdm(range(0, len(x_t), 1024), desc=f"ODE from t={t:.3f}", disable=not os.isatty(2)):
                labels = pairs["labels"][i : i + 1024]
                chunks.append(ode_map(teacher, labels, steps)(x_t[i : i + 1024], torch.full((len(labels),), t)))
        out.append((x_t, torch.cat(chunks)))
        with atomic_file(path) as tmp:
            torch.save(list(out[-1]), tmp)
    return out


@torch.no_grad()
def score_plan(
    denoiser: Any, metrics: DigitsMetrics, plan: SamplingPlan, num: int = 1000, seeds: int = 3
) -> dict[str, float]:
    """``plan`` run with ``denoiser(labels)`` -> (x_t, t) -> x0, scored like `fewstep bench` (``seeds`` x ``num``)."""
    rows = []
    for seed in range(seeds):
        labels = balanced_labels(num)
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn((num, *SHAPE), generator=gen)
        images = to_unit(sample_plan(denoiser(labels), plan, eps, gen).clamp(-1, 1))
        rows.append((metrics.fid_held_out(images), metrics.fid_train(images), 100 * metrics.accuracy(images, labels)))
    return {key: sum(r[i] for r in rows) / seeds for i, key in enumerate(("fid", "fid_train", "accuracy"))}


def conditioned(student: Denoiser) -> Any:
    return lambda labels: lambda x, t: student(x, t, {"class_labels": labels})


def digits_teacher() -> Denoiser:
    """The digits teacher as `fewstep distill` hands it to a recipe: carrying its pipeline's stock samplers, which
    set the presets' plans (a bare Denoiser would give the recipes' own plans instead)."""
    from fewstep.distill import prepare_teacher

    denoiser, pipe = load_denoiser("digits")
    return prepare_teacher(pipe, denoiser, None)


def digits_plans(teacher: Denoiser, recipe: str) -> dict[int, SamplingPlan]:
    """``recipe``'s digits-preset sampling plans, in the teacher's native time (the presets' stock plans when
    ``teacher`` comes from ``digits_teacher``)."""
    cls = resolve(recipe)
    plans = cls(teacher, resolve_config(cls.Config(), find_preset(recipe, "digits"))).plan()
    return {n: plan_in(plan, teacher.native) for n, plan in plans.items()}


def suffix(n: int) -> str:
    """The key suffix of an n-step plan's scores in a result row ("" for the 1-step plan)."""
    return "" if n == 1 else f"_{n}step"


@torch.no_grad()
def score_ideal_plans(
    teacher: Denoiser, metrics: DigitsMetrics, recipes: list[str], steps: int, seeds: int = 3
) -> list[dict[str, Any]]:
    """Each recipe's digits-preset plans run with the teacher's exact ODE map as the student (``seeds`` x 1,000)."""
    rows = []
    for name in recipes:
        for n, plan in digits_plans(teacher, name).items():
            scores = score_plan(lambda labels: ode_map(teacher, labels, steps), metrics, plan, seeds=seeds)
            fid, fid_train = scores["fid"], scores["fid_train"]
            rows.append({"recipe": name, "steps": n, "times": list(plan.times), "fid": fid, "fid_train": fid_train})
            print(f"ideal {name} {n}-step plan {tuple(round(t, 3) for t in plan.times)}: FID {fid:.2f} / train "
                  f"{fid_train:.2f}", flush=True)  # fmt: skip
    return rows


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
    parser.add_argument("--plan-recipe", default="scm", help="whose digits plan --plan-steps takes")
    parser.add_argument("--plan-steps", type=int, default=1, help="regress onto every time of this plan (1: t_max)")
    parser.add_argument("--ideal", default="lcm,scm", help="recipes whose plans run with the exact ODE map ('' none)")
    parser.add_argument("--noise-seeds", type=int, default=3, help="noise seeds x 1,000 samples per score (default 3)")
    parser.add_argument("--output", type=Path, default=Path("runs/one-step-bound"))
    args = parser.parse_args(argv)
    if args.noise_seeds < 1:
        raise SystemExit(f"error: --noise-seeds must be >= 1, got {args.noise_seeds}")

    torch.manual_seed(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    teacher = digits_teacher()
    teacher.model.requires_grad_(False).eval()
    start = time.perf_counter()
    pairs = ode_pairs(teacher, args.pairs, args.teacher_steps, args.seed, args.output / f"pairs_{args.pairs}.pt")

    one_step = SamplingPlan(teacher.native, (teacher.native.t_max,))
    plans = {1: one_step}
    if args.plan_steps > 1:
        recipe_plans = digits_plans(teacher, args.plan_recipe)
        if args.plan_steps not in recipe_plans:
            raise SystemExit(f"error: {args.plan_recipe}'s digits plans have {sorted(recipe_plans)} steps")
        plans[args.plan_steps] = recipe_plans[args.plan_steps]
    targets = plan_pairs(
        teacher, pairs, plans[args.plan_steps], args.teacher_steps, args.seed, args.output / f"pairs_{args.pairs}.pt"
    )
    times = torch.tensor(plans[args.plan_steps].times)
    inputs, outputs = (torch.stack([pair[i] for pair in targets]) for i in range(2))  # (K, N, ...) over plan times
    pair_s = time.perf_counter() - start

    metrics = DigitsMetrics.load()
    ideal = score_ideal_plans(
        teacher, metrics, [r for r in args.ideal.split(",") if r], args.teacher_steps, args.noise_seeds
    )

    model = copy.deepcopy(teacher.model).requires_grad_(True).eval()
    ema = copy.deepcopy(model).requires_grad_(False)
    student, student_ema = teacher.with_model(model), teacher.with_model(ema)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))

    def scores(denoiser: Denoiser) -> dict[str, float]:
        out = {}
        for n, plan in plans.items():
            for key, value in score_plan(conditioned(denoiser), metrics, plan, seeds=args.noise_seeds).items():
                out[key + suffix(n)] = value
        return out

    rows: list[dict[str, Any]] = [{"step": 0, "mse": None, **scores(teacher)}]
    start = time.perf_counter()
    for step in tqdm(range(1, args.steps + 1), desc="regress", disable=not os.isatty(2)):
        idx = torch.randint(0, args.pairs, (args.batch_size,))
        k = torch.randint(0, len(targets), (args.batch_size,))
        x0_theta = student(inputs[k, idx], times[k], {"class_labels": pairs["labels"][idx]})
        loss = ((x0_theta - outputs[k, idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = ema_decay_at(args.ema, step)
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        if step % args.eval_every == 0 or step == args.steps:
            rows.append({"step": step, "mse": loss.item(), **scores(student_ema)})
            print(f"step {step:6d}  mse {loss.item():.4f}  " + "  ".join(
                f"{n}-step FID {rows[-1]['fid' + suffix(n)]:.2f} / train {rows[-1]['fid_train' + suffix(n)]:.2f}"
                for n in plans), flush=True)  # fmt: skip
    train_s = time.perf_counter() - start

    lines = [
        "| regression steps | batch MSE | "
        + " | ".join(f"{n}-step FID held-out | {n}-step FID train | {n}-step accuracy" for n in plans)
        + " |",
        "|---:|---:|" + "---:|---:|---:|" * len(plans),
    ]
    for r in rows:
        mse = "teacher" if r["mse"] is None else f"{r['mse']:.4f}"
        cells = " | ".join(
            f"{r['fid' + sx]:.2f} | {r['fid_train' + sx]:.2f} | {r['accuracy' + sx]:.1f}%" for sx in map(suffix, plans)
        )
        lines.append(f"| {r['step']} | {mse} | {cells} |")
    print("\n".join(lines))
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "ideal_plans": ideal,
        "pairs_seconds": pair_s,
        "train_seconds": train_s,
        "threads": torch.get_num_threads(),
    }
    name = "one_step_bound.json" if args.plan_steps == 1 else f"plan_bound_{args.plan_recipe}_{args.plan_steps}.json"
    with atomic_file(args.output / name) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
