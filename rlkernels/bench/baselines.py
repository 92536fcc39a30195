"""The code users run today for returns and GAE, each as close to its source as a function allows.

Each ``*_gae`` / ``*_returns`` function below is the original algorithm in its original conventions
(argument names and flag encodings as in the project it comes from). The ``*_providers``
functions adapt one benchmark input to those conventions *outside* the timed region and return
zero-argument callables: only the call is timed, as a user would pay for it inside their trainer.

Conventions, mapped to rlkernels (docs/design.md §4.2, ``terminated[t]``: s_{t+1} is terminal):
- SB3 ``episode_starts[t]`` and CleanRL ``dones[t]`` mark obs t as the first of a new episode, so
  ``dones[t + 1] == terminated[t]``; ``next_done`` / ``dones`` of the final step is ``terminated[T - 1]``.
- TorchRL wants ``[*B, T, 1]`` tensors (time on dim -2) with ``next_state_value`` spelled out.
- verl works on ``[B, T]`` with a 0/1 ``response_mask`` and no bootstrap (the value after the end is 0).
- spinningup's lfilter discount_cumsum has no episode boundaries (one path at a time).

The SB3, CleanRL and verl algorithms are copied here (NumPy and torch only). The baselines that call a
third-party package (scipy's lfilter, TorchRL's vectorized estimators) are optional: when the package is
missing the provider is still listed, with ``call=None`` and a note saying what to install.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# The algorithms, as their projects write them.
# --------------------------------------------------------------------------------------------


def sb3_compute_returns_and_advantage(rewards, values, episode_starts, last_values, dones, gamma, gae_lambda):
    """stable_baselines3.common.buffers.RolloutBuffer.compute_returns_and_advantage (NumPy, float32)."""
    advantages = np.zeros_like(rewards)
    last_gae_lam = 0
    buffer_size = rewards.shape[0]
    for step in reversed(range(buffer_size)):
        if step == buffer_size - 1:
            next_non_terminal = 1.0 - dones.astype(np.float32)
            next_values = last_values
        else:
            next_non_terminal = 1.0 - episode_starts[step + 1]
            next_values = values[step + 1]
        delta = rewards[step] + gamma * next_values * next_non_terminal - values[step]
        last_gae_lam = delta + gamma * gae_lambda * next_non_terminal * last_gae_lam
        advantages[step] = last_gae_lam
    returns = advantages + values
    return advantages, returns


def discount_cumsum(x, discount):
    """rllab / spinningup ``core.discount_cumsum``: y_t = sum_k discount^k x_{t+k}, along axis 0."""
    import scipy.signal  # optional: the provider is skipped without scipy

    return scipy.signal.lfilter([1], [1, float(-discount)], x[::-1], axis=0)[::-1]


def spinningup_gae(rewards, values, last_value, gamma, lam):
    """spinningup's ``finish_path`` GAE-lambda, vectorized over envs on axis 1; no episode boundaries."""
    next_values = np.concatenate([values[1:], last_value[None]], axis=0)
    deltas = rewards + gamma * next_values - values
    advantages = discount_cumsum(deltas, gamma * lam)
    return advantages, advantages + values


def cleanrl_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda):
    """CleanRL ppo.py (torch, [T, B]): the GAE loop of the training step."""
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal = 1.0 - next_done
            nextvalues = next_value
        else:
            nextnonterminal = 1.0 - dones[t + 1]
            nextvalues = values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    returns = advantages + values
    return advantages, returns


def cleanrl_returns(rewards, dones, next_value, next_done, gamma):
    """CleanRL ppo.py's ``--gae False`` branch (torch, [T, B]): bootstrapped discounted returns."""
    num_steps = rewards.shape[0]
    returns = torch.zeros_like(rewards)
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal = 1.0 - next_done
            next_return = next_value
        else:
            nextnonterminal = 1.0 - dones[t + 1]
            next_return = returns[t + 1]
        returns[t] = rewards[t] + gamma * nextnonterminal * next_return
    return returns


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl ``core_algos.compute_gae_advantage_return`` ([B, T]), without its final masked_whiten."""
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        gen_len = token_level_rewards.shape[-1]
        for t in reversed(range(gen_len)):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
    return advantages, returns


def _torchrl_functional():
    from torchrl.objectives.value import functional  # imported late: torchrl is slow to import

    return functional


# --------------------------------------------------------------------------------------------
# Adapters: benchmark input -> zero-argument callables.
# --------------------------------------------------------------------------------------------


@dataclass
class Provider:
    """One baseline on one input: ``call()`` is timed; ``to_torch(out)`` maps its result to the
    benchmark layout for checking (untimed). ``note`` says where its semantics differ."""

    name: str
    call: Callable[[], object] | None  # None: skipped, ``note`` says why
    to_torch: Callable[[object], object] = lambda out: out
    note: str = ""
    comparable: bool = True  # same semantics as rlkernels on this input


TORCHRL_NOTE = "inputs made [B, T, 1] before timing"


DISABLED: set[str] = set()  # packages whose baselines are left out as if missing (--skip-baselines)


def missing(package: str) -> str | None:
    """None when ``package`` imports, else the note of a skipped provider."""
    if package in DISABLED:
        return f"skipped: {package} baselines left out (--skip-baselines)"
    if importlib.util.find_spec(package) is None:
        return f"skipped: {package} is not installed (pip install {package})"
    return None


def _skipped(name: str, package: str) -> Provider:
    return Provider(name, None, note=missing(package), comparable=False)


def _torchrl_layout(x: torch.Tensor) -> torch.Tensor:
    """[T, B] -> TorchRL's [B, T, 1] (time on dim -2), contiguous as a TensorDict would hold it."""
    return x.transpose(0, 1).unsqueeze(-1).contiguous()


def _cleanrl_flags(terminated: torch.Tensor, dtype):
    """rlkernels' terminated[t] -> CleanRL's (dones, next_done): dones[t + 1] = terminated[t]."""
    dones = torch.zeros(terminated.shape, dtype=dtype, device=terminated.device)
    dones[1:] = terminated[:-1].to(dtype)
    return dones, terminated[-1].to(dtype)


def _numpy_pair(out, device):
    return tuple(
        torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=torch.float32) for x in out
    )


def gae_providers(rewards, values, terminated, bootstrap_value, gamma, lam, *, numpy=True) -> list[Provider]:
    """Baselines for time-major GAE on ``[T, B]`` with per-step ``terminated`` flags."""
    device = rewards.device
    dones, next_done = _cleanrl_flags(terminated, rewards.dtype)
    providers = [
        Provider(
            "cleanrl loop",
            lambda: cleanrl_gae(rewards, values, dones, bootstrap_value, next_done, gamma, lam),
        )
    ]
    if numpy:
        r, v = rewards.cpu().numpy(), values.cpu().numpy()
        starts, last_v = dones.cpu().numpy(), bootstrap_value.cpu().numpy()
        last_done = next_done.cpu().numpy()
        providers += [
            Provider(
                "sb3 numpy loop",
                lambda: sb3_compute_returns_and_advantage(r, v, starts, last_v, last_done, gamma, lam),
                lambda out: _numpy_pair(out, device),
            ),
            Provider(
                "scipy lfilter",
                lambda: spinningup_gae(r, v, last_v, gamma, lam),
                lambda out: _numpy_pair(out, device),
                note="ignores terminated (spinningup: one episode per path)",
                comparable=False,
            )
            if not missing("scipy")
            else _skipped("scipy lfilter", "scipy"),
        ]
    if missing("torchrl"):
        return [*providers, _skipped("torchrl vec_gae", "torchrl")]
    F = _torchrl_functional()
    next_values = torch.cat([values[1:], bootstrap_value[None]])
    tv, tnv, tr, tterm = map(_torchrl_layout, (values, next_values, rewards, terminated))
    providers.append(
        Provider(
            "torchrl vec_gae",
            lambda: F.vec_generalized_advantage_estimate(gamma, lam, tv, tnv, tr, tterm, tterm),
            lambda out: tuple(x.squeeze(-1).transpose(0, 1) for x in out),
            note=TORCHRL_NOTE,
        )
    )
    return providers


def returns_providers(rewards, terminated, bootstrap_value, gamma, *, numpy=True) -> list[Provider]:
    """Baselines for time-major discounted returns on ``[T, B]``."""
    device = rewards.device
    dones, next_done = _cleanrl_flags(terminated, rewards.dtype)
    providers = [
        Provider("cleanrl loop", lambda: cleanrl_returns(rewards, dones, bootstrap_value, next_done, gamma))
    ]
    if numpy and missing("scipy"):
        providers.append(_skipped("scipy lfilter", "scipy"))
    elif numpy:
        r = rewards.cpu().numpy()
        providers.append(
            Provider(
                "scipy lfilter",
                lambda: discount_cumsum(r, gamma),
                lambda out: torch.from_numpy(out.copy()).to(device=device, dtype=torch.float32),
                note="ignores terminated and bootstrap",
                comparable=False,
            )
        )
    if missing("torchrl"):
        return [*providers, _skipped("torchrl vec_td1", "torchrl")]
    F = _torchrl_functional()
    next_values = torch.cat([torch.zeros_like(rewards[1:]), bootstrap_value[None]])  # read at done/end only
    tr, tterm, tnv = map(_torchrl_layout, (rewards, terminated, next_values))
    providers.append(
        Provider(
            "torchrl vec_td1",
            lambda: F.vec_td1_return_estimate(gamma, tnv, tr, tterm, tterm),
            lambda out: out.squeeze(-1).transpose(0, 1),
            note=TORCHRL_NOTE,
        )
    )
    return providers


def masked_gae_providers(rewards, values, mask, gamma, lam) -> list[Provider]:
    """Baselines for token-level GAE on ``[B, T]`` with a 0/1 mask (verl). verl leaves carries at
    masked positions where rlkernels writes 0, so outputs are compared times the mask."""
    fmask = mask.to(rewards.dtype)  # verl multiplies by the mask, so it holds it as a number
    return [
        Provider(
            "verl loop",
            lambda: verl_gae(rewards, values, fmask, gamma, lam),
            lambda out: tuple(x * fmask for x in out),
        )
    ]


# --------------------------------------------------------------------------------------------
# LLM RL: log-probs of the sampled tokens and the PPO policy loss.
# --------------------------------------------------------------------------------------------


def torch_logprobs(logits, tokens):
    """verl/OpenRLHF: log_softmax over the vocabulary, then gather the tokens' entries."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def trl_selective_log_softmax(logits, tokens):
    """TRL's selective_log_softmax for fp32: gather, then logsumexp one row at a time (no [N, V] log_softmax)."""
    selected = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])


def logprobs_providers(logits, tokens) -> list[Provider]:
    return [
        Provider("torch log_softmax+gather", lambda: torch_logprobs(logits, tokens)),
        Provider("trl selective_log_softmax", lambda: trl_selective_log_softmax(logits, tokens)),
    ]


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def verl_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0):
    """verl's compute_policy_loss (token-mean, dual clip) in eager torch ops, every statistic as a tensor."""
    m = mask.to(logp.dtype)
    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(losses1, losses2)
    losses3 = -advantages * dual_clip
    losses = torch.where(advantages < 0, torch.minimum(losses3, clipped), clipped)
    stats = {
        "clipfrac": _masked_mean(torch.gt(losses2, losses1).float(), m),
        "clipfrac_lower": _masked_mean(torch.gt(clipped, losses3).float() * (advantages < 0).float(), m),
        "approx_kl": _masked_mean(-log_ratio, m),
        "ratio_mean": _masked_mean(ratio, m),
        "ratio_max": torch.where(mask, ratio, torch.zeros_like(ratio)).max(),
    }
    return _masked_mean(losses, m), stats


def ppo_providers(logp, old_logp, advantages, mask, **clip) -> list[Provider]:
    """The forward of the PPO policy loss with its statistics; outputs compared on the loss."""
    return [Provider("verl eager", lambda: verl_policy_loss(logp, old_logp, advantages, mask, **clip), lambda out: out[0])]
