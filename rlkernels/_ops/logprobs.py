"""Fake kernels and autograd of gather_logprobs' ops (docs/design.md §4.3)."""

from __future__ import annotations

import torch

from ._util import accumulate_dtype, register

FAMILY = "logprobs"
OPS = ("gather_logprobs",)


def _forward_fake(logits, tokens, temperature, return_entropy, ignore_index, inplace_backward):
    torch._check(logits.dim() == 2, lambda: "rlkernels.gather_logprobs: logits must be [N, V] here")
    torch._check(tokens.shape[0] == logits.shape[0], lambda: "rlkernels.gather_logprobs: tokens must be [N]")
    acc = accumulate_dtype(logits.dtype)
    n = logits.shape[0]
    return (logits.new_empty((n,), dtype=acc), logits.new_empty((n if return_entropy else 0,), dtype=acc),
            logits.new_empty((n,), dtype=acc))


torch.library.register_fake("rlkernels::gather_logprobs")(_forward_fake)


@torch.library.register_fake("rlkernels::gather_logprobs_backward")
def _(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("rlkernels::gather_logprobs_backward_inplace")
def _(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature, ignore_index):
    return None


def register_fake_forward(op):
    """The forward's fake kernel for a Triton op (a triton_op's own fake run would launch its kernels)."""
    op.register_fake(_forward_fake)


def _setup(ctx, inputs, output):
    logits, tokens, temperature, return_entropy, ignore_index, inplace_backward = inputs
    _, entropy, lse = output
    ctx.scalars = (temperature, ignore_index)
    ctx.inplace = inplace_backward
    ctx.save_for_backward(logits, tokens, lse, entropy)


def register_gather_logprobs(op, backward_op, backward_inplace_op):
    """d logits = g_logp (onehot - p) / T + the entropy term, into a new tensor, or over the logits with
    inplace_backward (documented as destroying them)."""

    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        logits, tokens, lse, entropy = ctx.saved_tensors
        if ctx.inplace:
            backward_inplace_op(grad_logp, grad_entropy, logits, tokens, lse, entropy, *ctx.scalars)
            grad = logits
        else:
            grad = backward_op(grad_logp, grad_entropy, logits, tokens, lse, entropy, *ctx.scalars)
        return grad, None, None, None, None, None

    register(op, backward, _setup)


_ops = torch.ops.rlkernels
register_gather_logprobs("gather_logprobs", _ops.gather_logprobs_backward, _ops.gather_logprobs_backward_inplace)
