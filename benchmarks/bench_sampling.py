"""Sampling latency of a model folder against its step count, measured in one run so ratios are comparable.

    python benchmarks/bench_sampling.py [MODEL] [--steps 1,2,4,50] [--batch 100] [--repeats 5] [--json out.json]

Prints a table (median and p90 ms per batch, ms per image, ratio to the fewest steps) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from fewstep.bench.measure import environment, measure_speed, percentile
from fewstep.loading import load_pipeline
from fewstep.worlds.digits.data import balanced_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="digits")
    parser.add_argument("--steps", default="1,2,4,50")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_sampling.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device=device)
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        call = {"class_labels": balanced_labels(args.batch), "num_inference_steps": steps}
        speed = measure_speed(pipe, call, args.batch, device, warmup=1, repeats=args.repeats)
        rows.append(
            {
                "steps": steps,
                "nfe": speed.nfe,
                "ms": statistics.median(speed.times_ms),
                "ms_p90": percentile(speed.times_ms, 0.9),
                "peak_mem_mb": speed.peak_mem_mb,
            }
        )
    base = rows[0]["ms"]
    print(f"{'steps':>6} {'ms/batch':>10} {'p90':>10} {'ms/image':>9} {'x fewest':>9}")
    for r in rows:
        r["ms_per_image"] = r["ms"] / args.batch
        r["ratio"] = r["ms"] / base
        print(f"{r['steps']:>6} {r['ms']:>10.1f} {r['ms_p90']:>10.1f} {r['ms_per_image']:>9.3f} {r['ratio']:>9.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "batch": args.batch, "rows": rows, "env": environment(device)}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
