"""Drop-in adapters: each trainer's own function signature and conventions, computed by rlkernels.

One module per trainer; each is a thin translation of the trainer's arguments onto the rlkernels ops
(docs/design.md §4) and is tested against the trainer's own function (tests/test_integrations.py):

- :mod:`rlkernels.integrations.sb3`: ``RolloutBuffer`` (Stable-Baselines3), for ``PPO(..., rollout_buffer_class=...)``,
  and ``DQN``, SB3's DQN with its gradient steps on ``q_targets`` and ``td_loss``
- :mod:`rlkernels.integrations.torchrl`: TorchRL's value-estimator modules ``GAE``, ``TDLambdaEstimator``,
  ``VTrace`` and its ``objectives.value.functional`` estimators
- :mod:`rlkernels.integrations.cleanrl`: the GAE loop of CleanRL's ppo.py as ``compute_gae``, its update's
  losses and logged statistics as ``ppo_loss``, the update of dqn.py as ``dqn_loss``
- :mod:`rlkernels.integrations.verl`: verl's GAE, policy/value losses, KL penalty, log-probs and entropy
- :mod:`rlkernels.integrations.trl`: TRL's ``selective_log_softmax`` and ``add_fused_lm_head``
- :mod:`rlkernels.integrations.transformers`: per-token log-probs of a Hugging Face causal LM without its logits
  (``token_logprobs``)

The trainers are optional dependencies: importing this package imports none of them, and the submodules
are loaded on first attribute access (only ``sb3`` imports its trainer, since it subclasses SB3's classes;
``torchrl`` imports torchrl when one of its module classes is first accessed).
"""

from __future__ import annotations

import importlib

__all__ = ["cleanrl", "sb3", "torchrl", "transformers", "trl", "verl"]


def __getattr__(name):
    if name in __all__:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
