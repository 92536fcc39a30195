"""Fake kernels and autograd of the PPO loss family's ops (docs/design.md §4.4).

The backwards are custom ops too (``*_backward``), so compiled graphs keep them fused. The stats are
diagnostics (like verl's detached ones) and carry no gradient.
"""

from __future__ import annotations

import torch

from ._util import accumulate_dtype, register

FAMILY = "ppo"
OPS = ("ppo_policy_loss", "value_loss", "kl_penalty")


def _scalar_like(x):
    return x.new_empty((), dtype=accumulate_dtype(x.dtype))


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
    return logp.new_empty(logp.shape, dtype=accumulate_dtype(logp.dtype))


@torch.library.register_fake("rlkernels::kl_penalty_backward")
def _(grad, logp, ref_logp, kind):
    return torch.empty_like(logp, memory_format=torch.contiguous_format)


def _policy_setup(ctx, inputs, output):
    logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, norm_length = inputs
    ctx.args = (clip_low, clip_high, dual_clip, agg, norm_length)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(logp, old_logp, advantages, mask)


def register_policy_loss(op, backward_op):
    """ppo_policy_loss: gradient with respect to logp only."""

    def backward(ctx, grad_loss, *_grad_stats):
        logp, old_logp, advantages, mask = ctx.saved_tensors
        grad = backward_op(grad_loss, logp, old_logp, advantages, mask, *ctx.args)
        return grad, None, None, None, None, None, None, None, None

    register(op, backward, _policy_setup, backward_op)


def _value_setup(ctx, inputs, output):
    values, old_values, returns, mask, clip, agg = inputs
    ctx.args = (clip, agg)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(values, old_values, returns, mask)


def register_value_loss(op, backward_op):
    """value_loss: gradient with respect to values only."""

    def backward(ctx, grad_loss, _grad_clipfrac):
        values, old_values, returns, mask = ctx.saved_tensors
        grad = backward_op(grad_loss, values, old_values, returns, mask, *ctx.args)
        return grad, None, None, None, None, None

    register(op, backward, _value_setup, backward_op)


def _kl_setup(ctx, inputs, output):
    logp, ref_logp, kind = inputs
    ctx.kind = kind
    ctx.save_for_backward(logp, ref_logp)


def register_kl_penalty(op, backward_op):
    """kl_penalty: gradient with respect to logp only."""

    def backward(ctx, grad):
        logp, ref_logp = ctx.saved_tensors
        return backward_op(grad, logp, ref_logp, ctx.kind), None, None

    register(op, backward, _kl_setup, backward_op)


_ops = torch.ops.rlkernels
register_policy_loss("ppo_policy_loss", _ops.ppo_policy_loss_backward)
register_value_loss("value_loss", _ops.value_loss_backward)
register_kl_penalty("kl_penalty", _ops.kl_penalty_backward)
