#!/usr/bin/env bash
# Sets up a fresh machine and prints the benchmark tables for the device present (CUDA if available, else
# CPU): the returns / log-prob / PPO table (python -m benchmarks.run, which writes benchmarks/results/
# <device>-<date>.csv, .md and .png; see python -m benchmarks.run --help for --sizes, --ops, ...), then the
# Bellman table (benchmarks/bench_bellman.py, written to benchmarks/results/<device>-<date>-bellman.csv;
# skipped with --sizes or RLKERNELS_BENCH_BELLMAN=0).
# Usage: bash scripts/bench.sh [--quick] [--sizes] [--device cpu|cuda] [other benchmarks.run options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
"$PYTHON" -m benchmarks.run "$@"

args=("$@")
bellman=()
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --quick) bellman+=(--quick) ;;
    --device) bellman+=(--device "${args[i + 1]:-}") ;;
    --device=*) bellman+=("${args[i]}") ;;
    --sizes) exit 0 ;;  # a size sweep of the returns ops only
  esac
done
if [[ ${RLKERNELS_BENCH_BELLMAN:-1} != 0 ]]; then
  "$PYTHON" -m benchmarks.bench_bellman "${bellman[@]}" --results-dir benchmarks/results
fi
