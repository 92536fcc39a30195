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
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
