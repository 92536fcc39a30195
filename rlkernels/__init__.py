"""rlkernels: fused CPU, CUDA and Triton kernels for the hot paths of reinforcement learning.

Every op is a ``torch.library`` custom op with autograd, validated against :mod:`rlkernels.reference`.
"""

from . import _C  # noqa: F401  (loads the compiled kernels and registers the ops)
from ._backend import BACKENDS, available_backends
from .logprobs import gather_logprobs
from .returns import discounted_returns, gae, linear_scan, vtrace

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "discounted_returns",
    "gae",
    "gather_logprobs",
    "linear_scan",
    "vtrace",
]
