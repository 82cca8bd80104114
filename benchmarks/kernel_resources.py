"""Shared memory and registers of every Triton kernel of fewstep_kernels, per launch configuration, without a GPU.

    python benchmarks/kernel_resources.py [--archs 80,90] [--dtypes fp16,bf16,fp32] [--head-dims 64,128,256]
        [--jobs 2] [--out runs/kernel_resources.json]

Each row is one kernel built by Triton's ahead-of-time compiler (fewstep_kernels.aot: triton.compile on an ASTSource
for GPUTarget("cuda", arch, 32)) in the launch configuration its launcher picks for that arch, dtype and head dim
(self-attention, d = dv, no bias, not causal): the forward alone, the one-pass forward+JVP and the JVP from a saved lse
(both with all three tangents), and the two backward kernels. ``shared`` is compiled.metadata.shared (the dynamic
shared memory a launch requests), against the per-block limit (163 KiB on sm_80, 227 KiB on sm_90). Triton's metadata
has no register count before a driver loads the binary, so registers per thread and the stack frame (spilled
registers) come from the cubin via the wheel's cuobjdump. Prints a markdown table (kernels/README.md carries it) and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from fewstep_kernels import aot  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block (CUDA C Programming Guide, compute capabilities)
MODES = (("fwd", ""), ("fwd_jvp", "qkv"), ("from_lse", "qkv"), ("bwd", ""))


def specs(archs: list[int], dtypes: list[str], head_dims: list[int]) -> list[aot.Spec]:
    return [s for arch in archs for dtype in dtypes for d in head_dims for mode, tangents in MODES
            for s in aot.specs_for(arch, dtype, d, d, mode, tangents)]  # fmt: skip


def label(row: dict[str, Any]) -> str:
    if row["mode"] == "bwd":
        return "bwd " + row["kernel"].removeprefix("attention_bwd_").removesuffix("_kernel")
    return row["mode"] + (f" [{row['tangents']}]" if row["tangents"] else "")


def cell(row: dict[str, Any]) -> str:
    """shared KiB (% of the arch's limit) / registers per thread / stack bytes per thread (spills)."""
    if not row["ok"]:
        return f"failed: {row['error']}"
    share = 100 * row["shared"] / SHARED_LIMIT[row["arch"]]
    return f"{row['shared'] / 1024:.1f} ({share:.0f}%) / {row.get('n_regs', '-')} / {row.get('stack_bytes', '-')}"


def table(rows: list[dict[str, Any]]) -> str:
    """One line per (arch, dtype, head dim): tiles, warps, stages, then one cell per kernel launch."""
    labels = list(dict.fromkeys(label(r) for r in rows))
    lines: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["arch"], r["dtype"], r["d_k"])
        tiles = f"{r['BLOCK_M']} x {r['BLOCK_N']}, {r['num_warps']} w, {r['num_stages']} st"
        lines.setdefault(key, {"tiles": set()})["tiles"].add(tiles)
        lines[key][label(r)] = cell(r)
    out = ["| arch | dtype | d | tiles (BLOCK_M x N, warps, stages) | " + " | ".join(labels) + " |",
           "|---|---|---:|---|" + "---:|" * len(labels)]  # fmt: skip
    for (arch, dtype, d), line in lines.items():
        cells = " | ".join(line.get(lab, "-") for lab in labels)
        out.append(f"| sm_{arch} | {dtype} | {d} | {'; '.join(sorted(line['tiles']))} | {cells} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="80,90")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32")
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--jobs", type=int, default=2, help="build processes")
    parser.add_argument("--out", type=Path, default=Path("runs/kernel_resources.json"))
    args = parser.parse_args()
    chosen = specs([int(a) for a in args.archs.split(",")], args.dtypes.split(","),
                   [int(d) for d in args.head_dims.split(",")])  # fmt: skip
    start = time.perf_counter()
    rows = aot.compile_specs(chosen, jobs=args.jobs)
    seconds = time.perf_counter() - start
    print(table(rows))
    print(f"{len(rows)} builds in {seconds:.0f} s; {sum(not r['ok'] for r in rows)} failed")
    import triton

    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {"triton": triton.__version__, "python": platform.python_version(), "seconds": seconds}
    config = {k: str(v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"config": config, "shared_limit": SHARED_LIMIT, "rows": rows, "env": env},
                                   indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
