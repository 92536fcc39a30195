#!/usr/bin/env bash
# Sets up a fresh machine, then prints the benchmark table of every op family for the device present (CUDA if
# available, else CPU) and writes it to benchmarks/results/<device>-<date>.csv, .md and .png.
# Usage: bash scripts/bench.sh [rlkernels-bench options: --quick, --sizes, --ops, --device, --cache, ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
exec "$PYTHON" -m rlkernels.bench --results-dir benchmarks/results "$@"
