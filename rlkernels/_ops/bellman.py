"""Fake kernels and autograd of the Bellman family's ops (docs/design.md §4.5).

q_targets and value_iteration carry no gradient.
"""

from __future__ import annotations

import torch

from ._util import acc_like as _acc
from ._util import accumulate_dtype, register

FAMILY = "bellman"
OPS = ("q_targets", "td_loss", "n_step_returns", "bellman_backup", "value_iteration")


@torch.library.register_fake("rlkernels::q_targets")
def _(rewards, next_q, terminated, next_q_online, next_probs, discount, kind, temperature):
    return _acc(next_q, (next_q.shape[0],))


@torch.library.register_fake("rlkernels::td_loss")
def _(q, actions, targets, weights, loss, delta, reduction):
    B = q.shape[0]
    return _acc(q, (B,) if reduction == "none" else ()), _acc(q, (B,))


@torch.library.register_fake("rlkernels::td_loss_backward")
def _(grad_loss, grad_td_errors, q, actions, targets, weights, loss, delta, reduction, td_errors=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(targets)


@torch.library.register_fake("rlkernels::n_step_returns")
def _(rewards, values, next_values, bootstrap_value, terminated, truncated, gamma, n):
    return _acc(rewards)


@torch.library.register_fake("rlkernels::n_step_returns_backward")
def _(grad, terminated, truncated, rewards_like, gamma, n, has_next_values):
    O, _, I = rewards_like.shape
    return (_acc(rewards_like), _acc(rewards_like), _acc(rewards_like) if has_next_values else _acc(rewards_like, (0,)),
            _acc(rewards_like, (O, I)))


@torch.library.register_fake("rlkernels::bellman_backup")
def _(P, R, V, gamma):
    B, S, A, _ = P.shape
    return _acc(P, (B, S, A)), _acc(P, (B, S)), P.new_empty((B, S), dtype=torch.int64)


@torch.library.register_fake("rlkernels::value_iteration")
def _(P, R, V0, gamma, tol, max_iters):
    B, S, A, _ = P.shape
    return (_acc(P, (B, S)), _acc(P, (B, S, A)), P.new_empty((B, S), dtype=torch.int64),
            P.new_empty((), dtype=torch.int64), _acc(P, (B,)))


def _td_setup(ctx, inputs, output):
    q, actions, targets, weights, loss, delta, reduction = inputs
    ctx.args = (loss, delta, reduction)
    ctx.set_materialize_grads(False)  # td_errors is rarely differentiated: no zero-filled gradient for it
    ctx.save_for_backward(q, actions, targets, weights)


def register_td_loss(op, backward_op):
    """td_loss: a dense grad of q with one non-zero per row, and the targets' gradient."""

    def backward(ctx, grad_loss, grad_td):
        q, actions, targets, weights = ctx.saved_tensors
        g_q, g_y = backward_op(grad_loss, grad_td, q, actions, targets, weights, *ctx.args)
        return g_q, None, g_y, None, None, None, None

    register(op, backward, _td_setup, backward_op)


def _n_step_setup(ctx, inputs, output):
    rewards, values, next_values, bootstrap_value, terminated, truncated, gamma, n = inputs
    ctx.args = (gamma, n, next_values is not None)
    ctx.likes = (values, next_values, bootstrap_value)
    ctx.save_for_backward(rewards, terminated, truncated)


def register_n_step_returns(op, backward_op):
    """n_step_returns: differentiable in rewards, values, next_values and bootstrap_value."""

    def backward(ctx, grad):
        rewards, terminated, truncated = ctx.saved_tensors
        gamma, n, has_next = ctx.args
        g_r, g_v, g_nv, g_b = backward_op(grad.contiguous(), terminated, truncated, rewards, gamma, n, has_next)
        values, next_values, bootstrap_value = ctx.likes
        return (g_r.to(rewards.dtype), g_v.to(values.dtype), g_nv.to(next_values.dtype) if has_next else None,
                None if bootstrap_value is None else g_b.to(bootstrap_value.dtype), None, None, None, None)

    register(op, backward, _n_step_setup, backward_op)


def _backup_setup(ctx, inputs, output):
    P, R, V, gamma = inputs
    ctx.gamma = gamma
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(P, V, output[2])


def _backup_backward(ctx, grad_q, grad_v, _grad_policy):
    # Q = R + gamma P @ V and V_new = Q[argmax]: plain tensor algebra on the (small) Q-shaped gradient.
    P, V, policy = ctx.saved_tensors
    acc = accumulate_dtype(P.dtype)
    g = torch.zeros(P.shape[:-1], dtype=acc, device=P.device) if grad_q is None else grad_q.to(acc)
    if grad_v is not None:
        g = g.scatter_add(-1, policy.unsqueeze(-1), grad_v.to(acc).unsqueeze(-1))
    need_p, need_r, need_v, _ = ctx.needs_input_grad
    g_p = (ctx.gamma * g.unsqueeze(-1) * V.to(acc)[:, None, None, :]).to(P.dtype) if need_p else None
    g_r = g.to(P.dtype) if need_r else None
    g_v = (ctx.gamma * torch.einsum("bsat,bsa->bt", P.to(acc), g)).to(V.dtype) if need_v else None
    return g_p, g_r, g_v, None


def register_bellman_backup(op):
    """bellman_backup: differentiable in P, R and V through Q and V_new (V_new's gradient goes to the argmax
    action, as torch.max(dim) does)."""
    register(op, _backup_backward, _backup_setup)


_ops = torch.ops.rlkernels
register_td_loss("td_loss", _ops.td_loss_backward)
register_n_step_returns("n_step_returns", _ops.n_step_returns_backward)
register_bellman_backup("bellman_backup")
