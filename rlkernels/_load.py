"""Loads the compiled library rlkernels._C, and says which torch it needs when that fails.

The library links against libtorch's C++ API, which has no stable ABI across torch releases: a wheel runs
only with the torch release it was built against (its metadata pins torch==X.Y.*). setup.py records that
release in rlkernels/_build_info.py; a build without that file (a copied library) skips the check.
"""

from __future__ import annotations

import importlib
import warnings

import torch


def build_info():
    """The module rlkernels._build_info (TORCH_VERSION, TORCH_RELEASE, WITH_CUDA, ...), or None."""
    try:
        return importlib.import_module("rlkernels._build_info")
    except ImportError:
        return None


def _release(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def load_library():
    info = build_info()
    running = torch.__version__
    mismatch = info is not None and _release(running) != info.TORCH_RELEASE
    try:
        library = importlib.import_module("rlkernels._C")
    except (ImportError, OSError) as exc:
        if info is None:
            raise
        needs = f"torch {info.TORCH_RELEASE}.x (built with {info.TORCH_VERSION}"
        needs += f", CUDA {info.TORCH_CUDA})" if info.WITH_CUDA else ", CPU kernels only)"
        hint = (
            f"this environment has torch {running}: install torch=={info.TORCH_RELEASE}.* or build rlkernels "
            "from source against this torch (pip install --no-build-isolation . in a checkout)"
            if mismatch
            else "the torch release matches, so the library itself is broken or incomplete: rebuild rlkernels"
        )
        raise ImportError(f"rlkernels' compiled library failed to load: {exc}\nIt needs {needs}; {hint}.") from exc
    if mismatch:
        warnings.warn(
            f"rlkernels was built against torch {info.TORCH_VERSION} and runs with torch {running}: the compiled "
            f"library has no stable ABI across torch releases; install torch=={info.TORCH_RELEASE}.*",
            RuntimeWarning,
            stacklevel=3,
        )
    return library
