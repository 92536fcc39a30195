"""rlkernels: fused CPU, CUDA and Triton kernels for the hot paths of reinforcement learning.

Every op is a ``torch.library`` custom op with autograd, validated against :mod:`rlkernels.reference`.
"""

import torch  # noqa: F401  (first: the compiled library links against libtorch)

from ._load import load_library as _load_library

_C = _load_library()  # loads the compiled kernels and registers the ops, or says which torch they need

from . import bellman, logprobs, ppo, returns
from ._backend import BACKENDS, available_backends
from .bellman import *
from .logprobs import *
from .ppo import *
from .returns import *

__version__ = "0.1.0"

__all__ = [  # noqa: PLE0604  (the families' lists)
    "BACKENDS", "available_backends", *returns.__all__, *logprobs.__all__, *ppo.__all__, *bellman.__all__
]
