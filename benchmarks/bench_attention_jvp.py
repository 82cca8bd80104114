"""Attention forward+JVP: fewstep_kernels against torch.func.jvp over PyTorch's math SDPA (time and peak memory).

    python benchmarks/bench_attention_jvp.py [--device cpu|cuda] [--sizes 256,...,8192] [--heads 4] [--head-dim 64]
        [--batch 1] [--dtype float32] [--repeats 3] [--threads N] [--out runs/bench_attention_jvp.json]

Cases (self-attention, B x H x N x d, every tangent non-zero):
  CPU  chunked_fwd       the chunked path's forward alone (o, lse)
       chunked_fwd_jvp   the chunked path's one-pass forward+JVP (o, o_dot, lse): the explicit-tangent API
       chunked_func_jvp  torch.func.jvp through fewstep's AttentionFunction on the chunked path (what jvp_attention
                         runs in a model: the forward, then the one-pass op inside jvp)
       math_fwd          math SDPA forward, for scale
       math_func_jvp     torch.func.jvp over math SDPA (the N x N baseline)
  CUDA triton_fwd, triton_fwd_jvp, triton_func_jvp, flash_fwd (PyTorch's own fused forward), math_func_jvp, with
       TFLOP/s counting the forward as 4 B H N^2 d matmul FLOPs and a JVP as 3x that (RECIPES.md 2, 4.4).

Peak memory is the extra memory one call needs beyond its inputs. On CUDA: torch.cuda.max_memory_allocated during the
call minus what was allocated before it. On CPU, where PyTorch keeps no allocator statistics, each case runs in a
fresh process with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), so every large tensor is its
own mapping returned to the OS when freed; after a warm-up call the kernel's resident-set high-water mark is reset
(/proc/self/clear_refs) and the peak is VmHWM after one call minus VmRSS before it. That counts every byte the call
touches (tensors, allocator slack, workspace of BLAS), not just tensors. Times: median (and min) of --repeats calls
after one warm-up. For the numbers in issue 4 pin one core: taskset -c 1 env OMP_NUM_THREADS=1 ... --threads 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CPU_CASES = ["chunked_fwd", "chunked_fwd_jvp", "chunked_func_jvp", "math_fwd", "math_func_jvp"]
CUDA_CASES = ["triton_fwd", "triton_fwd_jvp", "triton_func_jvp", "flash_fwd", "math_func_jvp"]
JVP_CASES = {"chunked_fwd_jvp", "chunked_func_jvp", "math_func_jvp", "triton_fwd_jvp", "triton_func_jvp"}


def make_call(case: str, n: int, args: argparse.Namespace, device: torch.device) -> Callable[[], Any]:
    """The measured call of one case on fresh random inputs (B, H, N, d) and tangents."""
    import torch.nn.functional as F
    from fewstep_kernels import attention, attention_jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device).manual_seed(0)
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v, q_dot, k_dot, v_dot = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(6))
    backend = "chunked" if case.startswith("chunked") else "triton"

    def func_jvp(fn: Callable[..., torch.Tensor]) -> Callable[[], Any]:
        return lambda: torch.func.jvp(fn, (q, k, v), (q_dot, k_dot, v_dot))

    def math_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    def flash_sdpa() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    calls: dict[str, Callable[[], Any]] = {
        "chunked_fwd": lambda: attention(q, k, v, backend="chunked"),
        "chunked_fwd_jvp": lambda: attention_jvp(q, k, v, q_dot, k_dot, v_dot, backend="chunked"),
        "chunked_func_jvp": func_jvp(lambda q, k, v: attention(q, k, v, backend="chunked")),
        "triton_fwd": lambda: attention(q, k, v, backend=backend),  # type: ignore[arg-type]
        "triton_fwd_jvp": lambda: attention_jvp(q, k, v, q_dot, k_dot, v_dot, backend=backend),  # type: ignore[arg-type]
        "triton_func_jvp": func_jvp(lambda q, k, v: attention(q, k, v, backend=backend)),  # type: ignore[arg-type]
        "flash_fwd": flash_sdpa,
        "math_fwd": lambda: math_sdpa(q, k, v),
        "math_func_jvp": func_jvp(math_sdpa),
    }
    return calls[case]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(case: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time and peak extra memory of one case in this process (the child, on CPU)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        call = make_call(case, n, args, device)
        call()  # warm-up: lazy initialisation, Triton compilation
        sync()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = call()
            sync()
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = _status_kib("VmRSS")
            out = call()
            peak = (_status_kib("VmHWM") - before) * 1024
        del out
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - start)
    flops = 4 * args.batch * args.heads * n * n * args.head_dim * (3 if case in JVP_CASES else 1)
    ms = 1e3 * statistics.median(times)
    return {"case": case, "n": n, "ms": ms, "ms_min": 1e3 * min(times), "peak_mib": peak / 2**20,
            "tflops": flops / (ms * 1e-3) / 1e12, "threads": torch.get_num_threads()}  # fmt: skip


def run_case(case: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One case in a fresh process (CPU: a clean resident-set high-water mark) or in this one (CUDA)."""
    if args.device.startswith("cuda"):
        return measure(case, n, args)
    cmd = [sys.executable, __file__, "--child", case, "--sizes", str(n), *forwarded(args)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} at N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def forwarded(args: argparse.Namespace) -> list[str]:
    """The parent's settings as the child's command line."""
    names = ("device", "heads", "head_dim", "batch", "dtype", "repeats", "threads")
    return [x for name in names for x in ("--" + name.replace("_", "-"), str(getattr(args, name)))]


def report(rows: list[dict[str, Any]], baseline: str, forward: str, fused: str) -> None:
    """The table: time, peak memory, TFLOP/s, and ratios to the math-SDPA jvp and to the forward alone."""
    by = {(r["case"], r["n"]): r for r in rows}
    print(f"{'N':>6} {'case':>18} {'ms':>10} {'min ms':>10} {'peak MiB':>10} {'TFLOP/s':>8} "
          f"{'math jvp / this':>15} {'mem math / this':>15} {'this / fwd':>10}")  # fmt: skip
    for r in rows:
        base, fwd = by.get((baseline, r["n"])), by.get((forward, r["n"]))
        r["speedup_vs_math_jvp"] = base["ms"] / r["ms"] if base else None
        r["memory_ratio_vs_math_jvp"] = base["peak_mib"] / max(r["peak_mib"], 1e-9) if base else None
        r["time_vs_forward"] = r["ms"] / fwd["ms"] if fwd else None
        cells = [f"{x:>15.2f}" if x is not None else f"{'-':>15}" for x in
                 (r["speedup_vs_math_jvp"], r["memory_ratio_vs_math_jvp"])]  # fmt: skip
        ratio = f"{r['time_vs_forward']:>10.2f}" if r["time_vs_forward"] is not None else f"{'-':>10}"
        print(f"{r['n']:>6} {r['case']:>18} {r['ms']:>10.1f} {r['ms_min']:>10.1f} {r['peak_mib']:>10.1f} "
              f"{r['tflops']:>8.3f} {cells[0]} {cells[1]} {ratio}")  # fmt: skip
    for n in sorted({r["n"] for r in rows}):
        if (fused, n) in by and (baseline, n) in by:
            f, b, fw = by[(fused, n)], by[(baseline, n)], by.get((forward, n))
            print(f"N={n}: {fused} uses {b['peak_mib'] / max(f['peak_mib'], 1e-9):.1f}x less peak memory than "
                  f"{baseline}, runs {b['ms'] / f['ms']:.2f}x its speed"
                  + (f", and takes {f['ms'] / fw['ms']:.2f}x {forward}" if fw else ""))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests parse benchmarks/gpu_check.sh's flags with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--cases", default=None, help="comma-separated subset of the device's cases")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default), float16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each case (0: leave)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_attention_jvp.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        print(json.dumps(measure(args.child, sizes[0], args)))
        return

    cases = args.cases.split(",") if args.cases else (CUDA_CASES if cuda else CPU_CASES)
    rows = []
    for n in sizes:
        for case in cases:
            rows.append(run_case(case, n, args))
            print(f"  N={n:>5} {case:>18}: {rows[-1]['ms']:9.1f} ms, {rows[-1]['peak_mib']:8.1f} MiB", flush=True)
    prefix = "triton" if cuda else "chunked"
    report(rows, "math_func_jvp", f"{prefix}_fwd", f"{prefix}_fwd_jvp")
    from fewstep.bench.measure import environment

    config = {k: v for k, v in vars(args).items() if k not in ("child", "out")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": config, "rows": rows, "env": environment(torch.device(args.device))}
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
