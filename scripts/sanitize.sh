#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: a CPU-only build with
# -fsanitize=address,undefined in its own directory (the tree's build and library are left alone), then a test
# subset that walks every kernel path (every op, forward and backward, every layout and dtype the tests cover,
# the bad-input matrix) once per instruction set this CPU has (RLKERNELS_CPU_ISA). Any sanitizer report fails it.
# Triton is hidden from the tests: its libtriton trips ASan's __cxa_throw interceptor at import.
# Usage: bash scripts/sanitize.sh [pytest args]    (default: the subset below; SANITIZE_DIR, default build/sanitize)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dir=$(realpath -m "${SANITIZE_DIR:-build/sanitize}")
mkdir -p "$dir/tree"
start=$(date +%s)
# The sanitized library, built from this tree into $dir (ninja: only what changed is recompiled).
RLKERNELS_SANITIZE=1 RLKERNELS_SKIP_CUDA_BUILD=1 "$PYTHON" setup.py -q build_ext \
  --build-temp "$dir/temp" --build-lib "$dir/lib"
# A copy of the package and the tests beside it, so that the tree's own library is never the one imported.
rm -rf "$dir/tree/rlkernels" "$dir/tree/tests"
cp -r rlkernels tests pyproject.toml "$dir/tree/"
find "$dir/tree/rlkernels" -name '_C*.so' -delete
cp "$dir"/lib/rlkernels/_C*.so "$dir/tree/rlkernels/"
cp rlkernels/_build_info.py "$dir/tree/rlkernels/" 2>/dev/null || true
echo "sanitized build took $(( $(date +%s) - start )) s"
# A pytest plugin loaded before the conftest: `import triton` fails and find_spec("triton") is None.
mkdir -p "$dir/plugins"
echo 'import sys; sys.modules["triton"] = None  # hidden: libtriton trips ASan at import' > "$dir/plugins/_no_triton.py"
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$asan $ubsan"
# Python and torch leak by design at exit; the interpreter is not instrumented (no container overflow checks).
# pytest captures Python's output only (--capture=sys below): a report written to fd 2 before the process
# stops must reach the log.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_container_overflow=0:allocator_may_return_null=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$dir/plugins"
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
export TRITON_INTERPRET=1  # (tests/conftest.py would set it; Triton itself stays hidden)
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  tests=(tests/test_bad_inputs.py tests/test_errors.py tests/test_threads.py tests/test_reliability.py
         tests/test_returns.py tests/test_logprobs.py tests/test_ppo.py tests/test_bellman.py
         -k "not compile and not opcheck and not triton and not bench")
fi
isas=(default)
grep -qw avx2 /proc/cpuinfo && isas+=(avx2)
grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo && isas+=(avx512)
rc=0
# The copy's package, with the sanitized library, is the one imported (not an installed or editable rlkernels).
(cd "$dir/tree" && "$PYTHON" -c "import os, rlkernels, rlkernels._C as c; assert os.path.dirname(c.__file__) == \
os.path.join(os.getcwd(), 'rlkernels'), c.__file__; print('library:', c.__file__)")
for isa in "${isas[@]}"; do
  t0=$(date +%s)
  echo "== RLKERNELS_CPU_ISA=$isa"
  (cd "$dir/tree" && RLKERNELS_CPU_ISA=$isa "$PYTHON" -m pytest -q -p no:cacheprovider -p _no_triton -x \
    --capture=sys "${tests[@]}") \
    || rc=$?
  echo "== $isa: exit $rc, $(( $(date +%s) - t0 )) s"
  [ "$rc" -ne 0 ] && break
done
echo "sanitize finished in $(( $(date +%s) - start )) s"
exit "$rc"
