"""The PPO loss family: ppo_policy_loss, value_loss, kl_penalty (docs/design.md §4.4).

The losses are one fused pass over [B, T]: per-token terms, clip flags and every masked reduction, with the
statistics returned as 0-d tensors (no ``.item()``, no host sync). The wrappers here check arguments, bring
inputs to the kernels' canonical layout (contiguous [B, T] of one dtype, mask bool; rlkernels/_layout.py)
and run the backend's op (rlkernels/_dispatch.py); the ops' autograd is in rlkernels/_ops/ppo.py.

Defined behaviour without tokens: a row with no unmasked token adds nothing (and is left out of
``seq-mean-token-mean``); when no token of the batch is unmasked, or the batch is empty, the loss and every
statistic are 0, never NaN, and the gradient is 0.
"""

from __future__ import annotations

import torch

from . import _checks as checks
from . import _dispatch as dispatch
from ._layout import AGGS, loss_rows  # noqa: F401  (AGGS: the aggregations, rlkernels.ppo.AGGS)

__all__ = ["kl_penalty", "ppo_policy_loss", "value_loss"]

KL_KINDS = ("k1", "abs", "k2", "k3")
POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max")


def _scalar(value, device, dtype):
    return torch.tensor(value, dtype=checks.accumulate_dtype(dtype), device=device)


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def ppo_policy_loss(logp, old_logp, advantages, mask=None, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    agg="token-mean", norm_length=None, backend=None):
    """Clipped PPO policy loss (Schulman et al. 2017) with asymmetric and dual clipping. Returns (loss, stats).

    ratio = exp(clamp(logp - old_logp, -20, 20));
    l = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))   (clip_high None: clip_low);
    dual clip c > 1 (Ye et al. 2020): where A < 0, l = min(l, -A * c).

    Aggregations over the unmasked tokens of ``[B, T]`` inputs (1-D inputs: token-mean only):
    token-mean = sum(l m) / sum(m); seq-mean-token-sum = mean over rows of sum_t l m;
    seq-mean-token-mean = mean over rows with a token of sum_t l m / sum_t m;
    seq-mean-token-sum-norm = sum(l m) / (B * norm_length), norm_length defaults to T.
    Leading dimensions beyond two are flattened into B.

    ``stats`` maps clipfrac ([-A clamp(ratio) > -A ratio]), clipfrac_lower ([A < 0 and the dual clip binds]),
    approx_kl (old_logp - logp) and ratio_mean, each a masked mean over tokens, and ratio_max (masked max) to 0-d
    tensors: verl's definitions (pg_clipfrac, ppo_kl). CleanRL logs other quantities under the same names: its
    clipfrac counts every ratio outside [1 - clip, 1 + clip], also where the advantage's sign leaves the loss
    unclipped (so it is larger), and its approx_kl is the k3 estimator mean((ratio - 1) - log ratio) that
    ``--target-kl`` compares (our approx_kl is its old_approx_kl): use
    :func:`rlkernels.integrations.cleanrl.ppo_loss` for CleanRL's. Without unmasked tokens, the loss and every stat
    are 0. Differentiable in ``logp`` only (old_logp and advantages are data). Outputs are float32 for 16-bit
    inputs, else the input dtype.
    """
    op = "ppo_policy_loss"
    clip_low = checks.real(op, "clip_low", clip_low)
    clip_high = clip_low if clip_high is None else checks.real(op, "clip_high", clip_high)
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not value >= 0.0:
            raise ValueError(f"rlkernels.{op}: {name} must be >= 0, got {value}")
    if dual_clip is not None:
        dual_clip = checks.real(op, "dual_clip", dual_clip)
        if not dual_clip > 1.0:
            raise ValueError(f"rlkernels.{op}: dual_clip must be > 1, got {dual_clip}")
    (lp, old, adv), mask_c, dtype = loss_rows(op, "logp", logp, agg,
                                          {"old_logp": old_logp, "advantages": advantages}, mask)
    if norm_length is None:
        norm_length = float(lp.shape[1])
    else:
        norm_length = checks.positive(op, "norm_length", norm_length)
    impl = dispatch.resolve(backend, logp.device, op)
    if impl == "reference":
        loss, stats = dispatch.reference(op)(logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                             dual_clip=dual_clip, agg=agg, norm_length=norm_length)
        return _scalar(loss, logp.device, dtype), {k: _scalar(v, logp.device, dtype) for k, v in stats.items()}
    fn = dispatch.kernel(op, impl)
    # An empty T makes the default norm_length 0; no token counts then and the kernels return 0 before dividing.
    # A norm_length given is passed as it is (checked > 0 above).
    out = fn(lp, old, adv, mask_c, clip_low, clip_high, dual_clip, agg, norm_length if norm_length > 0 else 1.0)
    return out[0], dict(zip(POLICY_STATS, out[1:]))


def value_loss(values, old_values, returns, mask=None, *, clip=None, agg="token-mean", backend=None):
    """Clipped value loss. Returns (loss, stats).

    l = 0.5 * max((v - R)^2, (clamp(v, old - clip, old + clip) - R)^2)   (clip None: 0.5 * (v - R)^2),
    aggregated like :func:`ppo_policy_loss` (seq-mean-token-sum-norm divides by B * T).
    stats: vf_clipfrac = masked mean of [(clamped v - R)^2 > (v - R)^2] (0 without clip).
    Without unmasked tokens the loss and vf_clipfrac are 0. Differentiable in ``values`` only.
    """
    op = "value_loss"
    if clip is not None:
        clip = checks.real(op, "clip", clip)
        if not clip >= 0.0:
            raise ValueError(f"rlkernels.{op}: clip must be >= 0, got {clip}")
    (v, old, ret), mask_c, dtype = loss_rows(op, "values", values, agg,
                                         {"old_values": old_values, "returns": returns}, mask)
    impl = dispatch.resolve(backend, values.device, op)
    if impl == "reference":
        loss, stats = dispatch.reference(op)(values, old_values, returns, mask, clip=clip, agg=agg)
        return _scalar(loss, values.device, dtype), {k: _scalar(x, values.device, dtype) for k, x in stats.items()}
    fn = dispatch.kernel(op, impl)
    loss, vf_clipfrac = fn(v, old, ret, mask_c, clip, agg)
    return loss, {"vf_clipfrac": vf_clipfrac}


def kl_penalty(logp, ref_logp, kind="k1", *, backend=None):
    """Elementwise KL estimate between the policy and a reference policy (Schulman 2020, "Approximating KL").

    k1 = logp - ref;  abs = |k1|;  k2 = 0.5 * k1^2;
    k3 = exp(d) - d - 1 with d = clamp(ref - logp, -20, 20), the result clamped to [-10, 10].
    Any shape; empty inputs give empty outputs. Differentiable in ``logp`` only.
    """
    op = "kl_penalty"
    checks.float_tensor(op, "logp", logp)
    checks.float_tensor(op, "ref_logp", ref_logp)
    checks.same_device(op, "logp", logp, ref_logp=ref_logp)
    checks.same_shape(op, "logp", logp, ref_logp=ref_logp)
    if kind not in KL_KINDS:
        raise ValueError(f"rlkernels.{op}: kind must be one of {KL_KINDS}, got {kind!r}")
    dtype = checks.common_float_dtype(logp, ref_logp)
    impl = dispatch.resolve(backend, logp.device, op)
    if impl == "reference":
        out = dispatch.reference(op)(logp, ref_logp, kind)
        return dispatch.from_reference(out, logp.device, dtype)
    fn = dispatch.kernel(op, impl)
    return fn(logp.to(dtype), ref_logp.to(dtype), kind)
