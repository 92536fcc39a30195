"""Backend selection (docs/design.md §2).

Each public function takes ``backend=None | "cpu" | "cuda" | "triton" | "reference"``. ``None`` means the
environment variable ``RLKERNELS_BACKEND`` if set, else ``cpu`` for CPU tensors and the preferred GPU
backend for CUDA tensors. A backend that is asked for and cannot run raises a RuntimeError saying why and
how to get it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ._ops import FAMILIES

BACKENDS = ("cpu", "cuda", "triton", "reference")
_ENV = "RLKERNELS_BACKEND"
# The GPU backends for CUDA tensors when none is asked for, before the GPU test record is consulted
# (rlkernels/_gpu_validated.py, written by scripts/gpu.sh): a backend whose GPU tests passed on real hardware
# goes first, one whose tests failed goes last. Without a record Triton goes first: CI runs its kernels
# through the interpreter, while the CUDA C++ kernels are only compiled there.
_PREFERRED_GPU_BACKENDS = ("triton", "cuda")

# Op -> family of the GPU test record (each family's ops are listed in rlkernels/_ops/<family>.py).
_FAMILY_OF = {op: family for family, ops in FAMILIES.items() for op in ops}


@functools.cache
def gpu_backend_order(op: str) -> tuple[str, ...]:
    """The GPU backends in the order the auto choice tries them for ``op`` (see _PREFERRED_GPU_BACKENDS)."""
    from ._gpu_validated import VALIDATED

    record = VALIDATED.get(_FAMILY_OF.get(op, ""), {})

    def rank(backend):
        passed = record.get(backend, {}).get("passed")
        return 0 if passed is True else (2 if passed is False else 1)

    return tuple(sorted(_PREFERRED_GPU_BACKENDS, key=lambda b: (rank(b), _PREFERRED_GPU_BACKENDS.index(b))))


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rlkernels::{op}", dispatch_key)


# What this install has, read once at import (rlkernels/__init__.py loads the compiled library first): which
# ops have a CUDA C++ kernel, whether Triton is installed, and the GPU backend order per op. The functions below
# return these constants, so torch.compile traces through backend selection with fullgraph=True on every torch
# release: torch 2.11's dynamo traced into the cached functions that queried them at call time and failed there
# ("torch.* op returned non-Tensor" for the dispatcher query, "function marked as skipped" for find_spec).
def _ops_with_cuda_kernels() -> frozenset[str]:
    from . import _C  # noqa: F401  (registers the ops)

    return frozenset(op for op in _FAMILY_OF if _has_kernel(op, "CUDA"))


_CUDA_OPS = _ops_with_cuda_kernels()
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_GPU_ORDER = {op: gpu_backend_order(op) for op in _FAMILY_OF}


def _cuda_kernels_built() -> bool:
    return "gae" in _CUDA_OPS


def _op_has_cuda_kernel(op: str) -> bool:
    return op in _CUDA_OPS


def _gpu_order(op: str) -> tuple[str, ...]:
    order = _GPU_ORDER.get(op)
    return order if order is not None else _PREFERRED_GPU_BACKENDS


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """The backends that are built and usable on this machine, in the order of ``BACKENDS``."""
    out = ["cpu"]
    if _cuda_kernels_built() and torch.cuda.is_available():
        out.append("cuda")
    if _triton_installed() and (torch.cuda.is_available() or triton_interpret()):
        out.append("triton")
    out.append("reference")
    return out


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got tensors on {device}; pass backend=None or move them"
        return None
    if backend == "cuda":
        if not _cuda_kernels_built():
            return "rlkernels was built without CUDA kernels; reinstall with nvcc on PATH and a CUDA build of torch"
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got tensors on {device}"
        return None
    if backend == "triton":
        if not _triton_installed():
            return "the triton backend needs the `triton` package: pip install triton"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"the triton backend runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got {device}"
    if backend == "reference":
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """The backend that runs ``op`` on tensors of ``device``."""
    if backend is None:
        backend = os.environ.get(_ENV) or None
    if backend is None:
        if device.type == "cuda":
            for candidate in _gpu_order(op):
                if candidate == "cuda" and not _op_has_cuda_kernel(op):
                    continue  # ops without a CUDA C++ kernel yet are served by Triton
                if _why_unavailable(candidate, device) is None:
                    return candidate
            raise RuntimeError(
                f"rlkernels.{op}: no GPU backend is available for CUDA tensors: "
                + "; ".join(_why_unavailable(b, device) for b in _PREFERRED_GPU_BACKENDS)
            )
        # Meta tensors (shape inference, torch.device("meta") model init) take the C++ ops, whose fake kernels
        # give the outputs' shapes and dtypes; the NumPy reference cannot read them.
        return "cpu" if device.type in ("cpu", "meta") else "reference"
    if not isinstance(backend, str):
        raise TypeError(f"rlkernels.{op}: backend must be a string or None, got {type(backend).__name__}")
    why = _why_unavailable(backend, device)
    if why is None and backend == "cuda" and not _op_has_cuda_kernel(op):
        why = "this op has no CUDA C++ kernel yet; use backend='triton' (pip install triton)"
    if why is not None:
        raise RuntimeError(f"rlkernels.{op}: backend={backend!r} is not available: {why}")
    return backend
