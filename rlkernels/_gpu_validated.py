"""Which GPU backend passed its GPU tests on real hardware, per op family.

Written by ``scripts/gpu.sh`` from the GPU test results (edit only by rerunning it on a GPU machine). The
auto backend for CUDA tensors (``backend=None``) prefers, for each family, a backend recorded here as passed;
a backend recorded as failed comes last; with no record it prefers Triton, whose kernels CI at least runs
through the interpreter, over CUDA C++ kernels that CI only compiles.

family -> backend -> {"passed": bool, "device": str, "date": str, "commit": str, "tests": int, "failed": int}
"""

VALIDATED: dict[str, dict[str, dict]] = {}
