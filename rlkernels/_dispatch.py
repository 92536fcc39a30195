"""The table from (op, backend) to what runs it (docs/design.md §2).

``cpu`` and ``cuda`` run the C++ op ``rlkernels::<op>`` (the dispatcher picks the kernel by device);
``triton`` runs ``rlkernels::triton_<op>`` from the family's module under rlkernels/triton (imported on first
use, so the package imports without Triton); ``reference`` runs the NumPy function of rlkernels.reference.
The backend itself is chosen by rlkernels._backend.resolve.
"""

from __future__ import annotations

import torch

from . import _ops
from ._backend import resolve  # noqa: F401  (re-exported: the wrappers pick the backend and the kernel here)
from ._ops.logprobs import default_tiles  # noqa: F401  (linear_logprobs' chunk_size=None)

_FAMILY_OF = {op: family for family, ops in _ops.FAMILIES.items() for op in ops}


def _triton_module(family: str):
    # Plain import statements (not importlib): torch.compile traces them as lookups of loaded modules.
    if family == "returns":
        from .triton import returns as module
    elif family == "logprobs":
        from .triton import logprobs as module
    elif family == "ppo":
        from .triton import ppo as module
    else:
        from .triton import bellman as module
    return module


def kernel(op: str, impl: str):
    """The registered op that runs ``op`` on backend ``impl`` ("cpu", "cuda" or "triton")."""
    if impl == "triton":
        return getattr(_triton_module(_FAMILY_OF[op]), op)
    return getattr(torch.ops.rlkernels, op)


def reference(op: str):
    """The NumPy oracle of ``op``."""
    from . import reference as module

    return getattr(module, op)


def from_reference(array, device, dtype) -> torch.Tensor:
    """A reference result as a tensor in the accumulation dtype of ``dtype`` (docs/design.md §3)."""
    return torch.as_tensor(array, dtype=_ops._util.accumulate_dtype(dtype), device=device)
