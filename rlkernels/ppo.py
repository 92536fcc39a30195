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
from . import _distributed
from ._layout import AGGS, check_agg, loss_rows  # noqa: F401  (AGGS: the aggregations, rlkernels.ppo.AGGS)

__all__ = ["kl_penalty", "loss_count", "ppo_policy_loss", "value_loss"]

KL_KINDS = ("k1", "abs", "k2", "k3")
POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max")


def _scalar(value, device, dtype):
    return torch.tensor(value, dtype=checks.accumulate_dtype(dtype), device=device)


def _global_args(op, global_count, process_group):
    """Checks global_count (a number >= 0 or a 0-d tensor) and process_group; at most one of them is given."""
    if global_count is not None and process_group is not None:
        raise ValueError(f"rlkernels.{op}: give global_count or process_group, not both (process_group sums this "
                         "call's count over the group; global_count is the sum already)")
    if process_group is not None:
        _distributed.check_group(op, process_group)
    if global_count is None:
        return None
    if isinstance(global_count, torch.Tensor):
        if global_count.dim() != 0 or global_count.dtype.is_complex or global_count.dtype == torch.bool:
            raise TypeError(f"rlkernels.{op}: global_count must be a number or a 0-d integer or float tensor, "
                            f"got a {global_count.dtype} tensor of shape {tuple(global_count.shape)}")
        return global_count
    global_count = checks.real(op, "global_count", global_count)
    if not global_count >= 0:
        raise ValueError(f"rlkernels.{op}: global_count must be >= 0, got {global_count}")
    return global_count


def _global_loss(loss, agg, mask, shape, global_count, process_group):
    """The loss of this call as its share of the global batch's loss (docs/design.md §4.8)."""
    if global_count is None and process_group is None:
        return loss
    count = _distributed.local_count(agg, mask, shape)
    total = global_count
    if process_group is not None:
        total = _distributed.all_reduce_count(count, loss.device, process_group)
    return _distributed.global_share(loss, count, total)


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def ppo_policy_loss(logp, old_logp, advantages, mask=None, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    agg="token-mean", norm_length=None, global_count=None, process_group=None, backend=None):
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

    Global batches (micro-batches, data-parallel ranks; docs/design.md §4.8): ``global_count`` is what ``agg``
    divides by over the whole global batch (:func:`loss_count` of all its masks); the loss is then this call's
    share, sum(l m) / global_count for token-mean (the seq-mean modes likewise over rows), so that the losses of
    all micro-batches on all ranks add up to the loss of the whole batch, and so do their gradients.
    ``process_group`` instead sums this call's own count over the group (one all-reduce): one call per rank.
    The stats stay this call's own. Under DDP/FSDP, which average gradients over ranks, scale the loss by the
    number of data-parallel ranks (verl's ``dp_size`` factor).
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
    global_count = _global_args(op, global_count, process_group)
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
        loss = _global_loss(_scalar(loss, logp.device, dtype), agg, mask_c, lp.shape, global_count, process_group)
        return loss, {k: _scalar(v, logp.device, dtype) for k, v in stats.items()}
    fn = dispatch.kernel(op, impl)
    # An empty T makes the default norm_length 0; no token counts then and the kernels return 0 before dividing.
    # A norm_length given is passed as it is (checked > 0 above).
    out = fn(lp, old, adv, mask_c, clip_low, clip_high, dual_clip, agg, norm_length if norm_length > 0 else 1.0)
    loss = _global_loss(out[0], agg, mask_c, lp.shape, global_count, process_group)
    return loss, dict(zip(POLICY_STATS, out[1:]))


def value_loss(values, old_values, returns, mask=None, *, clip=None, agg="token-mean", global_count=None,
               process_group=None, backend=None):
    """Clipped value loss. Returns (loss, stats).

    l = 0.5 * max((v - R)^2, (clamp(v, old - clip, old + clip) - R)^2)   (clip None: 0.5 * (v - R)^2),
    aggregated like :func:`ppo_policy_loss` (seq-mean-token-sum-norm divides by B * T).
    stats: vf_clipfrac = masked mean of [(clamped v - R)^2 > (v - R)^2] (0 without clip).
    Without unmasked tokens the loss and vf_clipfrac are 0. Differentiable in ``values`` only.
    ``global_count`` and ``process_group``: as in :func:`ppo_policy_loss` (seq-mean-token-sum-norm then divides
    by global_count * T, so the micro-batches of one global batch share T in that mode).
    """
    op = "value_loss"
    if clip is not None:
        clip = checks.real(op, "clip", clip)
        if not clip >= 0.0:
            raise ValueError(f"rlkernels.{op}: clip must be >= 0, got {clip}")
    global_count = _global_args(op, global_count, process_group)
    (v, old, ret), mask_c, dtype = loss_rows(op, "values", values, agg,
                                         {"old_values": old_values, "returns": returns}, mask)
    impl = dispatch.resolve(backend, values.device, op)
    if impl == "reference":
        loss, stats = dispatch.reference(op)(values, old_values, returns, mask, clip=clip, agg=agg)
        loss = _global_loss(_scalar(loss, values.device, dtype), agg, mask_c, v.shape, global_count, process_group)
        return loss, {k: _scalar(x, values.device, dtype) for k, x in stats.items()}
    fn = dispatch.kernel(op, impl)
    loss, vf_clipfrac = fn(v, old, ret, mask_c, clip, agg)
    loss = _global_loss(loss, agg, mask_c, v.shape, global_count, process_group)
    return loss, {"vf_clipfrac": vf_clipfrac}


def loss_count(masks, agg="token-mean", *, process_group=None):
    """What ``agg`` divides by over a global batch: the ``global_count`` of :func:`ppo_policy_loss` and
    :func:`value_loss`.

    ``masks``: one mask or a list of masks (the micro-batches of this rank), each [B, T] (leading dimensions
    flattened into B; 1-D for token-mean) of bool, integer or float flags. Counts the unmasked tokens
    (token-mean), the rows (seq-mean-token-sum, seq-mean-token-sum-norm) or the rows with an unmasked token
    (seq-mean-token-mean), summed over the masks and, with ``process_group``, over the group's ranks (one
    all-reduce). Returns a 0-d int64 tensor on the masks' device; no host synchronization.
    """
    op = "loss_count"
    check_agg(op, agg)
    if process_group is not None:
        _distributed.check_group(op, process_group)
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    if not isinstance(masks, (list, tuple)) or not masks:
        raise TypeError(f"rlkernels.{op}: masks must be a mask tensor or a non-empty list of them, got "
                        f"{type(masks).__name__ if not isinstance(masks, (list, tuple)) else 'an empty list'}")
    device = None
    total = None
    for i, m in enumerate(masks):
        name = f"masks[{i}]"
        m = checks.flag_tensor(op, name, checks.tensor(op, name, m))
        if device is None:
            device = m.device
        elif m.device != device:
            raise ValueError(f"rlkernels.{op}: {name} is on {m.device} but masks[0] is on {device}; all masks must be "
                             "on one device")
        if m.dim() == 0 or (m.dim() == 1 and agg != "token-mean"):
            raise ValueError(f"rlkernels.{op}: agg={agg!r} needs [B, T] masks, {name} has shape {tuple(m.shape)}")
        rows = m.reshape(1, -1) if m.dim() == 1 else m.reshape(-1, m.shape[-1])
        count = torch.as_tensor(_distributed.local_count(agg, rows, tuple(rows.shape)), dtype=torch.int64,
                                device=device)
        total = count if total is None else total + count
    if process_group is not None:
        total = _distributed.all_reduce_count(total, device, process_group)
    return total


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
