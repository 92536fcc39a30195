"""CleanRL's inner loops as calls: the GAE loop of ppo.py (``compute_gae``), the losses and logged statistics of
its update (``ppo_loss``) and the TD update of dqn.py (``dqn_loss``).

CleanRL's conventions (ppo.py, ppo_atari.py, ppo_continuous_action.py): rollout tensors are ``[num_steps,
num_envs]`` (time first; any further dims are more environments); ``dones[t]`` is the done flag stored with
observation t, i.e. the outcome of step t - 1 (``next_done`` returned by the env step before t), so step t's own
outcome is ``dones[t + 1]``, and ``next_done`` for the last step; ``next_value`` is V(next_obs) after the rollout
(CleanRL's ``agent.get_value(next_obs).reshape(1, -1)``: ``[1, num_envs]`` or ``[num_envs]``). Every done is
treated as terminal (no bootstrap), exactly as the loop does. Flags may be float 0/1 (as CleanRL stores them),
bool or integer tensors.

In rlkernels terms (docs/design.md §4.2): ``terminated = cat(dones[1:], next_done)``, ``bootstrap_value =
next_value``. This module does not import CleanRL (it is a collection of scripts, not a package).
"""

from __future__ import annotations

import torch

import rlkernels

from .. import _checks as checks
from ._util import scalar

__all__ = ["compute_gae", "dqn_loss", "ppo_loss"]

_OP = "integrations.cleanrl.compute_gae"


def compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda, *, backend=None):
    """Returns (advantages, returns) exactly as CleanRL's loop:

    nextnonterminal = 1 - (next_done if t is the last step else dones[t + 1]);
    nextvalues = next_value if t is the last step else values[t + 1];
    delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t];
    advantages[t] = delta + gamma * gae_lambda * nextnonterminal * advantages[t + 1];  returns = advantages + values.

    Differentiable in rewards, values and next_value.
    """
    where = f"rlkernels.{_OP}"
    gamma = scalar(where, "gamma", gamma)
    gae_lambda = scalar(where, "gae_lambda", gae_lambda)
    for name, x in (("gamma", gamma), ("gae_lambda", gae_lambda)):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{where}: {name} must be in [0, 1], got {x}")
    checks.float_tensor(_OP, "rewards", rewards)
    checks.float_tensor(_OP, "values", values)
    checks.float_tensor(_OP, "next_value", next_value)
    dones = checks.flag_tensor(_OP, "dones", checks.tensor(_OP, "dones", dones))
    next_done = checks.flag_tensor(_OP, "next_done", checks.tensor(_OP, "next_done", next_done))
    if rewards.dim() == 0:
        raise ValueError(f"{where}: rewards must be [num_steps, num_envs], got a 0-d tensor")
    checks.same_shape(_OP, "rewards", rewards, values=values, dones=dones)
    env_shape = tuple(rewards.shape[1:])
    for name, x in (("next_value", next_value), ("next_done", next_done)):
        if tuple(x.shape) not in (env_shape, (1,) + env_shape):
            raise ValueError(f"{where}: {name} must hold one entry per environment, shape {env_shape} or "
                             f"{(1,) + env_shape}, got {tuple(x.shape)}")
    checks.same_device(_OP, "rewards", rewards, values=values, dones=dones, next_value=next_value,
                       next_done=next_done)
    if rewards.shape[0] == 0:  # an empty rollout: empty results
        terminated = dones
    else:
        terminated = torch.cat([dones[1:], next_done.reshape((1,) + env_shape)])
    return rlkernels.gae(rewards, values, gamma=gamma, lam=gae_lambda, terminated=terminated,
                         bootstrap_value=next_value.reshape(env_shape), backend=backend)


_DQN = "integrations.cleanrl.dqn_loss"


def dqn_loss(q_values, actions, next_q_values, rewards, dones, gamma, *, backend=None):
    """Returns (loss, old_val) as CleanRL's dqn.py (and dqn_atari.py) compute them:

    with torch.no_grad():
        target_max, _ = next_q_values.max(dim=1)            # next_q_values = target_network(next_observations)
        td_target = rewards.flatten() + gamma * target_max * (1 - dones.flatten())
    old_val = q_values.gather(1, actions).squeeze()        # q_values = q_network(observations)
    loss = F.mse_loss(td_target, old_val)

    here as :func:`rlkernels.q_targets` (kind "max"; a done transition's target is its reward) and
    :func:`rlkernels.td_loss` (squared error, mean, the gather fused in). ``q_values`` and ``next_q_values`` are
    ``[B, A]``; ``actions`` (integers), ``rewards`` and ``dones`` (float 0/1, bool or integer flags) hold one
    entry per transition, ``[B, 1]`` as CleanRL's replay buffer returns them, or ``[B]``. Differentiable in
    ``q_values`` only (no gradient reaches the targets, as under CleanRL's no_grad). ``old_val`` (``[B]``) is
    detached: CleanRL only logs it.
    """
    where = f"rlkernels.{_DQN}"
    gamma = scalar(where, "gamma", gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"{where}: gamma must be in [0, 1], got {gamma}")
    checks.float_tensor(_DQN, "q_values", q_values)
    checks.float_tensor(_DQN, "next_q_values", next_q_values)
    checks.float_tensor(_DQN, "rewards", rewards)
    checks.tensor(_DQN, "actions", actions)
    dones = checks.flag_tensor(_DQN, "dones", checks.tensor(_DQN, "dones", dones))
    if q_values.dim() != 2:
        raise ValueError(f"{where}: q_values must be [B, A], got shape {tuple(q_values.shape)}")
    checks.same_shape(_DQN, "q_values", q_values, next_q_values=next_q_values)
    B = q_values.shape[0]
    for name, x in (("actions", actions), ("rewards", rewards), ("dones", dones)):
        if tuple(x.shape) not in ((B,), (B, 1)):
            raise ValueError(f"{where}: {name} must hold one entry per transition, shape ({B}, 1) or ({B},), "
                             f"got {tuple(x.shape)}")
    checks.same_device(_DQN, "q_values", q_values, actions=actions, next_q_values=next_q_values, rewards=rewards,
                       dones=dones)
    actions = actions.reshape(B)
    td_target = rlkernels.q_targets(rewards.detach().reshape(B), next_q_values.detach(), terminated=dones.reshape(B),
                                    gamma=gamma, kind="max", backend=backend)
    loss, _ = rlkernels.td_loss(q_values, actions, td_target, loss="squared", reduction="mean", backend=backend)
    old_val = q_values.detach().gather(1, actions.reshape(B, 1).long()).squeeze(1)  # (td_loss checked actions)
    return loss, old_val


_PPO = "integrations.cleanrl.ppo_loss"


def ppo_loss(newlogprob, logprobs, advantages, newvalue, values, returns, clip_coef, *, norm_adv=True,
             clip_vloss=True, backend=None):
    """Returns (pg_loss, v_loss, stats) of one minibatch as CleanRL's ppo.py computes and logs them:

    logratio = newlogprob - logprobs; ratio = logratio.exp()
    stats["old_approx_kl"] = (-logratio).mean()                     # k1
    stats["approx_kl"] = ((ratio - 1) - logratio).mean()            # k3: what --target-kl compares
    stats["clipfrac"] = ((ratio - 1.0).abs() > clip_coef).float().mean()
    advantages normalized (mean, std + 1e-8) if norm_adv;
    pg_loss = max(-A ratio, -A clamp(ratio, 1 - clip_coef, 1 + clip_coef)).mean()
    v_loss = 0.5 * max((newvalue - returns)^2, (values + clamp(newvalue - values, -clip_coef, clip_coef)
             - returns)^2).mean()   (without clip_vloss: 0.5 * ((newvalue - returns)^2).mean())

    CleanRL's names: ``logprobs``, ``advantages``, ``values``, ``returns`` are the minibatch's slices of
    ``b_logprobs``, ``b_advantages``, ``b_values``, ``b_returns``; ``newlogprob`` and ``newvalue`` the agent's outputs.
    The losses are :func:`rlkernels.ppo_policy_loss` and :func:`rlkernels.value_loss` (token-mean over the 1-D
    minibatch); differentiable in ``newlogprob`` and ``newvalue``. The stats are 0-d tensors under CleanRL's
    names and definitions, not the core op's: CleanRL's ``clipfrac`` counts every ratio outside the clip range,
    the op's only those where clipping changes the loss (the clip binds on the side the advantage's sign
    selects), and CleanRL's ``approx_kl`` is the k3 estimator where the op's is k1 (CleanRL's ``old_approx_kl``).
    Feeding the op's stats to CleanRL's ``--target-kl`` early stop would change training. The ratio of the losses
    is clamped to exp(+-20) (docs/design.md §4.4), CleanRL's is not: equal unless |logratio| > 20.
    """
    where = f"rlkernels.{_PPO}"
    clip_coef = scalar(where, "clip_coef", clip_coef)
    if not clip_coef >= 0.0:
        raise ValueError(f"{where}: clip_coef must be >= 0, got {clip_coef}")
    for name, x in (("newlogprob", newlogprob), ("logprobs", logprobs), ("advantages", advantages),
                    ("newvalue", newvalue), ("values", values), ("returns", returns)):
        checks.float_tensor(_PPO, name, x)
    if newlogprob.dim() != 1:
        raise ValueError(f"{where}: newlogprob must be a 1-D minibatch, got shape {tuple(newlogprob.shape)}")
    checks.same_shape(_PPO, "newlogprob", newlogprob, logprobs=logprobs, advantages=advantages, values=values,
                      returns=returns)
    if newvalue.numel() != newlogprob.numel():
        raise ValueError(f"{where}: newvalue must hold one value per sample ({newlogprob.numel()}; CleanRL views it "
                         f"as [-1]), got shape {tuple(newvalue.shape)}")
    checks.same_device(_PPO, "newlogprob", newlogprob, logprobs=logprobs, advantages=advantages, newvalue=newvalue,
                       values=values, returns=returns)
    with torch.no_grad():
        logratio = newlogprob.detach() - logprobs
        ratio = logratio.exp()
        stats = {"old_approx_kl": (-logratio).mean(), "approx_kl": ((ratio - 1) - logratio).mean(),
                 "clipfrac": ((ratio - 1.0).abs() > clip_coef).float().mean()}
    if norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss, _ = rlkernels.ppo_policy_loss(newlogprob, logprobs, advantages, clip_low=clip_coef, backend=backend)
    v_loss, _ = rlkernels.value_loss(newvalue.reshape(-1), values, returns, clip=clip_coef if clip_vloss else None,
                                     backend=backend)
    return pg_loss, v_loss, stats
