"""Stable-Baselines3 rollout buffers whose GAE runs on :func:`rlkernels.gae`.

``RolloutBuffer`` and ``DictRolloutBuffer`` subclass SB3's own and override only
``compute_returns_and_advantage(last_values, dones)``; use them as
``PPO("MlpPolicy", env, rollout_buffer_class=RolloutBuffer)`` (or A2C).

SB3's conventions, kept: the buffer holds ``[buffer_size, n_envs]`` float32 NumPy arrays; ``episode_starts[t]``
marks observation t as the first of an episode, so step t - 1 ended one (``terminated[t - 1]`` in rlkernels
terms); after the last step the buffer bootstraps from ``last_values`` unless ``dones``. Every episode end is a
termination here: SB3 handles time limits in the algorithm (``OnPolicyAlgorithm.collect_rollouts`` adds
gamma * V(terminal_observation) to the reward of a truncated step), not in the buffer. ``advantages`` are
written in place and ``returns = advantages + values`` (the TD(lambda) return), as SB3 does.
"""

from __future__ import annotations

import numpy as np
import torch
from stable_baselines3.common import buffers as _sb3_buffers

import rlkernels

__all__ = ["DictRolloutBuffer", "RolloutBuffer", "compute_returns_and_advantage"]

_OP = "rlkernels.integrations.sb3.RolloutBuffer.compute_returns_and_advantage"


def compute_returns_and_advantage(buffer, last_values, dones, *, backend=None):
    """Fill ``buffer.advantages`` and ``buffer.returns`` of a filled SB3 rollout buffer with rlkernels.gae."""
    if not isinstance(last_values, torch.Tensor):
        raise TypeError(f"{_OP}: last_values must be a torch.Tensor (one value per env), "
                        f"got {type(last_values).__name__}")
    T, n_envs = buffer.buffer_size, buffer.n_envs
    last_values = last_values.detach().to("cpu", torch.float32).reshape(-1)
    if last_values.numel() != n_envs:
        raise ValueError(f"{_OP}: last_values must hold one value per env ({n_envs}), got shape "
                         f"{tuple(last_values.shape)}")
    dones = np.asarray(dones)
    if dones.size != n_envs:
        raise ValueError(f"{_OP}: dones must hold one flag per env ({n_envs}), got shape {dones.shape}")
    terminated = np.empty((T, n_envs), dtype=bool)
    terminated[:-1] = buffer.episode_starts[1:] != 0
    terminated[-1] = dones.reshape(n_envs).astype(np.float32) != 0
    adv, _ = rlkernels.gae(torch.from_numpy(buffer.rewards), torch.from_numpy(buffer.values),
                           gamma=float(buffer.gamma), lam=float(buffer.gae_lambda),
                           terminated=torch.from_numpy(terminated), bootstrap_value=last_values, backend=backend)
    buffer.advantages[:] = adv.numpy()
    buffer.returns = buffer.advantages + buffer.values


class RolloutBuffer(_sb3_buffers.RolloutBuffer):
    """SB3's ``RolloutBuffer`` with the GAE of :func:`rlkernels.gae` (same results to float32 rounding)."""

    def compute_returns_and_advantage(self, last_values: torch.Tensor, dones: np.ndarray) -> None:
        compute_returns_and_advantage(self, last_values, dones)


class DictRolloutBuffer(_sb3_buffers.DictRolloutBuffer):
    """SB3's ``DictRolloutBuffer`` (dict observation spaces) with the GAE of :func:`rlkernels.gae`."""

    def compute_returns_and_advantage(self, last_values: torch.Tensor, dones: np.ndarray) -> None:
        compute_returns_and_advantage(self, last_values, dones)
