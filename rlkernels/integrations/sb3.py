"""Stable-Baselines3 with rlkernels: rollout buffers whose GAE runs on :func:`rlkernels.gae`, and a DQN whose
gradient steps run on :func:`rlkernels.q_targets` and :func:`rlkernels.td_loss`.

``RolloutBuffer`` and ``DictRolloutBuffer`` subclass SB3's own and override only
``compute_returns_and_advantage(last_values, dones)``; use them as
``PPO("MlpPolicy", env, rollout_buffer_class=RolloutBuffer)`` (or A2C). ``DQN`` subclasses SB3's ``DQN`` and
overrides only ``train``: ``DQN("MlpPolicy", env, ...)`` with the same arguments; see its docstring.

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
from stable_baselines3 import DQN as _SB3DQN
from stable_baselines3.common import buffers as _sb3_buffers

import rlkernels

__all__ = ["DQN", "DictRolloutBuffer", "RolloutBuffer", "compute_returns_and_advantage", "dqn_targets"]

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


def dqn_targets(rewards, next_q, dones, discounts, *, backend=None):
    """SB3 DQN's targets ``rewards + (1 - dones) * discounts * max_a next_q``, shaped ``[B, 1]`` as SB3's.

    ``rewards`` and ``dones`` are SB3's ``[B, 1]`` float columns (``dones`` already excludes time-limit
    truncations: the replay buffer's ``handle_timeout_termination``), ``next_q`` the target network's
    ``[B, A]``, ``discounts`` gamma (a float) or the n-step buffer's per-sample ``[B, 1]`` discounts. A done
    transition's target is its reward alone (SB3's product gives that too, unless the target network's
    values are infinite or NaN, where 0 * inf would be NaN).
    """
    where = "rlkernels.integrations.sb3.dqn_targets"
    B = next_q.shape[0] if next_q.dim() == 2 else -1
    for name, x in (("rewards", rewards), ("dones", dones)):
        if not isinstance(x, torch.Tensor) or x.numel() != B:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where}: {name} must be a [B, 1] tensor with B = next_q.shape[0] ({B}), got {got}")
    terminated = dones.reshape(-1) != 0
    if isinstance(discounts, torch.Tensor):
        if discounts.numel() != B:
            raise ValueError(f"{where}: discounts must be a float or a [B, 1] tensor, got {tuple(discounts.shape)}")
        # Per-sample discounts (n-step): (1 - done) * max first, then the discount, as SB3 multiplies them.
        v = rlkernels.q_targets(torch.zeros_like(rewards.reshape(-1)), next_q, terminated=terminated, gamma=1.0,
                                kind="max", backend=backend)
        return rewards + discounts * v.reshape(-1, 1)
    y = rlkernels.q_targets(rewards.reshape(-1), next_q, terminated=terminated, gamma=float(discounts), kind="max",
                            backend=backend)
    return y.reshape(-1, 1)


class DQN(_SB3DQN):
    """SB3's ``DQN`` whose gradient steps compute the targets with :func:`rlkernels.q_targets` (kind "max") and
    the Huber loss with :func:`rlkernels.td_loss` (SB3's ``smooth_l1_loss``, delta 1, mean), the gather of
    Q(s, a) fused into it; everything else (sampling, gradient clipping, optimizer, target updates,
    exploration, logging) is SB3's. The same model as SB3's to float32 rounding; the loss is logged as SB3
    logs it (the mean of the gradient steps' losses), read from the device once per ``train`` call instead
    of once per gradient step (SB3's ``loss.item()`` is a host synchronization per step on a GPU).

    Speed: on CPU at SB3's default sizes a gradient step is sampling, the two networks and the optimizer; the
    targets and loss are a small part of it, so a step takes about as long as SB3's (docs/performance.md).
    The adapter is for exactness and for dropping the per-step sync, not CPU speed.
    """

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        losses = []
        for _ in range(gradient_steps):
            replay_data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)
            discounts = getattr(replay_data, "discounts", None)
            with torch.no_grad():
                targets = dqn_targets(replay_data.rewards, self.q_net_target(replay_data.next_observations),
                                      replay_data.dones, discounts if discounts is not None else self.gamma)
            q = self.q_net(replay_data.observations)
            loss, _ = rlkernels.td_loss(q, replay_data.actions.long().reshape(-1), targets.reshape(-1),
                                        loss="huber", delta=1.0)
            losses.append(loss.detach())
            self.policy.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            self.policy.optimizer.step()
        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        if losses:
            self.logger.record("train/loss", float(torch.stack(losses).double().mean()))
