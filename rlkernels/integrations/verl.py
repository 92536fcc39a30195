"""verl's PPO building blocks (``verl.trainer.ppo.core_algos``, ``verl.utils.torch_functional``) on rlkernels.

Signatures and conventions of verl 0.9.1: ``[bs, response_length]`` tensors (batch first, tokens last), a
``response_mask`` of 1 for response tokens and 0 for prompt, observation and padding tokens, verl's config names
(``cliprange``, ``cliprange_low``, ``cliprange_high``, ``clip_ratio_c``, ``loss_agg_mode``, ``cliprange_value``) and
its KL names (``"kl"``/``"k1"``, ``"abs"``, ``"mse"``/``"k2"``, ``"low_var_kl"``/``"k3"``, and the ``"+"`` straight-through
variants such as ``"k3+"``).

verl itself is not importable without its heavy dependencies (ray, omegaconf, its worker configs), so the tests
check these adapters against verl's formulas transcribed from the 0.9.1 source, not against verl's functions.

Where the results differ from verl's, on inputs verl does not produce or where verl gives NaN:

- ``compute_gae_advantage_return``: masked positions (``response_mask`` 0) hold verl's carried values in verl
  and 0 here before whitening (so ``returns`` = values there, and whitened advantages (0 - mean) / std).
  Unmasked positions agree. It raises a ValueError, as verl does, when fewer than 2 tokens are unmasked.
- The losses are 0, not NaN, when no token is unmasked; ``ppo_kl`` is the mean of old_log_prob - log_prob without
  verl's clamp of the log-ratio to [-20, 20] (equal unless |log_prob - old_log_prob| > 20).
- Outputs are float32 for bfloat16/float16 inputs.
- ``linear_cross_entropy`` (``verl.utils.kernel.linear_cross_entropy``) raises NotImplementedError for a
  ``dist_process_group`` (the vocabulary-parallel head is not supported yet).
"""

from __future__ import annotations

import torch

import rlkernels

from .. import _checks as checks
from ._util import scalar

__all__ = [
    "agg_loss_modes",
    "compute_gae_advantage_return",
    "compute_policy_loss",
    "compute_value_loss",
    "entropy_from_logits",
    "kl_penalty",
    "linear_cross_entropy",
    "logprobs_from_logits",
]

agg_loss_modes = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

_KL = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def _where(fn):
    return f"rlkernels.integrations.verl.{fn}"


def _floats(fn, ref_name, ref, **tensors):
    op = f"integrations.verl.{fn}"
    checks.float_tensor(op, ref_name, ref)
    for name, x in tensors.items():
        checks.float_tensor(op, name, x)
    checks.same_device(op, ref_name, ref, **tensors)
    checks.same_shape(op, ref_name, ref, **tensors)


def _mask(fn, response_mask, ref_name, ref):
    op = f"integrations.verl.{fn}"
    checks.tensor(op, "response_mask", response_mask)
    mask = checks.flag_tensor(op, "response_mask", response_mask)
    checks.same_shape(op, ref_name, ref, response_mask=mask)
    return mask


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam, *, backend=None):
    """verl's token-level GAE: returns (advantages, returns), advantages whitened over the response tokens.

    Masked tokens are skipped: "next" is the next response token of the row (rlkernels.gae with ``mask``,
    ``time_dim=-1``); returns = advantages + values before whitening; the advantages are then whitened with
    verl's masked_whiten (masked mean, unbiased masked variance, rsqrt(var + 1e-8)). No gradient, as in verl.
    """
    fn = "compute_gae_advantage_return"
    gamma, lam = scalar(_where(fn), "gamma", gamma), scalar(_where(fn), "lam", lam)
    _floats(fn, "token_level_rewards", token_level_rewards, values=values)
    mask = _mask(fn, response_mask, "token_level_rewards", token_level_rewards)
    if token_level_rewards.dim() != 2:
        raise ValueError(f"{_where(fn)}: token_level_rewards must be [bs, response_length], got shape "
                         f"{tuple(token_level_rewards.shape)}")
    with torch.no_grad():
        adv, returns = rlkernels.gae(token_level_rewards, values, gamma=gamma, lam=lam, mask=mask, time_dim=-1,
                                     backend=backend)
        # verl's raw advantages at masked positions are carries; ours are 0: returns = values there.
        returns = torch.where(mask, returns, values.to(returns.dtype))
        m = mask.to(adv.dtype)
        count = m.sum()
        n = int(count.item())  # verl checks the mask on the host too (masked_var)
        if n == 0:
            raise ValueError(f"{_where(fn)}: response_mask has no token set; at least 2 are needed to whiten")
        if n == 1:
            raise ValueError(f"{_where(fn)}: response_mask has a single token set; at least 2 are needed to "
                             "whiten (the unbiased variance divides by n - 1)")
        mean = (adv * m).sum() / (count + 1e-8)
        var = (((adv - mean) ** 2) * m).sum() / (count + 1e-8) * (count / (count - 1))
        advantages = (adv - mean) * torch.rsqrt(var + 1e-8)
    return advantages, returns


def _rescale(loss, mask, mode, *, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """Our aggregation (``rlkernels`` agg) rescaled to verl 0.9.1's agg_loss: token-mean divides by
    batch_num_tokens (the local token count by default) times dp_size; the seq-mean modes divide by
    global_batch_size (the number of rows with a token by default) times dp_size; token-sum is the masked sum."""
    m = mask.reshape(-1, mask.shape[-1]) if mask.dim() > 1 else mask.reshape(1, -1)
    dtype = loss.dtype
    if mode in ("token-mean", "token-sum"):
        count = m.sum().to(dtype)
        if mode == "token-sum":
            return loss * count * dp_size
        if batch_num_tokens is None:  # dp_size == 1 (checked by _agg_args)
            return loss
        return loss * count / batch_num_tokens * dp_size
    rows = m.shape[0]
    nonempty = m.any(-1).sum().to(dtype)
    if mode == "seq-mean-token-mean":  # ours: the mean over rows with a token
        if global_batch_size is None:  # dp_size == 1 (checked by _agg_args)
            return loss
        return loss * nonempty / global_batch_size * dp_size
    # seq-mean-token-sum(-norm): ours divides by all rows, verl by the rows with a token (or global_batch_size)
    denom = nonempty.clamp(min=1) if global_batch_size is None else global_batch_size
    return loss * rows / denom * dp_size


def _agg_args(fn, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor):
    if loss_agg_mode not in agg_loss_modes:
        raise ValueError(f"{_where(fn)}: loss_agg_mode must be one of {agg_loss_modes}, got {loss_agg_mode!r}")
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"{_where(fn)}: dp_size must be an int >= 1, got {dp_size!r}")
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError(f"{_where(fn)}: (global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
        raise ValueError(f"{_where(fn)}: global_batch_size is required when dp_size > 1")
    ours = "token-mean" if loss_agg_mode == "token-sum" else loss_agg_mode
    norm = None
    if loss_agg_mode == "seq-mean-token-sum-norm" and loss_scale_factor is not None:
        norm = scalar(_where(fn), "loss_scale_factor", loss_scale_factor)
        if not norm > 0:
            raise ValueError(f"{_where(fn)}: loss_scale_factor must be > 0, got {norm}")
    return ours, norm


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean", *, backend=None):
    """verl's vanilla (dual-clip) PPO policy loss. Returns (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower).

    ratio = exp(clamp(log_prob - old_log_prob, -20, 20)); l = max(-A ratio, -A clamp(ratio, 1 - cliprange_low,
    1 + cliprange_high)); where A < 0, l = min(l, -A clip_ratio_c); aggregated by ``loss_agg_mode`` (verl's
    agg_loss). One fused pass (:func:`rlkernels.ppo_policy_loss`); differentiable in ``log_prob``.
    """
    fn = "compute_policy_loss"
    if cliprange_low is None:
        cliprange_low = cliprange
    if cliprange_high is None:
        cliprange_high = cliprange
    if cliprange_low is None or cliprange_high is None:
        raise ValueError(f"{_where(fn)}: cliprange is required unless both cliprange_low and cliprange_high are "
                         "given")
    cliprange_low = scalar(_where(fn), "cliprange_low", cliprange_low)
    cliprange_high = scalar(_where(fn), "cliprange_high", cliprange_high)
    clip_ratio_c = scalar(_where(fn), "clip_ratio_c", clip_ratio_c)
    if not clip_ratio_c > 1.0:
        raise ValueError(f"{_where(fn)}: clip_ratio_c (the dual-clip bound) must be > 1.0, got {clip_ratio_c}")
    _floats(fn, "log_prob", log_prob, old_log_prob=old_log_prob, advantages=advantages)
    mask = _mask(fn, response_mask, "log_prob", log_prob)
    ours, _ = _agg_args(fn, loss_agg_mode, 1, None, None, None)
    loss, stats = rlkernels.ppo_policy_loss(log_prob, old_log_prob, advantages, mask, clip_low=cliprange_low,
                                            clip_high=cliprange_high, dual_clip=clip_ratio_c, agg=ours,
                                            backend=backend)
    loss = _rescale(loss, mask, loss_agg_mode)
    return loss, stats["clipfrac"], stats["approx_kl"], stats["clipfrac_lower"]


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                       dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None, *,
                       backend=None):
    """verl's clipped value loss. Returns (vf_loss, vf_clipfrac).

    vf_loss = 0.5 * agg(max((vpreds - returns)^2, (clip(vpreds, values -+ cliprange_value) - returns)^2));
    ``values`` are the old values (verl's naming). Differentiable in ``vpreds``.
    """
    fn = "compute_value_loss"
    cliprange_value = scalar(_where(fn), "cliprange_value", cliprange_value)
    _floats(fn, "vpreds", vpreds, returns=returns, values=values)
    mask = _mask(fn, response_mask, "vpreds", vpreds)
    ours, norm = _agg_args(fn, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    loss, stats = rlkernels.value_loss(vpreds, values, returns, mask, clip=cliprange_value, agg=ours,
                                       backend=backend)
    if norm is not None:  # seq-mean-token-sum-norm: ours divides by the horizon T, verl by loss_scale_factor
        loss = loss * (vpreds.shape[-1] / norm)
    loss = _rescale(loss, mask, loss_agg_mode, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                    global_batch_size=global_batch_size)
    return loss, stats["vf_clipfrac"]


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl's elementwise KL estimate. ``"kl"``/``"k1"``: logprob - ref; ``"abs"``; ``"mse"``/``"k2"``: half the
    squared log-ratio; ``"low_var_kl"``/``"k3"``: exp(ref - logprob) - (ref - logprob) - 1, clamped as verl does.
    A ``"+"`` suffix (e.g. ``"k3+"``) keeps the value and takes the gradient of k2 (verl's straight-through trick)."""
    fn = "kl_penalty"
    if not isinstance(kl_penalty, str):
        raise TypeError(f"{_where(fn)}: kl_penalty must be a str, got {type(kl_penalty).__name__}")
    base = kl_penalty.removesuffix("+")
    if base == "full":
        raise NotImplementedError(f"{_where(fn)}: kl_penalty='full' is not implemented (nor is it in verl)")
    if base not in _KL:
        raise ValueError(f"{_where(fn)}: kl_penalty must be one of {sorted(_KL)} (optionally with '+'), "
                         f"got {kl_penalty!r}")
    forward = rlkernels.kl_penalty(logprob, ref_logprob, _KL[base])
    if not kl_penalty.endswith("+") or _KL[base] == "k2":
        return forward
    backward = rlkernels.kl_penalty(logprob, ref_logprob, "k2")
    return backward - backward.detach() + forward.detach()


def logprobs_from_logits(logits, labels, inplace_backward=True, *, backend=None):
    """Log-probabilities of ``labels`` under softmax(logits): [..., V] and [...] -> [...] (float32).

    One fused pass (:func:`rlkernels.gather_logprobs`). ``inplace_backward=True`` (verl's default, as in its
    flash-attn path) writes the gradient over the logits' storage during backward: pass False when the logits
    are used again, e.g. for :func:`entropy_from_logits` (verl's actor does the same).
    """
    return rlkernels.gather_logprobs(logits, labels, inplace_backward=inplace_backward, backend=backend)


def entropy_from_logits(logits, *, backend=None):
    """Entropy of softmax(logits) per row: logsumexp(logits) - sum(softmax(logits) * logits) (float32)."""
    checks.float_tensor("integrations.verl.entropy_from_logits", "logits", logits)
    if logits.dim() == 0:
        raise ValueError(f"{_where('entropy_from_logits')}: logits must have shape [..., V], got a 0-d tensor")
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = rlkernels.gather_logprobs(logits, tokens, return_entropy=True, backend=backend)
    return entropy


_REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None, *,
                         backend=None):
    """verl's fused LM head: (logprobs, entropy) of ``labels`` under softmax(hidden @ weight.T / temperature),
    without the logits (:func:`rlkernels.linear_logprobs`).

    ``hidden`` [..., H] (flattened to [N, H] as verl does), ``weight`` [V, H], ``labels`` [...] with -100 for
    positions to skip. verl's formula: logprobs = -cross_entropy(logits, labels, reduction) (per token for
    ``"none"``, 0 at labels -100; their sum or mean over the labels that are not -100 for ``"sum"``/``"mean"``),
    entropy = logsumexp(logits) - sum softmax(logits) * logits per token ([N], every position). float32 outputs;
    differentiable in hidden and weight. 16-bit logits are rounded to the inputs' dtype, as ``hidden @ weight.T``
    rounds them (verl's kernel keeps them in float32): results differ from verl's by that rounding.
    """
    where = _where("linear_cross_entropy")
    if dist_process_group is not None:
        raise NotImplementedError(f"{where}: dist_process_group (a vocabulary-parallel head) is not supported yet")
    if reduction is None:
        reduction = "none"
    if temperature is None:
        temperature = 1.0
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    checks.float_tensor("integrations.verl.linear_cross_entropy", "hidden", hidden)
    checks.tensor("integrations.verl.linear_cross_entropy", "labels", labels)
    if hidden.dim() == 0:
        raise ValueError(f"{where}: hidden must have shape [..., H], got a 0-d tensor")
    if labels.numel() != hidden.numel() // max(1, hidden.shape[-1]) or (hidden.shape[-1] == 0 and labels.numel()):
        raise ValueError(f"{where}: labels must hold one label per row of hidden ({tuple(hidden.shape[:-1])}), got "
                         f"{tuple(labels.shape)}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    valid = labels != -100
    # entropy at every position, as verl's formula has it; the log-prob of a -100 label is 0
    safe = torch.where(valid, labels.to(torch.int64), torch.zeros((), dtype=torch.int64, device=labels.device))
    logp, entropy = rlkernels.linear_logprobs(hidden, weight, safe, temperature=temperature, return_entropy=True,
                                              backend=backend)
    logp = torch.where(valid, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.sum() / valid.sum()
    return logp, entropy
