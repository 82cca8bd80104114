"""Ahead-of-time builds of the Triton kernels for real GPUs, on a machine without one.

The Triton interpreter (TRITON_INTERPRET=1, how the kernels run in CI) accepts code that the real compiler rejects,
so passing the interpreter tests does not prove a kernel builds for a GPU. This module compiles a kernel in the launch
configuration its launcher picks (``triton_jvp.jvp_launch_params``, ``triton_bwd.bwd_launch_params``) with Triton's
ahead-of-time compiler: ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch,
32), options=...)`` lowers to PTX and runs the ptxas that ships in the triton wheel. ``compiled.metadata.shared`` is
the shared memory a launch needs; registers and spills are read from the cubin with the wheel's ``cuobjdump``
(Triton's metadata has no register count until a driver loads the binary).

A build is described by a ``Spec`` (plain values, JSON-friendly). Triton must be imported with TRITON_INTERPRET unset
to compile, so ``compile_specs`` runs the builds in fresh processes (``python -m fewstep_kernels.aot``, specs on
stdin, results on stdout as JSON), which the CI test and ``benchmarks/kernel_resources.py`` both use.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# A launch's mode: the forward alone, forward + JVP in one pass, the JVP from a saved forward's lse, the backward.
MODES = ("fwd", "fwd_jvp", "from_lse", "bwd")
DTYPES = ("fp16", "bf16", "fp32")
JVP_KERNEL = "attention_jvp_kernel"
BWD_KERNELS = ("attention_bwd_kv_kernel", "attention_bwd_q_kernel")
ROW_STATS = {"LSE", "DELTA"}  # float32 whatever the inputs


@dataclass(frozen=True)
class Spec:
    """One kernel build: target ``arch`` (80 = sm_80), the inputs' dtype and head dims, the launch mode, which
    tangents are given (a subset of "qkv"; empty for "fwd" and "bwd"), the key bias and the causal mask."""

    arch: int
    kernel: str
    dtype: str
    d_k: int
    d_v: int
    mode: str
    tangents: str = ""
    bias: bool = False
    causal: bool = False

    @property
    def name(self) -> str:
        dims = f"d{self.d_k}" if self.d_k == self.d_v else f"d{self.d_k}v{self.d_v}"
        mode = self.mode + (f"[{self.tangents}]" if self.tangents else "")
        flags = "".join(("-bias" if self.bias else "", "-causal" if self.causal else ""))
        return f"sm{self.arch}-{self.kernel.removeprefix('attention_')}-{self.dtype}-{dims}-{mode}{flags}"


def specs_for(
    arch: int, dtype: str, d_k: int, d_v: int, mode: str, tangents: str = "", bias: bool = False, causal: bool = False
) -> list[Spec]:
    """The kernel builds one attention call makes: one for the forward modes, two for the backward."""
    assert mode in MODES and dtype in DTYPES and set(tangents) <= set("qkv")
    assert bool(tangents) == (mode in ("fwd_jvp", "from_lse")), f"{mode} with tangents {tangents!r}"
    kernels = BWD_KERNELS if mode == "bwd" else (JVP_KERNEL,)
    return [Spec(arch, kernel, dtype, d_k, d_v, mode, tangents, bias, causal) for kernel in kernels]


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def launch_params(spec: Spec) -> Any:
    """The ``LaunchParams`` the launcher picks for this build on a GPU of compute capability ``spec.arch``."""
    from .triton_bwd import bwd_launch_params
    from .triton_jvp import jvp_launch_params

    capability = (spec.arch // 10, spec.arch % 10)
    dtype = torch_dtype(spec.dtype)
    if spec.mode == "bwd":
        return bwd_launch_params(dtype, spec.d_k, spec.d_v, capability, bias=spec.bias, causal=spec.causal)[
            spec.kernel
        ]
    return jvp_launch_params(
        dtype, spec.d_k, spec.d_v, capability, q_dot="q" in spec.tangents, k_dot="k" in spec.tangents,
        v_dot="v" in spec.tangents, from_lse=spec.mode == "from_lse", bias=spec.bias, causal=spec.causal,
    )  # fmt: skip


def stride_head_dim(name: str, spec: Spec) -> int | None:
    """The head dim of the tensor a stride argument belongs to (stride_q*, stride_k* -> d_k; stride_v*, stride_o*
    -> d_v), or None for the bias stride."""
    dims = {"stride_q": spec.d_k, "stride_k": spec.d_k, "stride_v": spec.d_v, "stride_o": spec.d_v}
    return next((dim for prefix, dim in dims.items() if name.startswith(prefix)), None)


def build_inputs(spec: Spec, fn: Any, constexprs: dict[str, Any]) -> tuple[dict[str, str], dict[tuple[int], list]]:
    """The signature and the specialization attributes of one launch, as Triton's JIT derives them at run time for
    contiguous (B, H, N, D) tensors: pointers 16-byte aligned (fresh PyTorch allocations are), every stride of a
    tensor whose head dim is a multiple of 16 divisible by 16; sequence lengths and head counts left unspecialized.
    Pointers carry the inputs' dtype, except the float32 row statistics and the float32 key bias (without a bias the
    launcher passes q in its place)."""
    io = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[spec.dtype]
    signature: dict[str, str] = {}
    attrs: dict[tuple[int], list] = {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper() and name not in ("H", "H_KV", "GROUP", "N_Q", "N_K"):  # a pointer
            fp32 = name in ROW_STATS or (name == "BIAS" and spec.bias)
            signature[name] = "*fp32" if fp32 else io
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            dim = stride_head_dim(name, spec) if name.startswith("stride_") else None
            if dim is not None and dim % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def resource_usage(cubin: bytes, arch: int) -> dict[str, int]:
    """Registers per thread, spill stores/loads and local memory of a cubin (``cuobjdump -res-usage``)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = Path(get_ptxas(arch).path).with_name("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    names = {"reg": "n_regs", "local": "local_bytes", "stack": "stack_bytes"}
    return {name: usage.get(key, -1) for key, name in names.items()}


def compile_spec(spec: Spec, registers: bool = True) -> dict[str, Any]:
    """Builds one spec in this process (TRITON_INTERPRET must be unset): the spec, its launch parameters, ``ok`` and
    the first line of the compiler's error, the shared memory in bytes, registers (``registers``) and seconds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_bwd, triton_jvp

    fn = getattr(triton_bwd if spec.mode == "bwd" else triton_jvp, spec.kernel)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("fewstep_kernels.aot needs the real compiler: import triton with TRITON_INTERPRET unset")
    params = launch_params(spec)
    result: dict[str, Any] = {"name": spec.name, **asdict(spec), **{k: v for k, v in params.constexprs.items()},
                              "num_warps": params.num_warps, "num_stages": params.num_stages}  # fmt: skip
    signature, attrs = build_inputs(spec, fn, params.constexprs)
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, params.constexprs, attrs),
            target=GPUTarget("cuda", spec.arch, 32),
            options=params.options(),
        )
    except Exception as error:  # the compiler's own error is the result
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        message = errors[-1] if errors else lines[-1] if lines else ""
        result.update(ok=False, error=f"{type(error).__name__}: {message}"[:400], shared=None)
    else:
        result.update(ok=True, error=None, shared=int(compiled.metadata.shared))
        if registers:
            result.update(resource_usage(compiled.asm["cubin"], spec.arch))
    result["seconds"] = time.perf_counter() - start
    return result


def compile_specs(
    specs: list[Spec],
    jobs: int = 1,
    cache_dir: str | Path | None = None,
    timeout: float = 1800,
    registers: bool = True,
) -> list[dict[str, Any]]:
    """Builds ``specs`` in ``jobs`` fresh processes with TRITON_INTERPRET unset (results in the order of ``specs``).
    ``cache_dir`` is Triton's cache for them (default: a new temporary folder, so every build is a real one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    kernels_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (kernels_root, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = str(cache_dir or tmp)
        shards = [specs[i::jobs] for i in range(max(1, jobs))]
        procs = []
        for i, shard in enumerate(shards):
            cmd = [sys.executable, "-m", "fewstep_kernels.aot"] + ([] if registers else ["--no-registers"])
            io = {name: Path(tmp, f"{name}{i}.json") for name in ("in", "out", "err")}
            io["in"].write_text(json.dumps([asdict(s) for s in shard]))
            with io["in"].open() as stdin, io["out"].open("w") as stdout, io["err"].open("w") as stderr:
                procs.append((subprocess.Popen(cmd, env=env, stdin=stdin, stdout=stdout, stderr=stderr), io))
        results: dict[str, dict[str, Any]] = {}
        for proc, io in procs:
            if proc.wait(timeout=timeout) != 0:
                raise RuntimeError(f"the build process failed:\n{io['err'].read_text()[-3000:]}")
            results.update((r["name"], r) for r in json.loads(io["out"].read_text()))
    return [results[s.name] for s in specs]


def main() -> None:
    """Reads a JSON list of specs on stdin, writes a JSON list of results on stdout."""
    registers = "--no-registers" not in sys.argv[1:]
    specs = [Spec(**s) for s in json.loads(sys.stdin.read())]
    json.dump([compile_spec(s, registers) for s in specs], sys.stdout)


if __name__ == "__main__":
    main()
