#!/usr/bin/env bash
# The one script to run when a GPU is lent (about 3-5 minutes; each step has a time limit, 9 minutes in all):
#   1. the GPU-marked tests (pytest -q -m gpu: the Triton kernels in bf16/fp16 against float64 math, CUDA memory),
#   2. bench_attention_jvp.py --device cuda at N = 4096, head dims 64 and 128, bf16 (issue 4's GPU goal),
#      one JSON per head dim in OUT_DIR, next to the test log.
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
timeout 300 "$py" -m pytest -q -m gpu tests 2>&1 | tee "$out/pytest_gpu.log"

for d in 64 128; do
  timeout 120 "$py" benchmarks/bench_attention_jvp.py --device cuda --sizes 4096 --head-dim "$d" --dtype bfloat16 \
    --out "$out/bench_attention_jvp_d$d.json"
done
echo "gpu_check.sh: all passed; results in $out"
