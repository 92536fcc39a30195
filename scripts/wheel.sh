#!/usr/bin/env bash
# Builds the rlkernels wheel into dist/ and smoke-tests it in a fresh virtual environment
# (python -m venv; pip install torch numpy; pip install the wheel; python scripts/wheel_smoke.py).
# Usage: bash scripts/wheel.sh [--no-smoke]
# Environment: PYTHON (python3), MAX_JOBS (2), RLKERNELS_SKIP_CUDA_BUILD=1 (a CPU-only wheel),
#   TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX), WHEEL_DIR (dist), KEEP_VENV=1 (keep the venv, path printed).
# Builds in this tree without build isolation, against the torch installed here (scripts/setup.sh installs it):
# the objects in build/temp.* of an earlier build of the tree (pip install -e . included) are reused, so after
# scripts/test.sh this only links and packs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-dist}

# build/lib.* and build/bdist.* may hold modules of an older tree that would be packed again; keep build/temp.*
rm -rf build/lib.* build/bdist.* "$WHEEL_DIR"/rlkernels-*.whl
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
    -w "$WHEEL_DIR" .
wheel=$(cd "$WHEEL_DIR" && echo "$PWD"/rlkernels-*.whl)
echo "built $wheel ($(du -k "$wheel" | cut -f1) KiB) in $(( $(date +%s) - start )) s"
"$PYTHON" -m zipfile -l "$wheel"
[ "${1:-}" = "--no-smoke" ] && exit 0

start=$(date +%s)
venv=$(mktemp -d "${TMPDIR:-/tmp}/rlkernels-wheel-venv.XXXXXX")
[ "${KEEP_VENV:-0}" = 1 ] || trap 'rm -rf "$venv"' EXIT
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check torch numpy
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"  # resolves its torch pin
echo "venv ready in $(( $(date +%s) - start )) s: $venv"
# from outside the checkout, so that "import rlkernels" can only find the installed wheel
(cd "$venv" && "$venv/bin/python" "$OLDPWD/scripts/wheel_smoke.py" "$wheel")
"$venv/bin/rlkernels-bench" --help > /dev/null
echo "wheel smoke test passed"
