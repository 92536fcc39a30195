"""Fake kernels and autograd of the reverse-scan family's ops (docs/design.md §4.1, §4.2, §4.6).

The ops take the canonical layout (rlkernels/_layout.py): [O, T, I] contiguous, or 1-D packed segments with
cu_seqlens; per-sequence tensors are [O, I] or [n]; outputs are in the accumulation dtype. Every backward is
a scan walked forward in time by the same engine (the ``*_backward`` ops); linear_scan's is its own forward
op on shifted coefficients.
"""

from __future__ import annotations

import torch

from ._util import acc_like as _acc_like
from ._util import accumulate_dtype, cast, register

FAMILY = "returns"
OPS = ("linear_scan", "discounted_returns", "gae", "vtrace", "retrace")


def _per_seq_like(x, cu_seqlens, dtype):
    if cu_seqlens is not None:
        shape = (cu_seqlens.shape[0] - 1,)
    else:  # canonical [O, T, I], or [T, I] / [T] as the CPU fast path passes them
        shape = (x.shape[0], x.shape[2]) if x.dim() == 3 else tuple(x.shape[1:])
    return x.new_empty(shape, dtype=dtype)


def _maybe(x, like):
    return _acc_like(like) if x else like.new_empty((0,), dtype=accumulate_dtype(like.dtype))


@torch.library.register_fake("rlkernels::linear_scan")
def _(a, b, initial, reverse):
    return _acc_like(b)


@torch.library.register_fake("rlkernels::discounted_returns")
def _(rewards, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma):
    return _acc_like(rewards)


@torch.library.register_fake("rlkernels::discounted_returns_backward")
def _(grad, terminated, truncated, mask, cu_seqlens, rewards_like, gamma, has_next_values):
    acc = accumulate_dtype(rewards_like.dtype)
    return (_acc_like(rewards_like), _maybe(has_next_values, rewards_like),
            _per_seq_like(rewards_like, cu_seqlens, acc))


@torch.library.register_fake("rlkernels::gae")
def _(rewards, values, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma, lam):
    return _acc_like(rewards), _acc_like(rewards)


@torch.library.register_fake("rlkernels::gae_backward")
def _(grad_advantages, grad_returns, terminated, truncated, mask, cu_seqlens, rewards_like, gamma, lam,
      has_next_values):
    acc = accumulate_dtype(rewards_like.dtype)
    return (_acc_like(rewards_like), _acc_like(rewards_like), _maybe(has_next_values, rewards_like),
            _per_seq_like(rewards_like, cu_seqlens, acc))


@torch.library.register_fake("rlkernels::vtrace")
def _(rewards, values, log_rhos, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma,
      lam, rho_clip, c_clip, pg_rho_clip, save_carries):
    return _acc_like(rewards), _acc_like(rewards), _maybe(save_carries, rewards), _maybe(save_carries, rewards)


@torch.library.register_fake("rlkernels::vtrace_backward")
def _(grad_vs, grad_pg_advantages, rewards, values, log_rhos, next_values, saved_next_x, saved_next_v,
      terminated, truncated, mask, cu_seqlens, gamma, lam, rho_clip, c_clip, pg_rho_clip):
    acc = accumulate_dtype(rewards.dtype)
    return (_acc_like(rewards), _acc_like(rewards), _acc_like(rewards), _maybe(next_values is not None, rewards),
            _per_seq_like(rewards, cu_seqlens, acc))


@torch.library.register_fake("rlkernels::retrace")
def _(rewards, q_taken, next_v, log_rhos, terminated, truncated, mask, cu_seqlens, gamma, lam, c_clip):
    return _acc_like(rewards)


@torch.library.register_fake("rlkernels::retrace_backward")
def _(grad, targets, q_taken, log_rhos, terminated, truncated, mask, cu_seqlens, gamma, lam, c_clip):
    return tuple(_acc_like(q_taken) for _ in range(4))


# ---- linear_scan ----


def _shift(x, forward):
    """x moved one step along time (dim 1) towards the future (forward=True) or the past, zero-filled."""
    zero = torch.zeros_like(x[:, :1])
    return torch.cat([zero, x[:, :-1]], 1) if forward else torch.cat([x[:, 1:], zero], 1)


def _linear_scan_setup(ctx, inputs, output):
    a, b, initial, reverse = inputs
    ctx.reverse = reverse
    ctx.has_initial = initial is not None
    ctx.save_for_backward(a, initial if initial is not None else a.new_zeros(a.shape[0], a.shape[2]), output)


def register_linear_scan(op, scan_op):
    """The adjoint of a reverse scan is a forward scan with the same coefficients, one step shifted (and the
    other way round), run by the backend's own forward op `scan_op`."""

    def backward(ctx, grad):
        a, initial, x = ctx.saved_tensors
        if a.shape[1] == 0:
            return (torch.zeros_like(a), torch.zeros_like(a), (torch.zeros_like(initial) if ctx.has_initial else None),
                    None)
        grad = grad.to(x.dtype)
        a_acc = a.to(x.dtype)
        y = scan_op(_shift(a_acc, ctx.reverse), grad.contiguous(), None, not ctx.reverse)
        init = initial.to(x.dtype).unsqueeze(1)
        if ctx.reverse:
            x_neighbour = torch.cat([x[:, 1:], init], 1)
            grad_initial = a_acc[:, -1] * y[:, -1]
        else:
            x_neighbour = torch.cat([init, x[:, :-1]], 1)
            grad_initial = a_acc[:, 0] * y[:, 0]
        grad_a = (y * x_neighbour).to(a.dtype)
        return grad_a, y.to(a.dtype), (grad_initial.to(initial.dtype) if ctx.has_initial else None), None

    register(op, backward, _linear_scan_setup)


# ---- discounted_returns ----


def _returns_setup(ctx, inputs, output):
    rewards, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma = inputs
    ctx.gamma = gamma
    ctx.has_next = next_values is not None
    ctx.likes = (next_values, bootstrap_value)
    ctx.save_for_backward(rewards, terminated, truncated, mask, cu_seqlens)


def register_discounted_returns(op, backward_op):
    """Differentiable in rewards, next_values and bootstrap_value."""

    def backward(ctx, grad):
        rewards, terminated, truncated, mask, cu_seqlens = ctx.saved_tensors
        g_r, g_next, g_boot = backward_op(grad, terminated, truncated, mask, cu_seqlens, rewards, ctx.gamma,
                                          ctx.has_next)
        next_values, bootstrap_value = ctx.likes
        return (g_r.to(rewards.dtype), cast(g_next, next_values) if ctx.has_next else None,
                cast(g_boot, bootstrap_value), None, None, None, None, None)

    register(op, backward, _returns_setup, backward_op)


# ---- gae ----


def _gae_setup(ctx, inputs, output):
    rewards, values, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma, lam = inputs
    ctx.gamma, ctx.lam = gamma, lam
    ctx.has_next = next_values is not None
    ctx.likes = (values, next_values, bootstrap_value)
    ctx.save_for_backward(rewards, terminated, truncated, mask, cu_seqlens)


def register_gae(op, backward_op):
    """Differentiable in rewards, values, next_values and bootstrap_value."""

    def backward(ctx, grad_adv, grad_ret):
        rewards, terminated, truncated, mask, cu_seqlens = ctx.saved_tensors
        g_r, g_v, g_next, g_boot = backward_op(grad_adv, grad_ret, terminated, truncated, mask, cu_seqlens, rewards,
                                               ctx.gamma, ctx.lam, ctx.has_next)
        values, next_values, bootstrap_value = ctx.likes
        return (g_r.to(rewards.dtype), g_v.to(values.dtype), cast(g_next, next_values) if ctx.has_next else None,
                cast(g_boot, bootstrap_value), None, None, None, None, None, None)

    register(op, backward, _gae_setup, backward_op)


# ---- vtrace ----


def _vtrace_setup(ctx, inputs, output):
    (rewards, values, log_rhos, next_values, bootstrap_value, terminated, truncated, mask, cu_seqlens, gamma, lam,
     rho_clip, c_clip, pg_rho_clip, save_carries) = inputs
    ctx.scalars = (gamma, lam, rho_clip, c_clip, pg_rho_clip)
    ctx.save_carries = save_carries
    ctx.bootstrap_like = bootstrap_value
    _, _, next_x, next_v = output
    ctx.save_for_backward(rewards, values, log_rhos, next_values, next_x, next_v, terminated, truncated, mask,
                          cu_seqlens)


def register_vtrace(op, backward_op):
    """Differentiable in rewards, values, next_values, bootstrap_value, and in log_rhos when the forward saved
    its carries (save_carries: log_rhos required grad)."""

    def backward(ctx, grad_vs, grad_pg, _grad_x, _grad_v):
        (rewards, values, log_rhos, next_values, next_x, next_v, terminated, truncated, mask,
         cu_seqlens) = ctx.saved_tensors
        saved = ctx.save_carries
        g_r, g_v, g_lr, g_next, g_boot = backward_op(
            grad_vs, grad_pg, rewards, values, log_rhos, next_values, next_x if saved else None,
            next_v if saved else None, terminated, truncated, mask, cu_seqlens, *ctx.scalars)
        return (g_r.to(rewards.dtype), g_v.to(values.dtype), g_lr.to(log_rhos.dtype) if saved else None,
                cast(g_next, next_values) if next_values is not None else None, cast(g_boot, ctx.bootstrap_like),
                None, None, None, None, None, None, None, None, None, None)

    register(op, backward, _vtrace_setup, backward_op)


# ---- retrace ----


def _retrace_setup(ctx, inputs, output):
    rewards, q_taken, next_v, log_rhos, terminated, truncated, mask, cu_seqlens, gamma, lam, c_clip = inputs
    ctx.scalars = (gamma, lam, c_clip)
    ctx.dtypes = (rewards.dtype, q_taken.dtype, next_v.dtype, log_rhos.dtype)
    ctx.save_for_backward(output, q_taken, log_rhos, terminated, truncated, mask, cu_seqlens)


def register_retrace(op, backward_op):
    """Differentiable in rewards, q_taken, next_v and log_rhos (through c = lam min(c_clip, e^log_rho), whose
    derivative is 0 where the clip binds, equality included, as in vtrace)."""

    def backward(ctx, grad):
        targets, q_taken, log_rhos, terminated, truncated, mask, cu_seqlens = ctx.saved_tensors
        grads = backward_op(grad.contiguous(), targets, q_taken, log_rhos, terminated, truncated, mask, cu_seqlens,
                            *ctx.scalars)
        return (*(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), None, None, None, None, None, None, None)

    register(op, backward, _retrace_setup, backward_op)


_ops = torch.ops.rlkernels
register_linear_scan("linear_scan", _ops.linear_scan)
register_discounted_returns("discounted_returns", _ops.discounted_returns_backward)
register_gae("gae", _ops.gae_backward)
register_vtrace("vtrace", _ops.vtrace_backward)
register_retrace("retrace", _ops.retrace_backward)
