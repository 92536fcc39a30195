"""The registered ops' Python side: fake kernels and autograd formulas, one module per family.

Each op is declared once in csrc/ops.cpp (``rlkernels::<name>``, with CPU and CUDA kernels) and, for the
Triton backend, once more as ``rlkernels::triton_<name>`` (rlkernels/triton/, same signature). Every autograd
formula is written here once, around the family's backward op, and registered for both: the C++ op gets it
at import of this package, the Triton op when its module registers it (``register(op, formula)``).
csrc/autograd.cpp holds only what every backward op shares (differentiable once; the in-place backward's
version bump).

Nothing here imports the public modules, the backend choice or the Triton kernels: this package is the
bottom of the Python layering (public wrappers -> _layout -> _dispatch -> ops).
"""

from __future__ import annotations

from .. import _C  # noqa: F401  (the schemas exist before their fake kernels and formulas join them)
from . import bellman, logprobs, ppo, returns

# family -> the ops of its public functions (the GPU test record and the backend choice are per family).
FAMILIES = {module.FAMILY: module.OPS for module in (returns, logprobs, ppo, bellman)}
