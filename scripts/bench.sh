#!/usr/bin/env bash
# Sets up a fresh machine and prints the benchmark table for the device present (CUDA if available,
# else CPU); also writes benchmarks/results/<device>-<date>.csv, .md and .png (python -m benchmarks.run is
# the checkout's way to run rlkernels-bench; see python -m benchmarks.run --help for --sizes, --ops, ...).
# Usage: bash scripts/bench.sh [--quick] [--sizes] [--device cpu|cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
exec "$PYTHON" -m benchmarks.run "$@"
