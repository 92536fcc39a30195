"""rlkernels: fused CPU, CUDA and Triton kernels for the hot paths of reinforcement learning.

Every op is a ``torch.library`` custom op with autograd, validated against :mod:`rlkernels.reference`.
"""

import torch  # noqa: F401  (first: the compiled library links against libtorch)

from ._load import load_library as _load_library

_C = _load_library()  # loads the compiled kernels and registers the ops, or says which torch they need

from ._backend import BACKENDS, available_backends
from .bellman import bellman_backup, n_step_returns, q_targets, td_loss, value_iteration
from .logprobs import gather_logprobs
from .ppo import kl_penalty, ppo_policy_loss, value_loss
from .returns import discounted_returns, gae, linear_scan, vtrace

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "bellman_backup",
    "discounted_returns",
    "gae",
    "gather_logprobs",
    "kl_penalty",
    "linear_scan",
    "n_step_returns",
    "ppo_policy_loss",
    "q_targets",
    "td_loss",
    "value_iteration",
    "value_loss",
    "vtrace",
]
