#!/usr/bin/env bash
# Sets up a fresh machine and runs the test suite. Triton kernels run on the CPU through the
# interpreter (TRITON_INTERPRET=1); CUDA tests are skipped without a GPU.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
export TRITON_INTERPRET=1
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
# The tests record every Triton launch they interpret (tests/conftest.py); each recorded specialization is
# then compiled for sm_90 and sm_80 (scripts/triton_aot.py: Triton's compiler and ptxas, no GPU needed), so a
# kernel the interpreter runs but the compiler rejects fails here too.
launches=$(mktemp -t rlkernels-triton-launches.XXXXXX)
trap 'rm -f "$launches"' EXIT
set +e
RLKERNELS_TRITON_LAUNCHES=$launches "$PYTHON" -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
if [ "$rc" -eq 0 ] && [ -s "$launches" ] && "$PYTHON" -c "import triton" 2>/dev/null; then
  # (With a test selection given, one without Triton tests records nothing, which is then not an error.)
  "$PYTHON" scripts/triton_aot.py --records "$launches" ${1:+--allow-empty} || rc=$?
fi
exit "$rc"
