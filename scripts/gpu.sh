#!/usr/bin/env bash
# The GPU job, in one command on a machine with an NVIDIA GPU (nothing to download: it uses the torch,
# triton and pytest already there):
#   1. builds the CUDA kernels for this GPU (TORCH_CUDA_ARCH_LIST defaults to its compute capability);
#   2. runs every GPU test, once per GPU backend (cuda, triton), and records per op family which backend
#      passed in rlkernels/_gpu_validated.py (the auto backend for CUDA tensors prefers those);
#   3. runs the GPU benchmarks (returns/GAE, log-probs, PPO, Bellman) and writes
#      benchmarks/results/<gpu>-<date>.csv and .md (device, commit, date in every row), plus the logs.
# Usage: bash scripts/gpu.sh [OUT_DIR]   (default benchmarks/results; the device tool passes $OUT)
# Each step's exit status is recorded and the script goes on, so one failure still leaves the rest measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
STATUS="$OUT/gpu-status.txt"
: > "$STATUS"
step() {  # step NAME COMMAND...: runs it, logs to $OUT/NAME.log, records its exit status
  local name=$1
  shift
  local t0=$SECONDS
  echo "[$(date +%T)] $name"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$STATUS"
  tail -5 "$OUT/$name.log"
  return 0
}

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
export RLKERNELS_FORCE_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
step build "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
"$PYTHON" -c "import torch, rlkernels; print(torch.__version__, torch.cuda.get_device_name(), rlkernels.available_backends())" \
  | tee -a "$STATUS"

# GPU tests: the CUDA C++ kernels, then the Triton kernels on real hardware (CI only interprets them).
for backend in cuda triton; do
  if [ "$backend" = cuda ]; then
    returns_tests=(tests/test_cuda_returns.py -k "not test_triton_ops_match_cpu")
  else
    returns_tests=("tests/test_cuda_returns.py::test_triton_ops_match_cpu")
  fi
  RLKERNELS_GPU_TEST_BACKEND=$backend step "tests-$backend" "$PYTHON" -m pytest -q -p no:cacheprovider \
    --junitxml "$OUT/tests-$backend.xml" "${returns_tests[@]}" tests/test_cuda_bellman.py tests/test_cuda_logprobs_ppo.py
done
step record "$PYTHON" scripts/gpu_record.py "$OUT/tests-cuda.xml" "$OUT/tests-triton.xml"

# Benchmarks: every op family on the GPU, each backend side by side, against the baselines present here.
slug=$("$PYTHON" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
day=$(date +%F)
step bench-returns "$PYTHON" -m rlkernels.bench --device cuda --csv "$OUT/$slug-$day.csv"
step bench-bellman "$PYTHON" -m benchmarks.bench_bellman --device cuda --csv "$OUT/$slug-$day-bellman.csv"
cat "$STATUS"
