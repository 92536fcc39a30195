#!/usr/bin/env bash
# Installs what rlkernels needs to build and test, then builds it in place (editable).
# Usage: bash scripts/setup.sh            (sourced by scripts/test.sh and scripts/bench.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# torch first: the extension is compiled against it, so the build runs without isolation.
"$PYTHON" -m pip install -q --disable-pip-version-check "torch>=2.6" numpy ninja "setuptools>=64" wheel
"$PYTHON" -m pip install -q --disable-pip-version-check \
    pytest hypothesis scipy triton torchrl stable-baselines3 gymnasium trl rich tqdm matplotlib

# CUDA kernels are compiled when torch has CUDA and nvcc is found (setup.py looks in /usr/local/cuda);
# RLKERNELS_SKIP_CUDA_BUILD=1 builds the CPU kernels only.
MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
"$PYTHON" -c "import rlkernels; print('rlkernels', rlkernels.__version__, 'backends:', rlkernels.available_backends())"
