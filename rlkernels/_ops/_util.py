"""Small helpers of the fake kernels and autograd formulas."""

from __future__ import annotations

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs are float32 for 16-bit inputs, else the input dtype (docs/design.md §3)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_like(x: torch.Tensor, shape=None) -> torch.Tensor:
    """An empty tensor shaped like x (or `shape`) in x's accumulation dtype."""
    return x.new_empty(x.shape if shape is None else shape, dtype=accumulate_dtype(x.dtype))


def cast(grad, like):
    """grad in like's dtype, or None without `like`."""
    return None if like is None else grad.to(like.dtype)


def register(op, backward, setup_context, backward_op=None):
    """Registers an autograd formula for a C++ op (its name) or a Triton op (its CustomOpDef). A Triton op's
    backward op (``backward_op``) gets a formula that raises: backward ops are differentiable once
    (docs/design.md §2; the C++ backward ops get theirs in csrc/autograd.cpp)."""
    if isinstance(op, str):
        torch.library.register_autograd(f"rlkernels::{op}", backward, setup_context=setup_context)
    else:
        op.register_autograd(backward, setup_context=setup_context)
        if backward_op is not None:
            _differentiable_once(backward_op)


def _differentiable_once(backward_op):
    name = backward_op._qualified_op_name  # rlkernels::triton_<op>_backward

    def backward(ctx, *grads):
        raise RuntimeError(f"rlkernels.{name.split('::')[1]}: second-order gradients are not implemented (the "
                           "backward is differentiable once: a graph created through it with create_graph=True "
                           "cannot be differentiated again)")

    torch.library.register_autograd(name, backward)
