#!/usr/bin/env bash
# Sets up a fresh machine and prints the benchmark table for the device present (CUDA if available,
# else CPU); also writes benchmarks/results/<device>-<date>.csv and .md.
# Usage: bash scripts/bench.sh [--quick] [--device cpu|cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
exec "$PYTHON" -m benchmarks.run "$@"
