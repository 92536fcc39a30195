"""Log-prob gathering: the log-probability of sampled tokens (and the entropy) from a policy's logits.

docs/design.md §4.3 is the definition. The wrapper checks arguments, flattens the leading dimensions to rows
([N, V], unit stride along V, no copy for contiguous logits), picks the backend and registers autograd and
fake kernels for the custom ops declared in csrc/ops.cpp.
"""

from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (loads the kernels and the schemas)
from . import _checks as checks
from ._backend import resolve

_ops = torch.ops.rlkernels
_OP = "gather_logprobs"


def _check_index(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"rlkernels.{_OP}: {name} must be an int or None, got {type(value).__name__}")
    return value


def _rows(logits, tokens):
    """logits as [N, V] rows with unit stride along V, tokens as int64 [N]."""
    V = logits.shape[-1]
    rows = logits.reshape(math.prod(logits.shape[:-1]), V) if logits.dim() != 2 else logits
    if rows.shape[0] > 0 and V > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()  # only for logits strided along V (a transposed view): no kernel reads those
    return rows, tokens.reshape(-1).to(torch.int64)


def gather_logprobs(logits, tokens, *, temperature=1.0, return_entropy=False, ignore_index=None,
                    inplace_backward=False, check_tokens=False, backend=None):
    """Log-probability of ``tokens`` under softmax(logits / temperature), and optionally its entropy.

    z = logits / temperature (in float32; float64 for float64 logits);
    logp = z[token] - logsumexp(z);  entropy = logsumexp(z) - sum_v softmax(z)_v z_v.

    ``logits`` is [..., V] (float32, float64, bfloat16 or float16, read as they are), ``tokens`` is [...]
    (any integer dtype). Returns logp, or (logp, entropy) with ``return_entropy=True``, with the shape of
    ``tokens``, in float32 (float64 for float64 logits). One pass over the logits with an online max/sum; no
    tensor of the logits' size is allocated in the forward. Rows whose token equals ``ignore_index`` give 0
    and no gradient. Token ids outside [0, V) raise a ValueError on CPU; on GPU they give NaN for that row
    unless ``check_tokens=True``, which validates them on the host first (a device synchronization).

    Differentiable in ``logits``: d logits = (g_logp (onehot - p) - g_entropy p (z - lse + entropy)) / T, in
    the logits' dtype. With ``inplace_backward=True`` the backward writes that gradient over the logits'
    storage: the logits are destroyed by ``backward()`` (saves one logits-sized buffer, as Liger-Kernel does).
    """
    checks.float_tensor(_OP, "logits", logits)
    checks.tensor(_OP, "tokens", tokens)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"rlkernels.{_OP}: tokens must be an integer tensor, got {tokens.dtype}")
    checks.same_device(_OP, "logits", logits, tokens=tokens)
    if logits.dim() == 0:
        raise ValueError(f"rlkernels.{_OP}: logits must have shape [..., V], got a 0-d tensor")
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"rlkernels.{_OP}: tokens must have shape {tuple(logits.shape[:-1])} (logits' leading "
                         f"dims), got {tuple(tokens.shape)}")
    temperature = checks.positive(_OP, "temperature", temperature)
    if not math.isfinite(temperature):
        raise ValueError(f"rlkernels.{_OP}: temperature must be finite, got {temperature}")
    ignore_index = _check_index("ignore_index", ignore_index)
    return_entropy, inplace_backward = bool(return_entropy), bool(inplace_backward)
    impl = resolve(backend, logits.device, _OP)
    if check_tokens and impl not in ("cpu", "reference"):  # those two check every token themselves
        _check_tokens_on_host(tokens, logits.shape[-1], ignore_index)
    if impl == "reference":
        from . import reference

        out = reference.gather_logprobs(logits, tokens, temperature=temperature, return_entropy=return_entropy,
                                        ignore_index=ignore_index)
        acc = checks.accumulate_dtype(logits.dtype)
        if return_entropy:
            return tuple(torch.as_tensor(o, dtype=acc, device=logits.device) for o in out)
        return torch.as_tensor(out, dtype=acc, device=logits.device)
    rows, tok = _rows(logits, tokens)
    if impl == "triton":
        from .triton import logprobs as triton_logprobs

        fn = triton_logprobs.gather_logprobs
    else:
        fn = _ops.gather_logprobs
    logp, entropy, _ = fn(rows, tok, temperature, return_entropy, ignore_index, inplace_backward)
    logp = logp.reshape(tokens.shape)
    if return_entropy:
        return logp, entropy.reshape(tokens.shape)
    return logp


def _check_tokens_on_host(tokens, V, ignore_index):
    t = tokens.detach().to("cpu", torch.int64).reshape(-1)
    if ignore_index is not None:
        t = t[t != ignore_index]
    bad = (t < 0) | (t >= V)
    if bool(bad.any()):
        raise ValueError(f"rlkernels.{_OP}: tokens must be in [0, {V}) (or ignore_index), got {int(t[bad][0])}")


# ----------------------------------------------------------------------------------------------------
# Fake kernels and autograd of the C++/CUDA ops
# ----------------------------------------------------------------------------------------------------


@torch.library.register_fake("rlkernels::gather_logprobs")
def _(logits, tokens, temperature, return_entropy, ignore_index, inplace_backward):
    torch._check(logits.dim() == 2, lambda: "rlkernels.gather_logprobs: logits must be [N, V] here")
    torch._check(tokens.shape[0] == logits.shape[0], lambda: "rlkernels.gather_logprobs: tokens must be [N]")
    acc = checks.accumulate_dtype(logits.dtype)
    n = logits.shape[0]
    return (logits.new_empty((n,), dtype=acc), logits.new_empty((n if return_entropy else 0,), dtype=acc),
            logits.new_empty((n,), dtype=acc))


@torch.library.register_fake("rlkernels::gather_logprobs_backward")
def _(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("rlkernels::gather_logprobs_backward_inplace")
def _(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature, ignore_index):
    return None


def _setup(ctx, inputs, output):
    logits, tokens, temperature, return_entropy, ignore_index, inplace_backward = inputs
    _, entropy, lse = output
    ctx.scalars = (temperature, ignore_index)
    ctx.inplace = inplace_backward
    ctx.save_for_backward(logits, tokens, lse, entropy)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, tokens, lse, entropy = ctx.saved_tensors
    if ctx.inplace:
        _ops.gather_logprobs_backward_inplace(grad_logp, grad_entropy, logits, tokens, lse, entropy, *ctx.scalars)
        grad = logits
    else:
        grad = _ops.gather_logprobs_backward(grad_logp, grad_entropy, logits, tokens, lse, entropy, *ctx.scalars)
    return grad, None, None, None, None, None


torch.library.register_autograd("rlkernels::gather_logprobs", _backward, setup_context=_setup)
