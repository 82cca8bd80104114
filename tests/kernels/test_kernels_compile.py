"""Every @triton.jit kernel of fewstep_kernels builds for sm_80 and sm_90 with Triton's real (ahead-of-time) compiler,
in the launch configurations its launchers pick on CUDA, and fits the target's shared memory. No GPU needed: the
builds run ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` with the ptxas of the triton wheel
(``fewstep_kernels.aot``), in fresh processes with TRITON_INTERPRET unset (the interpreter, which the rest of the
suite uses on CPU, accepts code the real compiler rejects).

Launch parameters (tile sizes, warps, stages, constexpr flags) come from the launchers' own functions,
``triton_jvp.jvp_launch_params`` and ``triton_bwd.bwd_launch_params``, given (arch, dtype, head dims, mode, tangents,
bias, causal), so the builds are exactly what a GPU runs.

How the set of builds was chosen (the full cross product, 2 archs x 3 dtypes x 12 head-dim pairs x 16 modes x 4
bias/causal, about 4,900 builds at 1-2 s (fp32 far more), would take hours). For each arch:

1. Corners, for shared memory. Within one launch configuration (same tiles, warps, stages) a kernel's shared memory
   grows with the padded head dim and with the tiles a mode loads, so for each dtype the head dims are grouped by the
   launch configuration the launchers pick for them, and the largest head dim of each group is built in the heaviest
   variant of every kernel: the one-pass forward+JVP with all three tangents, the JVP from a saved lse with all three,
   and both backward kernels, each with key bias and causal mask. Every other build of that group needs no more.
   (The launchers pick tiles by dtype and head dim only, never by mode or flags; the argument rests on that, and
   test_tiles_depend_on_dtype_and_head_dim pins it.)
2. Flags, for what the compiler accepts. Every mode (forward alone, each of the 7 non-empty tangent subsets of the
   one-pass JVP and of the JVP from lse, backward) once, with dtype, head-dim pair, bias and causal rotating through
   all their values (offset per arch, so the two archs pair them differently): every value of every axis appears on
   each arch, including the head dims that are not powers of two (8, 40, 72, 80, 96, 160: padded tiles) and d != dv.

About 70 builds, run in two processes: ~1-2 min on two cores.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

pytest.importorskip("triton")
from fewstep_kernels import aot  # noqa: E402
from fewstep_kernels.triton_bwd import bwd_launch_params  # noqa: E402
from fewstep_kernels.triton_jvp import MAX_HEAD_DIM, jvp_launch_params  # noqa: E402

pytestmark = pytest.mark.slow

# Largest shared memory one block may use (the opt-in maximum of cudaFuncSetAttribute, CUDA C Programming Guide,
# "Technical Specifications per Compute Capability"): 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100/H200).
# sm_86/sm_89 (consumer Ampere/Ada) allow only 99 KiB and are not built here.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = tuple(SHARED_LIMIT)
DTYPES = aot.DTYPES
# (d, dv): SD 1.x's 40/80/160, DiT/PixArt's 72, Flux/Wan's 128, tiny test models' 8, and a d != dv pair.
HEAD_DIMS = [(8, 8), (16, 16), (32, 32), (40, 40), (64, 64), (72, 72), (80, 80), (96, 96), (128, 128), (160, 160),
             (256, 256), (64, 32)]  # fmt: skip
TANGENT_SETS = ["".join(c) for n in (1, 2, 3) for c in itertools.combinations("qkv", n)]
MODES = [("fwd", ""), *(("fwd_jvp", t) for t in TANGENT_SETS), *(("from_lse", t) for t in TANGENT_SETS), ("bwd", "")]


def tiles(arch: int, dtype: str, d_k: int, d_v: int) -> tuple:
    """The launch configuration (tiles, warps, stages) of every kernel for a dtype and head dims on ``arch``."""
    capability, torch_dtype = (arch // 10, arch % 10), aot.torch_dtype(dtype)
    jvp = jvp_launch_params(torch_dtype, d_k, d_v, capability)
    bwd = bwd_launch_params(torch_dtype, d_k, d_v, capability)
    return tuple((p.constexprs["BLOCK_M"], p.constexprs["BLOCK_N"], p.num_warps, p.num_stages)
                 for p in (jvp, *bwd.values()))  # fmt: skip


def corner_specs(arch: int) -> list[aot.Spec]:
    specs = []
    for dtype in DTYPES:
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for dims in HEAD_DIMS:
            groups.setdefault(tiles(arch, dtype, *dims), []).append(dims)
        for dims_of_group in groups.values():
            d_k, d_v = max(dims_of_group, key=lambda d: (max(d), d))
            for mode, tangents in (("fwd_jvp", "qkv"), ("from_lse", "qkv"), ("bwd", "")):
                specs += aot.specs_for(arch, dtype, d_k, d_v, mode, tangents, bias=True, causal=True)
    return specs


def flag_specs(arch: int) -> list[aot.Spec]:
    specs = []
    offset = ARCHS.index(arch)
    for i, (mode, tangents) in enumerate(MODES):
        j = i + offset
        dtype, (d_k, d_v) = DTYPES[j % len(DTYPES)], HEAD_DIMS[j % len(HEAD_DIMS)]
        specs += aot.specs_for(arch, dtype, d_k, d_v, mode, tangents, bias=j % 2 == 0, causal=(j // 2) % 2 == 0)
    return specs


def all_specs() -> list[aot.Spec]:
    unique = {s.name: s for arch in ARCHS for s in (*corner_specs(arch), *flag_specs(arch))}
    return list(unique.values())


SPECS = all_specs()


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every build of SPECS, once, in two processes, with a fresh Triton cache (so each build is a real one)."""
    start = time.perf_counter()
    results = aot.compile_specs(SPECS, jobs=2, cache_dir=tmp_path_factory.mktemp("triton-cache"), registers=False)
    seconds = time.perf_counter() - start
    print(f"\n{len(SPECS)} kernel builds in {seconds:.0f} s")
    return {r["name"]: r for r in results}


def test_covering_set_covers_every_axis_value() -> None:
    for arch in ARCHS:
        specs = [s for s in SPECS if s.arch == arch]
        assert {s.dtype for s in specs} == set(DTYPES)
        assert {(s.d_k, s.d_v) for s in specs} == set(HEAD_DIMS)
        assert {(s.mode, s.tangents) for s in specs} == set(MODES)
        assert {(s.bias, s.causal) for s in specs} == {(b, c) for b in (False, True) for c in (False, True)}
        assert {s.kernel for s in specs} == {aot.JVP_KERNEL, *aot.BWD_KERNELS}
    assert len(SPECS) <= 90, "keep the builds under ~3 minutes on two cores"


def test_tiles_depend_on_dtype_and_head_dim() -> None:
    """The corner argument: modes and flags never change the tiles the launchers pick."""
    for arch, dtype, dims in itertools.product(ARCHS, DTYPES, HEAD_DIMS):
        capability, torch_dtype = (arch // 10, arch % 10), aot.torch_dtype(dtype)
        base = tiles(arch, dtype, *dims)
        for q_dot, k_dot, v_dot, from_lse, bias, causal in itertools.product((False, True), repeat=6):
            p = jvp_launch_params(torch_dtype, *dims, capability, q_dot=q_dot, k_dot=k_dot, v_dot=v_dot,
                                  from_lse=from_lse, bias=bias, causal=causal)  # fmt: skip
            assert (p.constexprs["BLOCK_M"], p.constexprs["BLOCK_N"], p.num_warps, p.num_stages) == base[0]
        for p in bwd_launch_params(torch_dtype, *dims, capability, bias=True, causal=True).values():
            assert (p.constexprs["BLOCK_M"], p.constexprs["BLOCK_N"], p.num_warps, p.num_stages) in base[1:]


def test_launchers_reject_head_dims_beyond_the_built_ones() -> None:
    assert max(max(d) for d in HEAD_DIMS) == MAX_HEAD_DIM
    for launch in (jvp_launch_params, bwd_launch_params):
        with pytest.raises(ValueError, match="head dim"):
            launch(aot.torch_dtype("bf16"), MAX_HEAD_DIM + 8, 64, (9, 0))


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_kernel_builds_and_fits_shared_memory(spec: aot.Spec, builds: dict[str, Any]) -> None:
    result = builds[spec.name]
    assert result["ok"], f"{spec.name}: {result['error']}"
    limit = SHARED_LIMIT[spec.arch]
    assert result["shared"] <= limit, f"{spec.name}: {result['shared']} B of shared memory > {limit} B"
