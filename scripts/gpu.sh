#!/usr/bin/env bash
# The GPU job, in one command on a machine with an NVIDIA GPU (nothing to download: it uses the torch,
# triton and pytest already there):
#   1. builds the CUDA kernels for this GPU (TORCH_CUDA_ARCH_LIST defaults to its compute capability);
#   2. runs every GPU test, once per GPU backend (cuda, then triton), and records per op family which backend
#      passed in rlkernels/_gpu_validated.py (the auto backend for CUDA tensors prefers those), after each run;
#   3. runs the benchmark engine (rlkernels-bench) on the GPU, every op family, Bellman first, writing
#      <gpu>-<date>.csv / .md / .png (device, commit, date in every row; the CSV is rewritten after each shape,
#      so a run stopped at the budget keeps what it measured);
#   4. runs the CUDA tests under compute-sanitizer, memcheck then racecheck (a report fails the step).
# Usage: bash scripts/gpu.sh [OUT_DIR]   (default benchmarks/results)
#
# For a time-boxed GPU session: the steps share a budget of GPU_BUDGET_S seconds (default 540, for a command
# limited to 10 minutes) in the order above, each under `timeout` for what is left, and a step the budget
# cannot start is recorded as skipped; the tests run on pytest-xdist workers when it is installed (Triton
# compiles each specialization on first launch, CPU-bound: ~900 of them). OUT_DIR gets few files:
# gpu-status.txt, _gpu_validated.py, the benchmark CSV and its markdown table, and gpu-logs.tar.gz (every log,
# the JUnit files and the plot).
# Each step's exit status is recorded and the script goes on, so one failure still leaves the rest measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-benchmarks/results}
BUDGET=${GPU_BUDGET_S:-540}
DEADLINE=$((SECONDS + BUDGET))
mkdir -p "$OUT"
WORK=$(mktemp -d -t rlkernels-gpu.XXXXXX)
STATUS="$OUT/gpu-status.txt"
: > "$STATUS"
step() {  # step NAME MIN_SECONDS COMMAND...: runs it under the budget left, logs to $WORK/NAME.log
  local name=$1 need=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$need" ]; then
    echo "$name skipped: ${left}s of the budget left, needs ${need}s" | tee -a "$STATUS"
    return 0
  fi
  local t0=$SECONDS
  echo "[$(date +%T)] $name (budget left ${left}s)"
  timeout --kill-after=10 "$left" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  [ "$rc" -eq 124 ] && rc="124 (stopped at the budget)"
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$STATUS"
  tail -5 "$WORK/$name.log"
  return 0
}

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
export RLKERNELS_FORCE_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
step build 60 "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
"$PYTHON" -c "import torch, triton, rlkernels; print(torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), rlkernels.available_backends())" \
  2>&1 | tee -a "$STATUS"

# GPU tests: the CUDA C++ kernels, then the Triton kernels on real hardware (CI only interprets them and
# compiles them ahead of time).
parallel=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then
  parallel=(-n "${GPU_TEST_WORKERS:-8}")
fi
for backend in cuda triton; do
  # Each family's module runs every backend; the marks pick one: cuda cases, or Triton cases on the GPU.
  if [ "$backend" = cuda ]; then marks="cuda and not triton"; else marks="cuda and triton"; fi
  step "tests-$backend" 60 "$PYTHON" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
    --junitxml "$WORK/tests-$backend.xml" -m "$marks" \
    tests/test_returns.py tests/test_bellman.py tests/test_logprobs.py tests/test_ppo.py tests/test_distributed.py
  step "record-$backend" 5 "$PYTHON" scripts/gpu_record.py "$WORK/tests-$backend.xml"
done

# Benchmarks: every op family on the GPU, each backend side by side, against the baselines present here.
slug=$("$PYTHON" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
day=$(date +%F)
step bench 60 "$PYTHON" -m rlkernels.bench --device cuda --ops bellman,returns,logprobs,ppo \
  --csv "$WORK/$slug-$day.csv"

# compute-sanitizer on the CUDA C++ kernels' tests: memcheck (out-of-bounds and misaligned accesses, API errors),
# then racecheck (shared-memory hazards); after the benchmarks, in what is left of the budget. A report fails the
# step (--error-exitcode).
cs=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$cs" ]; then
  for tool in memcheck racecheck; do
    step "sanitizer-$tool" 60 "$cs" --tool "$tool" --error-exitcode 99 --target-processes all \
      "$PYTHON" -m pytest -q -p no:cacheprovider -x -m "cuda and not triton" -k "not compile and not graph" \
      tests/test_returns.py tests/test_bellman.py tests/test_logprobs.py tests/test_ppo.py
  done
else
  echo "sanitizer skipped: compute-sanitizer not found" | tee -a "$STATUS"
fi

cp rlkernels/_gpu_validated.py "$OUT/" 2>/dev/null
for f in "$WORK/$slug-$day.csv" "$WORK/$slug-$day.md"; do
  [ -f "$f" ] && cp "$f" "$OUT/"
done
tar -czf "$OUT/gpu-logs.tar.gz" -C "$WORK" .
cat "$STATUS"
