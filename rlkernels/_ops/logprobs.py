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


def _writable(logits):
    """Whether each element of the [N, V] logits (unit stride along V) has its own memory, so the backward may
    write over them: not an expanded tensor (stride 0) or another view whose rows overlap."""
    n, v = logits.shape
    return n <= 1 or v == 0 or logits.stride(0) >= v


def _grad_graph(grad_logp, grad_entropy, logits, tokens, temperature, ignore_index):
    """The same gradient in differentiable torch ops, recomputed from the logits: the backward with
    create_graph=True, so second-order gradients are those of the formula (docs/design.md §4.3)."""
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32) / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    keep = torch.ones_like(tokens, dtype=torch.bool) if ignore_index is None else tokens != ignore_index
    tok = torch.where(keep, tokens, 0)
    dz = torch.zeros_like(z)
    if grad_logp is not None:
        onehot = torch.nn.functional.one_hot(tok, z.shape[-1]).to(z.dtype)
        dz = dz + grad_logp.to(z.dtype).unsqueeze(-1) * (onehot - p)
    if grad_entropy is not None:
        plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))  # -inf logits add nothing to the entropy
        entropy = -plogp.sum(-1, keepdim=True)
        dz = dz - grad_entropy.to(z.dtype).unsqueeze(-1) * (plogp + p * entropy)
    dz = torch.where(keep.unsqueeze(-1), dz, torch.zeros_like(dz))
    return (dz / temperature).to(logits.dtype)


def register_gather_logprobs(op, backward_op, backward_inplace_op):
    """d logits = g_logp (onehot - p) / T + the entropy term, into a new tensor, or over the logits with
    inplace_backward (documented as destroying them) where each logit has its own memory. With
    create_graph=True the gradient is computed in differentiable torch ops instead."""

    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        logits, tokens, lse, entropy = ctx.saved_tensors
        temperature, ignore_index = ctx.scalars
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (grad_logp, grad_entropy,
                                                                                      logits)):
            if entropy.numel() != tokens.numel():
                grad_entropy = None
            grad = _grad_graph(grad_logp, grad_entropy, logits, tokens, temperature, ignore_index)
        elif ctx.inplace and _writable(logits):
            backward_inplace_op(grad_logp, grad_entropy, logits, tokens, lse, entropy, *ctx.scalars)
            grad = logits
        else:
            grad = backward_op(grad_logp, grad_entropy, logits, tokens, lse, entropy, *ctx.scalars)
        return grad, None, None, None, None, None

    register(op, backward, _setup, backward_op)


_ops = torch.ops.rlkernels
register_gather_logprobs("gather_logprobs", _ops.gather_logprobs_backward, _ops.gather_logprobs_backward_inplace)
