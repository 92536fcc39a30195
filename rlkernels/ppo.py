"""The PPO loss family: ppo_policy_loss, value_loss, kl_penalty (docs/design.md §4.4).

The losses are one fused pass over [B, T]: per-token terms, clip flags and every masked reduction, with the
statistics returned as 0-d tensors (no ``.item()``, no host sync). The wrappers here check arguments, bring
inputs to the kernels' canonical layout (contiguous [B, T] of one dtype, mask bool), pick the backend and
register autograd and fake kernels for the custom ops declared in csrc/ops.cpp.

Defined behaviour without tokens: a row with no unmasked token adds nothing (and is left out of
``seq-mean-token-mean``); when no token of the batch is unmasked, or the batch is empty, the loss and every
statistic are 0, never NaN, and the gradient is 0.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the kernels and the schemas)
from . import _checks as checks
from ._backend import resolve

_ops = torch.ops.rlkernels

AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "abs", "k2", "k3")
POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max")


def _reference(name):
    from . import reference

    return getattr(reference, name)


def _triton():
    from .triton import ppo as triton_ppo

    return triton_ppo


def _scalar(value, device, dtype):
    return torch.tensor(value, dtype=checks.accumulate_dtype(dtype), device=device)


def _check_agg(op, agg):
    if agg not in AGGS:
        raise ValueError(f"rlkernels.{op}: agg must be one of {AGGS}, got {agg!r}")


def _rows(op, ref_name, ref, agg, floats, mask):
    """Checked inputs as canonical [B, T] tensors of one dtype, and the mask as bool (or None)."""
    checks.float_tensor(op, ref_name, ref)
    for name, x in floats.items():
        checks.float_tensor(op, name, x)
    mask = checks.flag_tensor(op, "mask", mask)
    checks.same_device(op, ref_name, ref, **floats, mask=mask)
    checks.same_shape(op, ref_name, ref, **floats, mask=mask)
    _check_agg(op, agg)
    if ref.dim() == 0:
        raise ValueError(f"rlkernels.{op}: {ref_name} must be [B, T] (or 1-D for token-mean), got a 0-d tensor")
    if ref.dim() == 1:
        if agg != "token-mean":
            raise ValueError(
                f"rlkernels.{op}: agg={agg!r} needs [B, T] inputs; {ref_name} has shape {tuple(ref.shape)}"
            )
        canon = (1, ref.shape[0])
    else:
        canon = (_lead(ref), ref.shape[-1])
    dtype = checks.common_float_dtype(ref, *floats.values())
    tensors = [x.to(dtype).reshape(canon).contiguous() for x in (ref, *floats.values())]
    if mask is not None:
        mask = mask.reshape(canon).contiguous()
    return tensors, mask, dtype


def _lead(x):
    n = 1
    for s in x.shape[:-1]:
        n *= s
    return n


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
    approx_kl (old_logp - logp) and ratio_mean, each a masked mean over tokens, and ratio_max (masked max) to
    0-d tensors. Without unmasked tokens, the loss and every stat are 0. Differentiable in ``logp`` only
    (old_logp and advantages are data). Outputs are float32 for 16-bit inputs, else the input dtype.
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
    (lp, old, adv), mask_c, dtype = _rows(op, "logp", logp, agg,
                                          {"old_logp": old_logp, "advantages": advantages}, mask)
    if norm_length is None:
        norm_length = float(lp.shape[1])
    else:
        norm_length = checks.positive(op, "norm_length", norm_length)
    impl = resolve(backend, logp.device, op)
    if impl == "reference":
        loss, stats = _reference(op)(logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                     dual_clip=dual_clip, agg=agg, norm_length=norm_length)
        return _scalar(loss, logp.device, dtype), {k: _scalar(v, logp.device, dtype) for k, v in stats.items()}
    fn = _triton().ppo_policy_loss if impl == "triton" else _ops.ppo_policy_loss
    # An empty T makes norm_length 0; no token counts then and the kernels return 0 before dividing.
    out = fn(lp, old, adv, mask_c, clip_low, clip_high, dual_clip, agg, max(norm_length, 1.0))
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
    (v, old, ret), mask_c, dtype = _rows(op, "values", values, agg,
                                         {"old_values": old_values, "returns": returns}, mask)
    impl = resolve(backend, values.device, op)
    if impl == "reference":
        loss, stats = _reference(op)(values, old_values, returns, mask, clip=clip, agg=agg)
        return _scalar(loss, values.device, dtype), {k: _scalar(x, values.device, dtype) for k, x in stats.items()}
    fn = _triton().value_loss if impl == "triton" else _ops.value_loss
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
    impl = resolve(backend, logp.device, op)
    if impl == "reference":
        out = _reference(op)(logp, ref_logp, kind)
        return torch.as_tensor(out, dtype=checks.accumulate_dtype(dtype), device=logp.device)
    fn = _triton().kl_penalty if impl == "triton" else _ops.kl_penalty
    return fn(logp.to(dtype), ref_logp.to(dtype), kind)


# ----------------------------------------------------------------------------------------------------
# Fake kernels
# ----------------------------------------------------------------------------------------------------


def _scalar_like(x):
    return x.new_empty((), dtype=checks.accumulate_dtype(x.dtype))


@torch.library.register_fake("rlkernels::ppo_policy_loss")
def _(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, norm_length):
    torch._check(logp.dim() == 2, lambda: "rlkernels: logp must be canonical [B, T]")
    return tuple(_scalar_like(logp) for _ in range(6))


@torch.library.register_fake("rlkernels::ppo_policy_loss_backward")
def _(grad_loss, logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, norm_length):
    return torch.empty_like(logp, memory_format=torch.contiguous_format)


@torch.library.register_fake("rlkernels::value_loss")
def _(values, old_values, returns, mask, clip, agg):
    torch._check(values.dim() == 2, lambda: "rlkernels: values must be canonical [B, T]")
    return _scalar_like(values), _scalar_like(values)


@torch.library.register_fake("rlkernels::value_loss_backward")
def _(grad_loss, values, old_values, returns, mask, clip, agg):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


@torch.library.register_fake("rlkernels::kl_penalty")
def _(logp, ref_logp, kind):
    return logp.new_empty(logp.shape, dtype=checks.accumulate_dtype(logp.dtype))


@torch.library.register_fake("rlkernels::kl_penalty_backward")
def _(grad, logp, ref_logp, kind):
    return torch.empty_like(logp, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------------
# Autograd: the backwards are custom ops too, so compiled graphs keep them fused
# ----------------------------------------------------------------------------------------------------


def _policy_setup(ctx, inputs, output):
    logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, norm_length = inputs
    ctx.args = (clip_low, clip_high, dual_clip, agg, norm_length)
    ctx.mark_non_differentiable(*output[1:])  # the stats are diagnostics, like verl's detached ones
    ctx.save_for_backward(logp, old_logp, advantages, mask)


def _policy_backward(ctx, grad_loss, *_grad_stats):
    logp, old_logp, advantages, mask = ctx.saved_tensors
    grad = _ops.ppo_policy_loss_backward(grad_loss, logp, old_logp, advantages, mask, *ctx.args)
    return grad, None, None, None, None, None, None, None, None


torch.library.register_autograd("rlkernels::ppo_policy_loss", _policy_backward, setup_context=_policy_setup)


def _value_setup(ctx, inputs, output):
    values, old_values, returns, mask, clip, agg = inputs
    ctx.args = (clip, agg)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(values, old_values, returns, mask)


def _value_backward(ctx, grad_loss, _grad_clipfrac):
    values, old_values, returns, mask = ctx.saved_tensors
    grad = _ops.value_loss_backward(grad_loss, values, old_values, returns, mask, *ctx.args)
    return grad, None, None, None, None, None


torch.library.register_autograd("rlkernels::value_loss", _value_backward, setup_context=_value_setup)


def _kl_setup(ctx, inputs, output):
    logp, ref_logp, kind = inputs
    ctx.kind = kind
    ctx.save_for_backward(logp, ref_logp)


def _kl_backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    return _ops.kl_penalty_backward(grad, logp, ref_logp, ctx.kind), None, None


torch.library.register_autograd("rlkernels::kl_penalty", _kl_backward, setup_context=_kl_setup)
