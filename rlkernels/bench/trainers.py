"""The trainers' own code for the estimators and losses rlkernels replaces, transcribed (NumPy and torch only).

One copy of each, shared by the benchmark baselines (rlkernels/bench/baselines.py) and the tests that check
rlkernels against the trainers whose code cannot be imported here: CleanRL is scripts, not a package; verl
needs ray and its configs to import; SB3's and spinningup's functions live inside classes and closures. Each
function keeps its source's argument names, flag encodings and arithmetic order; its docstring names the
trainer, the version and the function it transcribes. Mapping those conventions onto rlkernels' is the
caller's job (docs/design.md §4.2).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Returns and GAE on rollouts
# ----------------------------------------------------------------------------------------------------


def sb3_compute_returns_and_advantage(rewards, values, episode_starts, last_values, dones, gamma, gae_lambda):
    """Stable-Baselines3 2.x, common/buffers.py RolloutBuffer.compute_returns_and_advantage (NumPy arrays)."""
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


def spinningup_discount_cumsum(x, discount):
    """SpinningUp 0.2, algos/pytorch/ppo/core.py discount_cumsum (from rllab), along axis 0; needs scipy."""
    import scipy.signal  # optional: callers list the baseline as skipped without scipy

    return scipy.signal.lfilter([1], [1, float(-discount)], x[::-1], axis=0)[::-1]


def spinningup_gae(rewards, values, last_value, gamma, lam):
    """SpinningUp 0.2, algos/pytorch/ppo/ppo.py PPOBuffer.finish_path (GAE-lambda part), envs on axis 1."""
    next_values = np.concatenate([values[1:], last_value[None]], axis=0)
    deltas = rewards + gamma * next_values - values
    advantages = spinningup_discount_cumsum(deltas, gamma * lam)
    return advantages, advantages + values


def cleanrl_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda):
    """CleanRL ppo.py (v1.0), the "bootstrap value if not done" GAE loop of the training step ([T, N])."""
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
    """CleanRL ppo.py (v1.0, ``--gae False`` branch): bootstrapped discounted returns ([T, N])."""
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


def rlax_general_off_policy_returns_from_q_and_v(q_t, v_t, r_t, discount_t, c_t):
    """rlax (google-deepmind/rlax), multistep.py general_off_policy_returns_from_q_and_v, batched over trailing
    dims: r_t, v_t, discount_t [K, ...], q_t, c_t [K - 1, ...] (times 1..K-1); the returns G_0..G_{K-1}."""
    g = r_t[-1] + discount_t[-1] * v_t[-1]
    returns = [g]
    for i in range(q_t.shape[0] - 1, -1, -1):
        g = r_t[i] + discount_t[i] * (v_t[i] - c_t[i] * q_t[i] + c_t[i] * g)
        returns.append(g)
    return torch.stack(returns[::-1])


def torchbeast_vtrace(log_rhos, discounts, rewards, values, bootstrap_value, clip_rho_threshold=1.0,
                      clip_pg_rho_threshold=1.0):
    """TorchBeast (facebookresearch/torchbeast), core/vtrace.py from_importance_weights ([T, B]): (vs, pg_advantages)."""
    with torch.no_grad():
        rhos = torch.exp(log_rhos)
        if clip_rho_threshold is not None:
            clipped_rhos = torch.clamp(rhos, max=clip_rho_threshold)
        else:
            clipped_rhos = rhos
        cs = torch.clamp(rhos, max=1.0)
        values_t_plus_1 = torch.cat([values[1:], torch.unsqueeze(bootstrap_value, 0)], dim=0)
        deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)
        acc = torch.zeros_like(bootstrap_value)
        result = []
        for t in range(discounts.shape[0] - 1, -1, -1):
            acc = deltas[t] + discounts[t] * cs[t] * acc
            result.append(acc)
        result.reverse()
        vs_minus_v_xs = torch.stack(result)
        vs = torch.add(vs_minus_v_xs, values)
        broadcasted_bootstrap_values = torch.ones_like(vs[0]) * bootstrap_value
        vs_t_plus_1 = torch.cat([vs[1:], broadcasted_bootstrap_values.unsqueeze(0)])
        if clip_pg_rho_threshold is not None:
            clipped_pg_rhos = torch.clamp(rhos, max=clip_pg_rho_threshold)
        else:
            clipped_pg_rhos = rhos
        pg_advantages = clipped_pg_rhos * (rewards + discounts * vs_t_plus_1 - values)
    return vs, pg_advantages


# ----------------------------------------------------------------------------------------------------
# verl 0.9.1: verl/utils/torch_functional.py and verl/trainer/ppo/core_algos.py
# ----------------------------------------------------------------------------------------------------


def verl_masked_sum(values, mask, axis=None):
    """verl 0.9.1, utils/torch_functional.py masked_sum."""
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


def verl_masked_mean(values, mask, axis=None):
    """verl 0.9.1, utils/torch_functional.py masked_mean."""
    s = verl_masked_sum(values, mask, axis)
    return s / (mask.sum(axis=axis) + 1e-8)


def verl_masked_whiten(values, mask):
    """verl 0.9.1, utils/torch_functional.py masked_whiten (shift_mean=True)."""
    mean = verl_masked_mean(values, mask)
    variance = verl_masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl 0.9.1, core_algos.py compute_gae_advantage_return without its final masked_whiten ([B, T])."""
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        gen_len = token_level_rewards.shape[-1]
        for t in reversed(range(gen_len)):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            # skip values and TD-error on observation tokens
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
    return advantages, returns


def verl_compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl 0.9.1, core_algos.py compute_gae_advantage_return ([B, T]; advantages whitened over the mask)."""
    advantages, returns = verl_gae(token_level_rewards, values, response_mask, gamma, lam)
    with torch.no_grad():
        advantages = verl_masked_whiten(advantages, response_mask)
    return advantages, returns


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    """verl 0.9.1, core_algos.py agg_loss."""
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = loss_mask.sum()
        loss = verl_masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    elif loss_agg_mode == "token-sum":
        loss = verl_masked_sum(loss_mat, loss_mask) * dp_size
    elif loss_agg_mode in ["seq-mean-token-sum", "seq-mean-token-sum-norm"]:
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = verl_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            if loss_scale_factor is None:
                loss_scale_factor = loss_mask.shape[-1]
            loss /= loss_scale_factor
    elif loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).float()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = verl_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
    else:
        raise ValueError(loss_agg_mode)
    return loss


def verl_compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                             cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean"):
    """verl 0.9.1, core_algos.py compute_policy_loss (vanilla, dual clip); returns (loss, clipfrac, kl, clipfrac_lower)."""
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    if cliprange_low is None:
        cliprange_low = cliprange
    if cliprange_high is None:
        cliprange_high = cliprange
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                            **agg):
    """verl 0.9.1, core_algos.py compute_value_loss; returns (vf_loss, vf_clipfrac)."""
    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    clipped_vf_losses = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * verl_agg_loss(clipped_vf_losses, response_mask, loss_agg_mode, **agg)
    vf_clipfrac = verl_masked_mean(torch.gt(vf_losses2, vf_losses1).float(), response_mask)
    return vf_loss, vf_clipfrac


def verl_kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    """verl 0.9.1, core_algos.py kl_penalty_forward."""
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        kl = ref_logprob - logprob
        kl = torch.clamp(kl, min=-20, max=20)
        ratio = torch.exp(kl)
        kld = (ratio - kl - 1).contiguous()
        return torch.clamp(kld, min=-10, max=10)
    raise NotImplementedError


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl 0.9.1, core_algos.py kl_penalty (a "+" suffix: the k2 gradient with the forward estimator's value)."""
    base = kl_penalty.removesuffix("+")
    forward_score = verl_kl_penalty_forward(logprob, ref_logprob, base)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward_score
    backward_score = 0.5 * (logprob - ref_logprob).square()
    return backward_score - backward_score.detach() + forward_score.detach()


def verl_logprobs_from_logits_v2(logits, labels):
    """verl 0.9.1, utils/torch_functional.py logprobs_from_logits_v2 (its float32/float64 branch)."""
    logits_labels = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    logsumexp_values = torch.stack([torch.logsumexp(logit, dim=-1) for logit in logits])
    return logits_labels - logsumexp_values


def verl_entropy_from_logits(logits):
    """verl 0.9.1, utils/torch_functional.py entropy_from_logits."""
    pd = torch.nn.functional.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


def verl_linear_cross_entropy(hidden, weight, labels, temperature, reduction="none"):
    """verl 0.9.1, tests/utils/test_linear_cross_entropy.py run_torch_entropy: the formula of
    utils/kernel/linear_cross_entropy.py linear_cross_entropy (weight [V, H]; returns (logprobs, entropy))."""
    if len(hidden.shape) > 2:
        hidden = hidden.view(-1, hidden.shape[-1])
    if len(labels.shape) > 1:
        labels = labels.view(-1)
    logits = torch.matmul(hidden.to(torch.float32), weight.to(torch.float32) if weight.size(0) == hidden.size(1)
                          else weight.T.to(torch.float32))
    logits /= temperature
    pd = torch.nn.functional.softmax(logits, dim=-1)
    entropy_a = torch.logsumexp(logits, dim=-1)
    entropy_b = torch.sum(pd * logits, dim=-1)
    entropy = entropy_a - entropy_b
    logprobs = torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)
    logprobs = torch.neg(logprobs)
    return logprobs, entropy


# ----------------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------------


def trl_selective_log_softmax(logits, index):
    """TRL 0.15-1.16, trainer/utils.py selective_log_softmax, its torch path (index one per row, no temperature
    or row_mask)."""
    if logits.dtype in [torch.float32, torch.float64]:
        selected_logits = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        # loop to reduce peak mem consumption
        logsumexp_values = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
        per_token_logps = selected_logits - logsumexp_values
    else:
        per_token_logps = []
        for row_logits, row_labels in zip(logits, index):
            row_logps = F.log_softmax(row_logits, dim=-1)
            row_per_token_logps = row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1)
            per_token_logps.append(row_per_token_logps)
        per_token_logps = torch.stack(per_token_logps)
    return per_token_logps


# ----------------------------------------------------------------------------------------------------
# DQN
# ----------------------------------------------------------------------------------------------------


def sb3_dqn_targets(rewards, next_q, dones, discounts):
    """Stable-Baselines3 2.x, dqn/dqn.py DQN.train, the target computation (next_q: the target net's output)."""
    with torch.no_grad():
        next_q_values, _ = next_q.max(dim=1)
        next_q_values = next_q_values.reshape(-1, 1)
        return rewards + (1 - dones) * discounts * next_q_values


def cleanrl_dqn_update(q_values, actions, next_q_values, rewards, dones, gamma):
    """CleanRL dqn.py (v1.0), the loss of the training step (the networks' outputs are the arguments)."""
    with torch.no_grad():
        target_max, _ = next_q_values.max(dim=1)
        td_target = rewards.flatten() + gamma * target_max * (1 - dones.flatten())
    old_val = q_values.gather(1, actions).squeeze()
    loss = F.mse_loss(td_target, old_val)
    return loss, old_val


def cleanrl_ppo_losses(newlogprob, b_logprobs, mb_advantages, newvalue, b_values, b_returns, clip_coef, norm_adv,
                       clip_vloss):
    """CleanRL ppo.py (v1.0), the minibatch losses and logged statistics of the update ([minibatch_size]
    tensors, the networks' outputs as arguments). Returns (pg_loss, v_loss, old_approx_kl, approx_kl, clipfrac)."""
    logratio = newlogprob - b_logprobs
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()
    if norm_adv:
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    newvalue = newvalue.view(-1)
    if clip_vloss:
        v_loss_unclipped = (newvalue - b_returns) ** 2
        v_clipped = b_values + torch.clamp(newvalue - b_values, -clip_coef, clip_coef)
        v_loss_clipped = (v_clipped - b_returns) ** 2
        v_loss_max = torch.max(v_loss_unclipped, v_loss_clipped)
        v_loss = 0.5 * v_loss_max.mean()
    else:
        v_loss = 0.5 * ((newvalue - b_returns) ** 2).mean()
    return pg_loss, v_loss, old_approx_kl, approx_kl, clipfrac
