#!/usr/bin/env bash
# The one script to run when a GPU is lent (about 5-7 minutes; each step has a time limit, 12 minutes in all):
#   1. the kernel tests on the compiled kernels (tests/kernels without the slow AOT build) and CUDA memory,
#   2. bench_attention_jvp.py --device cuda at N = 4096, head dims 64 and 128, bf16 (issue 4's GPU goal),
#      one JSON per head dim in OUT_DIR, next to the test log,
#   3. bench_train_step.py on CUDA (every recipe against a plain fine-tune step, CUDA peak memory; one process: NCCL
#      refuses two ranks on one device),
#   4. the NCCL + FSDP2 path: `torchrun --nproc_per_node 1 -m fewstep distill` of sCM with train.parallel = "fsdp"
#      and bf16 through FSDP2's MixedPrecisionPolicy, 20 steps (the JVP runs through the sharded student).
# Usage: benchmarks/gpu_check.sh OUT_DIR    (run from anywhere; PYTHON overrides the interpreter)
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: benchmarks/gpu_check.sh OUT_DIR" >&2
  exit 2
fi
out="$(mkdir -p "$1" && cd "$1" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python}"

if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh: no CUDA device visible to torch (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 1
fi
"$py" -c "import torch; print('gpu_check.sh:', torch.cuda.get_device_name(), 'torch', torch.__version__)"

export HF_HUB_OFFLINE=1
# every kernel test, not only the gpu-marked ones: on CUDA, tests/kernels/test_attention_triton.py runs its whole
# matrix (dtypes, bias, causal, padded head dims, d != dv, backward, torch.func.jvp through models) on the compiled
# kernels instead of the interpreter; the ahead-of-time build test (slow) already runs in CI
status=0
timeout 300 "$py" -m pytest -q -m "not slow" tests/kernels tests/bench/test_measure.py 2>&1 | tee "$out/pytest_gpu.log" \
  || status=$?

# the speed numbers even when a test failed, so that a short lease still measures something
for d in 64 128; do
  timeout 120 "$py" benchmarks/bench_attention_jvp.py --device cuda --sizes 4096 --head-dim "$d" --dtype bfloat16 \
    --out "$out/bench_attention_jvp_d$d.json" || status=$?
done
timeout 150 "$py" benchmarks/bench_train_step.py --nproc 0 --steps 5 --json "$out/bench_train_step.json" \
  2>&1 | tee "$out/bench_train_step.log" || status=$?
timeout 150 "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m fewstep distill --recipe scm \
  --output "$out/scm_fsdp_nccl" --no-bench --set train.parallel=fsdp --set train.mixed_precision=bf16 \
  --set train.max_steps=20 --set train.progress=false 2>&1 | tee "$out/scm_fsdp_nccl.log" || status=$?
if [[ $status -ne 0 ]]; then
  echo "gpu_check.sh: a step failed (exit $status); logs and results in $out" >&2
  exit "$status"
fi
echo "gpu_check.sh: all passed; results in $out"
